"""Distributed meta-training through the trainer and the command line, two gloo processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from implicit_meta import cli
from implicit_meta.data import EpisodeBatch, EpisodeSampler, FewShotDataset, Splits
from implicit_meta.distributed import DistributedContext, init_distributed
from implicit_meta.fewshot import _run, trainer
from implicit_meta.fewshot.builders import build_meta_optimizer, build_model
from implicit_meta.fewshot.checkpoint import decode_json_tensor
from implicit_meta.fewshot.config import TrainConfig
from implicit_meta.fewshot.evaluation import episode_accuracies
from implicit_meta.fewshot.meta_batch import meta_train_step
from implicit_meta.optimizer import ImplicitMetaOptimizer

pytestmark = pytest.mark.filterwarnings("ignore:I \\+ H/reg is not positive definite")

WORLD = 2
CONFIG = TrainConfig(
    backbone="conv4-8", ways=3, shots=1, queries=2, inner_steps=2, cg_steps=2, meta_batch=4,
    meta_steps=1, meta_lr=0.01, time_budget=0, eval_episodes=0, threads=1, device="cpu",
    seed=5, log_every=1, checkpoint_every=2,
)  # fmt: skip
# The head adapted by its default solver (dense Newton), the body meta-learned exactly.
HEAD_CONFIG = CONFIG.replace(adapt="head", inner_steps=None, cg_steps=10)
TINY = [
    "--backbone", "conv4-8", "--ways", "3", "--shots", "1", "--queries", "2",
    "--inner-steps", "2", "--cg-steps", "2", "--threads", "1", "--no-progress",
]  # fmt: skip


def _splits() -> Splits[FewShotDataset]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, 5, 1, 28, 28), generator=g, dtype=torch.uint8)
    dataset = FewShotDataset(images, tuple(f"c{i}" for i in range(6)))
    return Splits(train=dataset, test=dataset)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        # Every rank is a client of the parent's store (_launcher_store), none binds a port.
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    init_distributed("cpu")  # the group outlives the train() calls below
    captured: list[ImplicitMetaOptimizer] = []

    def capture(*args: Any) -> ImplicitMetaOptimizer:
        captured.append(build_meta_optimizer(*args))
        return captured[-1]

    _run.build_meta_optimizer = capture  # type: ignore[assignment]
    root, splits = Path(out), _splits()

    def run(name: str, config: TrainConfig, *, resume: bool = False) -> None:
        start = len(captured)
        trainer.train(config, root / name, resume=resume, progress=False, splits=splits)
        # The run's own meta-optimizer, built first; train() also builds one for the untrained
        # baseline it evaluates.
        trained = captured[start]
        state = {k: v.detach().clone() for k, v in trained.model.state_dict().items()}
        torch.save(state, root / f"{name}-rank{rank}.pt")

    run("one", CONFIG)
    run("head", HEAD_CONFIG)
    constant = CONFIG.replace(lr_schedule="constant", meta_steps=4, eval_episodes=5)
    run("straight", constant)
    run("split", constant.replace(meta_steps=2))
    run("split", constant, resume=True)
    dist.destroy_process_group()


def _launcher_store() -> dist.TCPStore:
    # Hosted here, as torchrun's agent hosts its store, on a port the OS gives it while binding.
    # Picking a "free" port to let rank 0 bind it later races with every other process on the
    # machine for the seconds the ranks take to start (EADDRINUSE under load); a store that is
    # already listening cannot lose its port. Keep it alive until the ranks have joined.
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distributed")
    store = _launcher_store()
    mp.spawn(_worker, args=(store.port, str(out)), nprocs=WORLD, join=True)
    return out


def _single_process_step(config: TrainConfig | None = None) -> dict[str, torch.Tensor]:
    """One step in this process over the tasks the two ranks drew, concatenated."""
    config = config or CONFIG
    splits = _splits()
    torch.manual_seed(config.seed)
    model = build_model(config, splits.train.image_shape)
    meta = build_meta_optimizer(model, config)
    share = config.meta_batch // WORLD
    parts = [
        EpisodeSampler(splits.train, 3, 1, 2, config.seed, "cpu", rank=r).sample(share)
        for r in range(WORLD)
    ]
    fields = ("xs", "ys", "xq", "yq", "classes")
    batch = EpisodeBatch(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        meta_train_step(meta, batch)
    finally:
        torch.set_num_threads(previous)
    return model.state_dict()


def test_one_step_is_identical_on_both_ranks_and_equals_one_process(runs: Path) -> None:
    ranks = [torch.load(runs / f"one-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    reference = _single_process_step()
    torch.manual_seed(CONFIG.seed)
    before = build_model(CONFIG, _splits().train.image_shape).state_dict()
    for name, value in reference.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        if value.is_floating_point():
            err = float((ranks[0][name] - value).norm())
            assert err <= 1e-6 * max(float(value.norm()), 1e-12), (name, err)
            if name.endswith("weight"):
                assert not torch.equal(value, before[name])  # the step moved it


def test_head_only_step_is_identical_on_both_ranks_and_equals_one_process(runs: Path) -> None:
    ranks = [torch.load(runs / f"head-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    reference = _single_process_step(HEAD_CONFIG)
    for name, value in reference.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        err = float((ranks[0][name] - value).norm())
        assert err <= 1e-6 * max(float(value.norm()), 1e-12), (name, err)


def test_rank_zero_writes_one_checkpoint_with_every_rank_stream(runs: Path) -> None:
    files = sorted(p.name for p in (runs / "straight").iterdir())
    assert files == [
        "checkpoint.pt", "config.json", "curves.png", "evaluation.json", "metrics.jsonl",
    ]  # fmt: skip
    state = torch.load(runs / "straight" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == WORLD and len(state["ranks"]) == WORLD
    streams = [decode_json_tensor(r["sampler"]) for r in state["ranks"]]
    assert [s["rank"] for s in streams] == [0, 1]
    assert streams[0]["bit_generator"] != streams[1]["bit_generator"]
    steps = [json.loads(line)["step"] for line in (runs / "straight" / "metrics.jsonl").open()]
    assert steps == [1, 2, 3, 4]
    final = [torch.load(runs / f"straight-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, value in final[0].items():
        assert torch.equal(value, final[1][name]), name
        assert torch.equal(value, state["model"][name]), name


def test_distributed_resume_equals_an_uninterrupted_run(runs: Path) -> None:
    straight = torch.load(runs / "straight" / "checkpoint.pt", weights_only=True)
    split = torch.load(runs / "split" / "checkpoint.pt", weights_only=True)
    assert straight["step"] == split["step"] == 4
    for name, value in straight["model"].items():
        assert torch.equal(value, split["model"][name]), name
    for a, b in zip(straight["ranks"], split["ranks"], strict=True):
        assert decode_json_tensor(a["sampler"]) == decode_json_tensor(b["sampler"])
        assert torch.equal(a["torch_rng"], b["torch_rng"])
    assert (runs / "straight" / "metrics.jsonl").read_text().count("\n") == 4
    read = [json.loads((runs / n / "evaluation.json").read_text()) for n in ("straight", "split")]
    assert read[0]["accuracy"] == read[1]["accuracy"]


def test_evaluation_covers_every_rank_share(runs: Path) -> None:
    summary = json.loads((runs / "straight" / "evaluation.json").read_text())
    assert summary["episodes"] == 5
    state = torch.load(runs / "straight" / "checkpoint.pt", weights_only=True)
    splits = _splits()
    config = CONFIG.replace(lr_schedule="constant", meta_steps=4, eval_episodes=5)
    model = build_model(config, splits.test.image_shape)
    model.load_state_dict(state["model"])
    meta = build_meta_optimizer(model, config)
    values: list[float] = []
    for rank, share in enumerate((3, 2)):  # 5 episodes: rank 0 takes the odd one
        sampler = EpisodeSampler(splits.test, 3, 1, 2, config.seed, "cpu", rank=rank)
        values += episode_accuracies(meta, sampler, share)
    assert summary["accuracy"] == pytest.approx(sum(values) / 5, abs=1e-9)


def test_torchrun_command_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={WORLD}", "-m", "implicit_meta", "train", *TINY,
        "--meta-steps", "2", "--meta-batch", "2", "--eval-episodes", "4", "--log-every", "1",
        "--val-episodes", "3", "--val-every", "1", "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    # All of it: the failed rank's traceback comes before torchrun's summary, which alone
    # fills the last few thousand characters.
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("meta-trained 2 steps") == 1, done.stdout  # rank 0 alone prints
    assert "over 4 episodes" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "best.pt", "checkpoint.pt", "config.json", "curves.png", "evaluation.json",
        "metrics.jsonl",
    ]  # fmt: skip
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["world_size"] == WORLD
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    # Training records at steps 1 and 2, validations (3 episodes across both ranks) at 0, 1, 2.
    assert [r["step"] for r in records if "outer_loss" in r] == [1, 2]
    assert [r["step"] for r in records if "val_accuracy" in r] == [0, 1, 2]
    summary = json.loads((out / "evaluation.json").read_text())
    assert summary["episodes"] == 4 and summary["baseline"]["episodes"] == 4


def test_meta_batch_must_divide_before_training_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No process group can form here (there is no rank 1): the error must come first.
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    previous = torch.get_num_threads()
    code = cli.main(["train", *TINY, "--meta-batch", "4", "--out", str(tmp_path / "run")])
    torch.set_num_threads(previous)
    assert code == 2
    err = capsys.readouterr().err
    assert "the meta-batch of 4 tasks does not divide across 3 processes" in err
    assert "e.g. 6" in err
    assert not (tmp_path / "run").exists() and not dist.is_initialized()


def test_resume_needs_the_same_number_of_processes(tmp_path: Path) -> None:
    out = tmp_path / "run"
    previous = torch.get_num_threads()
    trainer.train(CONFIG, out, progress=False, splits=_splits())
    torch.set_num_threads(previous)
    two = DistributedContext(0, 2, 0, torch.device("cpu"))
    with pytest.raises(ValueError, match="written by a run of 1 process"):
        _run.read_folder(CONFIG, out, True, two)
