"""Bad input raises a clear error, and leaves parameters, grads and optimizer state untouched."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im


def ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y)


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, im.ImplicitMetaOptimizer, Any, Any]:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    outer = torch.optim.Adam(model.parameters(), lr=1e-2)
    meta = im.ImplicitMetaOptimizer(model, outer, inner_steps=3)
    support = (torch.randn(6, 4), torch.arange(6) % 3)
    query = (torch.randn(6, 4), torch.arange(6) % 3)
    # Two real steps, so that grads and Adam's state are non-trivial before the bad call.
    for _ in range(2):
        meta.zero_grad()
        meta.meta_backward(ce, support, query)
        meta.step()
    meta.meta_backward(ce, support, query)
    return model, outer, meta, support, query


def _snapshot(model: nn.Module, outer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: v.grad.clone() for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "optimizer": copy.deepcopy(outer.state_dict()),
    }


def _assert_unchanged(
    before: dict[str, Any], model: nn.Module, outer: torch.optim.Optimizer
) -> None:
    after = _snapshot(model, outer)
    for part in ("params", "grads", "buffers"):
        for k, v in before[part].items():
            assert torch.equal(v, after[part][k]), f"{part} {k} changed"
    for key, state in before["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(after["optimizer"]["state"][key][name])
            )


def _nan_loss(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return ce(module, batch) * float("nan")


def _vector_loss(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y, reduction="none")


CALLS: dict[str, tuple[Callable[..., Any], type[Exception], str]] = {
    "non-scalar loss": (
        lambda meta, s, q: meta.meta_backward(_vector_loss, s, q),
        ValueError,
        "scalar",
    ),
    "non-tensor loss": (
        lambda meta, s, q: meta.meta_backward(lambda m, b: 1.0, s, q),
        TypeError,
        "scalar tensor",
    ),
    "empty support": (
        lambda meta, s, q: meta.meta_backward(ce, (s[0][:0], s[1][:0]), q),
        ValueError,
        "support batch is empty",
    ),
    "empty query": (
        lambda meta, s, q: meta.meta_backward(ce, s, (q[0][:0], q[1][:0])),
        ValueError,
        "query batch is empty",
    ),
    "empty tuple": (lambda meta, s, q: meta.meta_backward(ce, (), q), ValueError, "empty"),
    "nan inner loss": (
        lambda meta, s, q: meta.meta_backward(_nan_loss, s, q),
        ValueError,
        "inner loss is not finite",
    ),
    "nan outer loss": (
        lambda meta, s, q: meta.meta_backward(ce, s, q, outer_loss_fn=_nan_loss),
        ValueError,
        "outer loss is not finite",
    ),
    "inf in support data": (
        lambda meta, s, q: meta.meta_backward(ce, (s[0] * float("inf"), s[1]), q),
        ValueError,
        "not finite",
    ),
    "diverging inner lr": (
        lambda meta, s, q: _with(meta, inner_lr=1e30).meta_backward(ce, s, q),
        ValueError,
        "inner loss is not finite",
    ),
    "adapt with nan loss": (
        lambda meta, s, q: meta.adapt(_nan_loss, s),
        ValueError,
        "inner loss is not finite",
    ),
    "adapt with empty batch": (
        lambda meta, s, q: meta.adapt(ce, (s[0][:0], s[1][:0])),
        ValueError,
        "empty",
    ),
    "solver returning wrong keys": (
        lambda meta, s, q: _with(
            meta, solver=lambda objective, params, *, steps, lr: {}
        ).meta_backward(ce, s, q),
        ValueError,
        "same keys",
    ),
}


def _with(meta: im.ImplicitMetaOptimizer, **changes: Any) -> im.ImplicitMetaOptimizer:
    # Bypasses the problem's checks on purpose: these settings fail only inside a solve.
    clone = copy.copy(meta)
    problem = copy.copy(meta.problem)
    if "solver" in changes:
        object.__setattr__(problem, "_solver_fn", changes.pop("solver"))
    if "inner_lr" in changes:
        object.__setattr__(problem, "lr", changes.pop("inner_lr"))
    assert not changes, changes
    clone.problem = problem
    return clone


@pytest.mark.parametrize("case", list(CALLS))
def test_bad_call_raises_and_changes_nothing(case: str) -> None:
    model, outer, meta, support, query = _setup()
    before = _snapshot(model, outer)
    call, error, message = CALLS[case]
    with pytest.raises(error, match=message):
        call(meta, support, query)
    _assert_unchanged(before, model, outer)


BAD_SETTINGS: dict[str, tuple[dict[str, Any], type[Exception], str]] = {
    "reg zero": ({"reg": 0.0}, ValueError, "reg must be positive"),
    "reg negative": ({"reg": -1.0}, ValueError, "reg must be positive"),
    "reg nan": ({"reg": float("nan")}, ValueError, "reg must be finite"),
    "reg string": ({"reg": "2"}, TypeError, "reg must be a real number"),
    "cg_steps negative": ({"cg_steps": -1}, ValueError, "cg_steps must be at least 0"),
    "adjoint and shorthand": (
        {"adjoint": im.ImplicitAdjoint(), "cg_steps": 3},
        ValueError,
        "cg_steps= given beside adjoint=",
    ),
    "adjoint and problem disagree on reg": (
        {"adjoint": im.ImplicitAdjoint(reg=3.0), "reg": 1.0},
        ValueError,
        "disagree",
    ),
    "adjoint not an adjoint": ({"adjoint": {"reg": 1.0}}, TypeError, "must be an ImplicitAdjoint"),
    "sgd step diverges": ({"reg": 10.0, "inner_lr": 0.2}, ValueError, "inner_lr \\* reg = 2"),
    "cg_steps float": ({"cg_steps": 2.5}, TypeError, "cg_steps must be an integer"),
    "inner_steps negative": ({"inner_steps": -1}, ValueError, "inner_steps must be at least 0"),
    "inner_lr zero": ({"inner_lr": 0.0}, ValueError, "inner_lr must be positive"),
    "cg_tol negative": ({"cg_tol": -1e-3}, ValueError, "cg_tol must be non-negative"),
    "unknown solver": ({"inner": "bfgs"}, ValueError, "unknown inner solver 'bfgs'"),
    "solver class not optimizer": ({"inner": dict}, TypeError, "torch.optim.Optimizer subclass"),
    "solver not callable": ({"inner": 3}, TypeError, "inner must be"),
    "hvp mode": ({"hvp": "fast"}, ValueError, "unknown hvp mode"),
    "inner_options not dict": ({"inner_options": [1]}, TypeError, "inner_options must be a dict"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_setting_raises(case: str) -> None:
    model = nn.Linear(3, 2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    kwargs, error, message = BAD_SETTINGS[case]
    with pytest.raises(error, match=message):
        im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k])


def test_model_without_trainable_parameters() -> None:
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_model_frozen_after_construction() -> None:
    model = nn.Linear(3, 2)
    meta = im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        meta.meta_backward(
            ce, (torch.randn(4, 3), torch.arange(4) % 2), (torch.randn(4, 3), torch.arange(4) % 2)
        )


def test_optimizer_over_foreign_tensors() -> None:
    model = nn.Linear(3, 2)
    other = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        im.ImplicitMetaOptimizer(model, torch.optim.SGD(other.parameters(), lr=0.1))


def test_wrong_types() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        im.ImplicitMetaOptimizer(lambda x: x, torch.optim.SGD(model.parameters(), lr=0.1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"outer_optimizer must be a torch\.optim\.Optimizer"):
        im.ImplicitMetaOptimizer(model, "adam")  # type: ignore[arg-type]


def test_nonpositive_curvature_warns_once_and_marks_status() -> None:
    # A concave inner loss makes I + H/reg indefinite for a small reg.
    model = nn.Linear(3, 1, bias=False).double()
    concave = lambda m, b: -(m(b) ** 2).mean()  # noqa: E731
    quadratic = lambda m, b: (m(b) ** 2).mean()  # noqa: E731
    x = torch.randn(8, 3, dtype=torch.float64) * 3
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), reg=0.1, inner_steps=0, cg_steps=5
    )
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        first = meta.meta_backward(concave, x, x, outer_loss_fn=quadratic)
    assert first.status is im.CGStatus.NONPOSITIVE_CURVATURE
    assert torch.isfinite(model.weight.grad).all()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = meta.meta_backward(concave, x, x, outer_loss_fn=quadratic)
    assert second.status is im.CGStatus.NONPOSITIVE_CURVATURE
