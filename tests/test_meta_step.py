"""One meta-step resolves its settings once: one state split, one curvature resolution per call."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im
from implicit_meta.functional import curvature
from implicit_meta.functional.adjoint import ImplicitAdjoint
from implicit_meta.module_losses import split_state

TASKS = 3


def ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def _batches() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(0)
    support = (torch.randn(TASKS, 6, 4, generator=generator), torch.arange(6).repeat(TASKS, 1) % 3)
    query = (torch.randn(TASKS, 6, 4, generator=generator), torch.arange(6).repeat(TASKS, 1) % 3)
    return support, query


def _count_everywhere(
    monkeypatch: pytest.MonkeyPatch,
    original: Callable[..., Any],
    counts: bool | Callable[..., bool] = True,
) -> list[int]:
    """Replace ``original`` in every loaded module of the package that bound it; count calls."""
    calls: list[int] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        if counts is True or (callable(counts) and counts(*args, **kwargs)):
            calls.append(1)
        return original(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("implicit_meta") and module is not None:
            for attribute, value in list(vars(module).items()):
                if value is original:
                    monkeypatch.setattr(module, attribute, counting)
    return calls


def _auto(curvature_given: object, *args: Any) -> bool:
    return isinstance(curvature_given, str) and curvature_given == "auto"


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("adapt", ["all", ("2",)])
def test_one_meta_backward_batch_splits_the_state_and_resolves_the_curvature_once(
    monkeypatch: pytest.MonkeyPatch, strategy: str, adapt: str | tuple[str, ...]
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), 0.1), inner_steps=2, cg_steps=3, adapt=adapt
    )
    assert meta.adjoint.curvature == "auto"
    splits = _count_everywhere(monkeypatch, split_state)
    # "auto" is made concrete once per call; the tasks get the concrete curvature.
    autos = _count_everywhere(monkeypatch, curvature.resolve_curvature, _auto)
    support, query = _batches()
    for call in range(2):
        meta.meta_backward_batch(ce, support, query, strategy=strategy)
        assert (len(splits), len(autos)) == (call + 1, call + 1)
    meta.meta_backward(ce, (support[0][0], support[1][0]), (query[0][0], query[1][0]))
    assert (len(splits), len(autos)) == (3, 3)


def test_the_curvature_is_resolved_by_a_pure_function_of_the_call() -> None:
    # Two losses, two concrete curvatures; the optimizer's own adjoint stays as given.
    from implicit_meta._meta_step import resolved_adjoint

    model = nn.Linear(4, 3)
    batch = (torch.randn(6, 4), torch.arange(6) % 3)
    adjoint = ImplicitAdjoint(reg=1.0, cg_steps=3)
    plain = resolved_adjoint(adjoint, model, ce, batch, {}, {})
    stated = resolved_adjoint(adjoint, model, im.output_loss(F.cross_entropy), batch, {}, {})
    assert (plain.curvature, stated.curvature) == ("hessian", "gauss_newton")
    assert plain.cg_steps == stated.cg_steps == 3 and adjoint.curvature == "auto"
    assert plain.describe() == "I + H/1, CG 3"
    first_order = ImplicitAdjoint()
    assert resolved_adjoint(first_order, model, ce, batch, {}, {}) is first_order
    with pytest.raises(ValueError, match="output_loss"):
        resolved_adjoint(adjoint.replace(curvature="gauss_newton"), model, ce, batch, {}, {})
