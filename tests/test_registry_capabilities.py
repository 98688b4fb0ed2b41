"""What the registry records beside a solver: whether it can run under torch.func.vmap."""

from __future__ import annotations

import inspect
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im
from implicit_meta._batch_strategy import auto_strategy
from implicit_meta._meta_step import MetaStepPlan
from implicit_meta.solvers import declare_solver, vmap_unsupported_reason

TASKS = 3
REASON = "it reads a value on the host (test)"


def ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def gd(objective: Any, params: dict[str, Tensor], *, steps: int, lr: float) -> dict[str, Tensor]:
    for _ in range(steps):
        grads = torch.func.grad(objective)(params)
        params = {k: v - lr * grads[k] for k, v in params.items()}
    return params


@pytest.fixture
def host_gd() -> Iterator[Any]:
    # A distinct function object per test, so that no declaration leaks between tests.
    def host_gd(objective: Any, params: dict[str, Tensor], *, steps: int, lr: float) -> Any:
        return gd(objective, params, steps=steps, lr=lr)

    im.register_inner_solver("host_gd_test", vmappable=False, reason=REASON)(host_gd)
    yield host_gd
    im.unregister_inner_solver("host_gd_test")


def test_registered_unvmappable_solver_reports_its_reason(host_gd: Any) -> None:
    assert vmap_unsupported_reason(host_gd) == REASON
    assert vmap_unsupported_reason(im.get_inner_solver("host_gd_test")) == REASON


def test_reason_goes_with_the_registration() -> None:
    def once(objective: Any, params: dict[str, Tensor], *, steps: int, lr: float) -> Any:
        return params

    im.register_inner_solver("once_test", vmappable=False, reason=REASON)(once)
    im.unregister_inner_solver("once_test")
    assert vmap_unsupported_reason(once) is None


def test_plain_registered_solvers_are_vmappable() -> None:
    registered = im.register_inner_solver("plain_gd_test")(gd)
    try:
        assert vmap_unsupported_reason(registered) is None
    finally:
        im.unregister_inner_solver("plain_gd_test")
    for name in ("sgd", "adam", "newton_cg"):
        assert vmap_unsupported_reason(im.get_inner_solver(name)) is None


def test_builtin_lbfgs_is_registered_unvmappable_from_its_own_file() -> None:
    reason = vmap_unsupported_reason(im.get_inner_solver("lbfgs"))
    assert reason is not None and "LBFGS" in reason
    source = inspect.getsourcefile(im.solvers.lbfgs)
    assert source is not None and Path(source).name == "lbfgs.py"


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.LBFGS])
def test_torch_optimizer_solver_reports_it_cannot_be_vmapped(
    optimizer_class: type[torch.optim.Optimizer],
) -> None:
    solver = im.torch_optimizer_solver(optimizer_class)
    reason = vmap_unsupported_reason(solver)
    assert (
        reason == f"torch.optim.{optimizer_class.__name__} mutates tensors and syncs with the host"
    )


def test_torch_optimizer_solver_stays_unvmappable_when_registered_by_name() -> None:
    # The custom-solver guide registers an adapter without saying it cannot be vmapped.
    im.register_inner_solver("rmsprop_test")(im.torch_optimizer_solver(torch.optim.RMSprop))
    try:
        assert "RMSprop" in (vmap_unsupported_reason(im.get_inner_solver("rmsprop_test")) or "")
    finally:
        im.unregister_inner_solver("rmsprop_test")


def test_declare_solver_marks_an_unregistered_function() -> None:
    def local_gd(objective: Any, params: dict[str, Tensor], *, steps: int, lr: float) -> Any:
        return params

    assert vmap_unsupported_reason(local_gd) is None
    assert declare_solver(local_gd, vmappable=False, reason=REASON) is local_gd
    assert vmap_unsupported_reason(local_gd) == REASON


@pytest.mark.parametrize(
    ("vmappable", "reason", "error", "message"),
    [
        (False, None, ValueError, "needs reason="),
        (False, "", ValueError, "needs reason="),
        (True, "why", ValueError, "only for a solver registered with vmappable=False"),
        (0, None, TypeError, "vmappable must be True or False"),
    ],
)
def test_inconsistent_capabilities_are_refused(
    vmappable: Any, reason: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        im.register_inner_solver("bad_spec_test", vmappable=vmappable, reason=reason)
    assert "bad_spec_test" not in im.list_inner_solvers()


def test_vmap_strategy_loops_over_an_unvmappable_solver_without_trying(
    host_gd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = nn.Linear(4, 3).double()
    support = (torch.randn(TASKS, 6, 4, dtype=torch.float64), torch.randint(0, 3, (TASKS, 6)))
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), inner="host_gd_test", inner_steps=3
    )
    for t in range(TASKS):
        meta.meta_backward(ce, (support[0][t], support[1][t]), (support[0][t], support[1][t]))
    expected = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    meta.zero_grad()

    def no_vmap(*args: object) -> object:
        raise AssertionError("vmap was tried for a solver registered with vmappable=False")

    monkeypatch.setattr(MetaStepPlan, "vmap_tasks", no_vmap)
    message = re.escape(f"meta_backward_batch falls back to a loop over tasks ({REASON})")
    with pytest.warns(RuntimeWarning, match=message):
        meta.meta_backward_batch(ce, support, support, reduction="sum", strategy="vmap")
    got = [p.grad for p in model.parameters() if p.grad is not None]
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert auto_strategy(meta.problem.solver_fn, torch.device("cuda")) == "loop"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # only once per optimizer
        meta.meta_backward_batch(ce, support, support, strategy="vmap")
