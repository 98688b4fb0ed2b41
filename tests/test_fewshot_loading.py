from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from implicit_meta.data import EpisodeSampler
from implicit_meta.fewshot import (
    CheckpointError,
    TrainConfig,
    build_meta_optimizer,
    cross_entropy,
    load_meta_model,
    load_splits,
    train,
)
from implicit_meta.models import Conv4

pytestmark = pytest.mark.filterwarnings("ignore:I \\+ H/reg is not positive definite")

CONFIG = TrainConfig(
    backbone="conv4-8", ways=3, shots=1, queries=2, inner_steps=2, cg_steps=2, meta_batch=2,
    meta_steps=3, eval_episodes=0, threads=1, device="cpu", seed=3,
)  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    previous = torch.get_num_threads()
    result = train(CONFIG, tmp_path_factory.mktemp("loading") / "run", progress=False)
    torch.set_num_threads(previous)
    assert result.step == 3 and result.stopped_by == "meta_steps" and result.evaluation is None
    return result.out_dir / "checkpoint.pt"


def test_load_meta_model_round_trip(checkpoint: Path, device: torch.device) -> None:
    model, config = load_meta_model(checkpoint, device=device)
    raw = torch.load(checkpoint, weights_only=True)
    assert config == CONFIG == TrainConfig.from_dict(raw["config"])
    assert isinstance(model, Conv4) and model.training
    state = model.state_dict()
    assert state.keys() == raw["model"].keys()
    for name, value in raw["model"].items():
        assert state[name].device.type == device.type
        assert torch.equal(state[name].cpu(), value), name
    assert json.loads((checkpoint.parent / "config.json").read_text()) == CONFIG.to_dict()


def test_loaded_model_adapts_to_a_new_task(checkpoint: Path) -> None:
    model, config = load_meta_model(checkpoint)
    meta = build_meta_optimizer(model, config)
    assert (meta.problem.reg, meta.problem.steps, meta.adjoint.cg_steps) == (
        config.proximal_reg,
        2,
        2,
    )
    batch = EpisodeSampler(load_splits("omniglot").test, config.ways, 1, 2, seed=0).sample(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = meta.adapt(cross_entropy, batch.support(0))
    logits = adapted(batch.query(0)[0])
    assert logits.shape == (6, 3)
    assert set(adapted.params) == {"head.weight", "head.bias"}  # the default adapts the head
    assert any(
        not torch.equal(adapted.params[k], p)
        for k, p in model.named_parameters()
        if k in adapted.params
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_load_meta_model_rejects_bad_files(tmp_path: Path, checkpoint: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_meta_model(tmp_path / "missing.pt")
    raw = torch.load(checkpoint, weights_only=True)
    del raw["image_shape"]
    torch.save(raw, tmp_path / "no_shape.pt")
    with pytest.raises(CheckpointError, match="image_shape"):
        load_meta_model(tmp_path / "no_shape.pt")
