"""Two gloo processes: one meta-step leaves identical parameters, equal to a single process."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im
from implicit_meta.distributed import (
    DistributedContext,
    average_gradients,
    broadcast_parameters,
    check_meta_batch_divides,
    init_distributed,
    shard_tasks,
)
from implicit_meta.fewshot.checks import check_world_size
from implicit_meta.fewshot.config import TrainConfig
from implicit_meta.fewshot.device import DeviceUnavailableError, resolve_device

TASKS = 4


def ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def _tasks() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(TASKS, 6, 5, generator=g, dtype=torch.float64)
    xq = torch.randn(TASKS, 9, 5, generator=g, dtype=torch.float64)
    ys = torch.randint(0, 3, (TASKS, 6), generator=g)
    yq = torch.randint(0, 3, (TASKS, 9), generator=g)
    return (xs, ys), (xq, yq)


def _step(model: nn.Module, context: DistributedContext) -> None:
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.Adam(model.parameters(), lr=0.05), inner_steps=4, cg_steps=4
    )
    support, query = _tasks()
    meta.zero_grad()
    meta.meta_backward_batch(ce, shard_tasks(support, context), shard_tasks(query, context))
    average_gradients(model, context)
    meta.step()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        # Every rank is a client of the parent's store (_launcher_store), none binds a port.
        TORCHELASTIC_USE_AGENT_STORE="True",
    )
    torch.set_num_threads(1)
    context = init_distributed("cpu")
    model = _model(seed=rank)  # different on purpose: broadcast must align them
    broadcast_parameters(model, context)
    _step(model, context)
    torch.save({k: v.detach() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _launcher_store() -> dist.TCPStore:
    # Hosted here, as torchrun's agent hosts its store, on a port the OS gives it while binding.
    # Picking a "free" port to let rank 0 bind it later races with every other process on the
    # machine for the seconds the ranks take to start (EADDRINUSE under load); a store that is
    # already listening cannot lose its port. Keep it alive until the ranks have joined.
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def test_two_ranks_match_each_other_and_a_single_process() -> None:
    with tempfile.TemporaryDirectory() as out:
        store = _launcher_store()
        mp.spawn(_worker, args=(2, store.port, out), nprocs=2, join=True)
        ranks = [torch.load(Path(out) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = _model(seed=0)
    _step(single, DistributedContext(0, 1, 0, torch.device("cpu")))
    reference = single.state_dict()
    before = _model(seed=0).state_dict()
    for name, value in reference.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name} differs between ranks"
        if value.is_floating_point():
            moved = (value - before[name]).norm()
            err = (ranks[0][name] - value).norm()
            assert err <= 1e-6 * max(float(value.norm()), 1e-12), name
            if name.endswith("weight"):
                assert moved > 0  # the step did something


def test_meta_batch_must_divide_across_ranks() -> None:
    context = DistributedContext(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"does not divide across 3 processes.*e\.g\. 6"):
        shard_tasks(_tasks()[0], context)


def test_one_divisibility_check_for_the_trainer_and_the_shards() -> None:
    context = DistributedContext(rank=0, world_size=3, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError) as sharded:
        shard_tasks(_tasks()[0], context)
    with pytest.raises(ValueError) as checked:
        check_world_size(TrainConfig(meta_batch=TASKS), 3)
    # The same sentence; only the name of the setting differs (the trainer's is the CLI flag).
    assert str(checked.value) == str(sharded.value).replace("a meta-batch", "a --meta-batch")
    check_meta_batch_divides(6, 3)
    with pytest.raises(ValueError, match="positive"):
        check_meta_batch_divides(4, 0)


def test_shards_cover_the_batch_without_overlap() -> None:
    batch = (torch.arange(6).view(6, 1),)
    shards = [
        shard_tasks(batch, DistributedContext(r, 3, r, torch.device("cpu")))[0] for r in range(3)
    ]
    assert torch.equal(torch.cat(shards), batch[0])


def test_single_process_context_without_torchrun() -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    context = init_distributed("cpu")
    assert (context.rank, context.world_size, context.enabled) == (0, 1, False)
    with pytest.raises(ValueError, match="device must be"):
        init_distributed("tpu")


def _without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)


def test_cuda_without_cuda_is_the_same_error_from_both_entry_points(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CUDA is hidden, so this runs (and checks the same thing) on a GPU machine too.
    _without_torchrun(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError) as direct:
        resolve_device("cuda")
    with pytest.raises(DeviceUnavailableError) as launched:
        init_distributed("cuda")
    assert str(direct.value) == str(launched.value)
    assert "--device cuda was requested but CUDA is not available" in str(direct.value)
    assert f"torch {torch.__version__}" in str(direct.value)
    assert resolve_device("auto") == init_distributed("auto").device == torch.device("cpu")


def test_a_local_rank_without_its_gpu_is_a_device_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_torchrun(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(DeviceUnavailableError, match="local rank 2 needs GPU 2, but only 1"):
        init_distributed("cuda")
    with pytest.raises(DeviceUnavailableError, match="only 1 CUDA device"):
        resolve_device("cuda:1")
    assert resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)


def test_a_rank_refuses_an_explicit_gpu_index(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_torchrun(monkeypatch)
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda'"):
        init_distributed("cuda:0")
    with pytest.raises(ValueError, match="unknown device 'cuda:x'"):
        resolve_device("cuda:x")
