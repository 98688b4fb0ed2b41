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
    init_distributed,
    shard_tasks,
)

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
    with pytest.raises(ValueError, match="does not divide across 3 ranks"):
        shard_tasks(_tasks()[0], context)


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
