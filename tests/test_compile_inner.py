"""compile_inner=True: the compiled inner objective gives the eager meta-gradient, compiled once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im

pytestmark = pytest.mark.filterwarnings("ignore:I \\+ H/reg is not positive definite")


def ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).double()


def _meta(model: nn.Module, compile_inner: bool) -> im.ImplicitMetaOptimizer:
    return im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), 0.1),
        reg=2.0,
        inner="sgd",
        inner_steps=8,
        inner_lr=0.2,
        cg_steps=4,
        compile_inner=compile_inner,
    )


def _tasks(count: int) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    support = (
        torch.randn(count, 12, 5, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (count, 12), generator=g),
    )
    query = (
        torch.randn(count, 9, 5, generator=g, dtype=torch.float64),
        torch.randint(0, 3, (count, 9), generator=g),
    )
    return support, query  # fmt: skip


def test_compiled_inner_objective_matches_eager_and_compiles_once() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    support, query = _tasks(3)
    results = {}
    graphs = []
    for compiled in (False, True):
        model = _model()
        meta = _meta(model, compiled)
        for t in range(3):
            meta.meta_backward(ce, (support[0][t], support[1][t]), (query[0][t], query[1][t]))
            graphs.append(counters["stats"]["unique_graphs"])
        results[compiled] = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(results[True], results[False], rtol=1e-10, atol=1e-12)
    # Eager tasks compile nothing; the first compiled task compiles, the next two reuse it.
    assert graphs[:3] == [0, 0, 0]
    assert graphs[3] > 0
    assert graphs[4] == graphs[3] == graphs[5]


def test_compile_inner_under_vmap_runs_eagerly_with_the_same_result() -> None:
    support, query = _tasks(2)
    grads = []
    for compiled in (False, True):
        model = _model()
        meta = _meta(model, compiled)
        meta.meta_backward_batch(ce, support, query, strategy="vmap")
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


def test_compile_inner_is_a_setting_that_round_trips() -> None:
    model = _model()
    meta = _meta(model, True)
    assert meta.settings()["compile_inner"] is True
    other = _meta(_model(), False)
    other.load_state_dict(meta.state_dict())
    assert other.problem.compile is True
    legacy = meta.state_dict()
    del legacy["settings"]["compile_inner"]  # saved before the setting existed
    other.load_state_dict(legacy)
    assert other.problem.compile is False
    with pytest.raises(TypeError, match="compile_inner must be True or False"):
        _meta(model, "yes")  # type: ignore[arg-type]
