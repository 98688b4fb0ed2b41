"""What a new user runs into at the edges: each mistake gets one clear error, nothing changes."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im

ROOT = Path(__file__).resolve().parents[1]


def ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def mse(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.mse_loss(module(batch[0]), batch[1])


def _snapshot(model: nn.Module, outer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {
            k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()
        },
        "optimizer": copy.deepcopy(outer.state_dict()),
    }


def _assert_unchanged(
    before: dict[str, Any], model: nn.Module, outer: torch.optim.Optimizer
) -> None:
    after = _snapshot(model, outer)
    for k, v in before["params"].items():
        assert torch.equal(v, after["params"][k]), f"parameter {k} changed"
    for k, v in before["grads"].items():
        got = after["grads"][k]
        assert (v is None and got is None) or torch.equal(v, got), f"grad {k} changed"
    assert str(before["optimizer"]) == str(after["optimizer"])


def _trained(
    model: nn.Module, batch: tuple[Tensor, Tensor]
) -> tuple[torch.optim.Optimizer, im.ImplicitMetaOptimizer]:
    # One real step, so that grads and Adam's state are non-trivial before the bad call.
    outer = torch.optim.Adam(model.parameters(), lr=1e-2)
    meta = im.ImplicitMetaOptimizer(model, outer, inner_steps=2)
    meta.meta_backward(ce, batch, batch)
    meta.step()
    meta.meta_backward(ce, batch, batch)
    return outer, meta


# --- inner_options are checked against the solver when the optimizer is built ---------------

BAD_OPTIONS: dict[str, tuple[object, dict[str, Any], str]] = {
    "sgd typo": ("sgd", {"momentun": 0.9}, r"'momentun'.*'sgd'.*takes: momentum, nesterov"),
    "adam typo": ("adam", {"beta": (0.9, 0.99)}, r"'beta'.*'adam'.*takes: betas, eps"),
    "lbfgs max_iter": ("lbfgs", {"max_iter": 5}, r"'max_iter'.*'lbfgs'.*takes: history_size"),
    "newton_cg typo": ("newton_cg", {"cg_step": 3}, r"'cg_step'.*takes: cg_steps"),
    "torch.optim.SGD typo": (
        torch.optim.SGD,
        {"momentun": 0.9},
        r"'momentun'.*'torch.optim.SGD'.*takes: momentum, dampening",
    ),
    "torch.optim name typo": (
        "torch.optim.Adam",
        {"beta": (0.9, 0.99)},
        r"'beta'.*'torch.optim.Adam'.*takes: betas",
    ),
    "torch.optim bad value": (
        torch.optim.Adam,
        {"betas": (1.5, 0.9)},
        r"rejected by torch.optim.Adam: Invalid beta parameter",
    ),
    "steps in options": ("sgd", {"steps": 3}, r"inner_options may not set 'steps'"),
    "sgd momentum 1.5": ("sgd", {"momentum": 1.5}, r"invalid momentum 1.5.*\[0, 1\)"),
    "sgd momentum 1": ("sgd", {"momentum": 1.0}, r"invalid momentum 1.*\[0, 1\)"),
    "sgd negative momentum": ("sgd", {"momentum": -0.1}, r"invalid momentum -0.1"),
    "torch.optim.SGD momentum 1.5": (
        torch.optim.SGD,
        {"momentum": 1.5},
        r"invalid momentum 1.5.*\[0, 1\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_bad_inner_options_fail_at_construction(case: str) -> None:
    inner, options, message = BAD_OPTIONS[case]
    model = nn.Linear(3, 2)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    with pytest.raises(ValueError, match=message) as caught:
        im.ImplicitMetaOptimizer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            inner=inner,  # type: ignore[arg-type]
            inner_options=options,
        )
    assert "diverge" not in str(caught.value)  # a bad momentum is not a step-size problem
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k])


def test_good_inner_options_and_open_signatures_are_accepted() -> None:
    model = nn.Linear(3, 2)
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    im.ImplicitMetaOptimizer(model, outer, inner_options={"momentum": 0.9, "nesterov": True})
    im.ImplicitMetaOptimizer(model, outer, inner=torch.optim.LBFGS, inner_options={"max_iter": 1})

    def any_options(objective, params, *, steps, lr, **options):  # type: ignore[no-untyped-def]
        return params

    im.ImplicitMetaOptimizer(model, outer, inner=any_options, inner_options={"anything": 1})

    def needs_beta(objective, params, *, steps, lr, beta):  # type: ignore[no-untyped-def]
        return params

    with pytest.raises(ValueError, match="requires inner_options 'beta'"):
        im.ImplicitMetaOptimizer(model, outer, inner=needs_beta)
    im.ImplicitMetaOptimizer(model, outer, inner=needs_beta, inner_options={"beta": 0.5})


def test_load_state_dict_checks_inner_options_and_changes_nothing() -> None:
    model = nn.Linear(3, 2)
    batch = (torch.randn(6, 3), torch.arange(6) % 2)
    outer, meta = _trained(model, batch)
    state = meta.state_dict()
    state["settings"]["inner_options"] = {"momentun": 0.9}
    settings_before = meta.settings()
    before = _snapshot(model, outer)
    with pytest.raises(ValueError, match=r"'momentun'.*takes: momentum, nesterov"):
        meta.load_state_dict(state)
    assert meta.settings() == settings_before
    _assert_unchanged(before, model, outer)


# --- meta_backward_batch given one task's tensors ---------------------------------------------


def _conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


def _regressor() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))


def test_single_task_images_are_refused() -> None:
    # The mistake: one task's (x [N, C, H, W], y [N]); conv layers accept an unbatched
    # [C, H, W], so without the check every image would silently be a task of its own.
    model = _conv()
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = im.ImplicitMetaOptimizer(model, outer, inner_steps=1)
    x, y = torch.randn(6, 1, 4, 4), torch.arange(6) % 3
    before = _snapshot(model, outer)
    with pytest.raises(ValueError, match=r"single task's.*shape \(6,\).*num_tasks=6") as caught:
        meta.meta_backward_batch(ce, (x, y), (torch.randn(6, 1, 4, 4), y))
    assert "meta_backward(loss_fn, support, query)" in str(caught.value)
    _assert_unchanged(before, model, outer)


def test_single_task_regression_is_refused() -> None:
    model = _regressor()
    outer = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = im.ImplicitMetaOptimizer(model, outer, inner_steps=1, inner_lr=0.01)
    x = torch.randn(10, 1)
    before = _snapshot(model, outer)
    with pytest.raises(ValueError, match=r"every task would hold a single sample.*\(10, 1\)"):
        meta.meta_backward_batch(mse, (x, torch.sin(x)), (x, torch.cos(x)))
    _assert_unchanged(before, model, outer)


def test_real_batches_and_stated_task_counts_pass() -> None:
    model = _conv()
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), inner_steps=1
    )
    xs, ys = torch.randn(2, 6, 1, 4, 4), torch.arange(6).repeat(2, 1) % 3
    assert meta.meta_backward_batch(ce, (xs, ys), (xs, ys)).outer_loss.shape == (2,)
    # One sample per task, 1-way 1-shot style: allowed once the task count is stated.
    one = (torch.randn(2, 1, 1, 4, 4), torch.zeros(2, 1, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a 1-shot task's curvature, not the point
        assert meta.meta_backward_batch(ce, one, one, num_tasks=2).outer_loss.shape == (2,)
    with pytest.raises(ValueError, match="single sample"):
        meta.meta_backward_batch(ce, one, one)
    with pytest.raises(
        ValueError, match=r"num_tasks=3, but the batches' leading \(task\) dimension is 2"
    ):
        meta.meta_backward_batch(ce, (xs, ys), (xs, ys), num_tasks=3)
    regressor = _regressor()
    meta = im.ImplicitMetaOptimizer(
        regressor, torch.optim.SGD(regressor.parameters(), lr=0.1), inner_lr=0.01
    )
    xr = torch.randn(3, 10, 1)
    assert meta.meta_backward_batch(mse, (xr, xr.sin()), (xr, xr.cos())).outer_loss.shape == (3,)


# --- a float64 model with float32 data, a detached loss ---------------------------------------


def _float64_setup() -> tuple[nn.Module, torch.optim.Optimizer, im.ImplicitMetaOptimizer]:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    batch = (torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3)
    outer, meta = _trained(model, batch)
    return model, outer, meta


DTYPE_CALLS = {
    "meta_backward": lambda meta, s, q: meta.meta_backward(ce, s, q),
    "meta_backward_batch vmap": lambda meta, s, q: meta.meta_backward_batch(
        ce, _stack(s), _stack(q), strategy="vmap"
    ),
    "meta_backward_batch loop": lambda meta, s, q: meta.meta_backward_batch(
        ce, _stack(s), _stack(q), strategy="loop"
    ),
    "adapt": lambda meta, s, q: meta.adapt(ce, s),
}


def _stack(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    return batch[0].expand(2, *batch[0].shape), batch[1].expand(2, *batch[1].shape)


@pytest.mark.parametrize("call", list(DTYPE_CALLS))
def test_dtype_mismatch_is_named(call: str) -> None:
    model, outer, meta = _float64_setup()
    support = (torch.randn(6, 4), torch.arange(6) % 3)  # float32 data, float64 model
    before = _snapshot(model, outer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # not a reason for a vmap fallback
        with pytest.raises(ValueError, match=r"dtype mismatch.*float64.*support.*float32"):
            DTYPE_CALLS[call](meta, support, support)
    _assert_unchanged(before, model, outer)
    assert meta._vmap_failure is None


def test_query_dtype_mismatch_is_named() -> None:
    model, outer, meta = _float64_setup()
    support = (torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3)
    query = (torch.randn(6, 4), torch.arange(6) % 3)
    before = _snapshot(model, outer)
    for call in (
        lambda: meta.meta_backward(ce, support, query),
        lambda: meta.meta_backward_batch(ce, _stack(support), _stack(query), strategy="vmap"),
    ):
        with pytest.raises(ValueError, match=r"dtype mismatch.*query batch holds a float32"):
            call()
    _assert_unchanged(before, model, outer)


def test_a_model_that_casts_its_inputs_is_not_refused() -> None:
    class Casting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3).double()

        def forward(self, x: Tensor) -> Tensor:
            return self.lin(x.to(torch.float64))

    model = Casting()
    meta = im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    batch = (torch.randn(6, 4), torch.arange(6) % 3)
    assert torch.isfinite(meta.meta_backward(ce, batch, batch).outer_loss)


def _detached(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return ce(module, batch).detach()


DETACHED_CALLS = {
    "inner": (lambda meta, s: meta.meta_backward(_detached, s, s), "inner loss"),
    "outer": (
        lambda meta, s: meta.meta_backward(ce, s, s, outer_loss_fn=_detached),
        "outer loss",
    ),
    "inner batch vmap": (
        lambda meta, s: meta.meta_backward_batch(_detached, _stack(s), _stack(s), strategy="vmap"),
        "inner loss",
    ),
    "outer batch vmap": (
        lambda meta, s: meta.meta_backward_batch(
            ce, _stack(s), _stack(s), outer_loss_fn=_detached, strategy="vmap"
        ),
        "outer loss",
    ),
    "inner batch loop": (
        lambda meta, s: meta.meta_backward_batch(_detached, _stack(s), _stack(s), strategy="loop"),
        "inner loss",
    ),
}


@pytest.mark.parametrize("case", list(DETACHED_CALLS))
def test_detached_loss_is_named(case: str) -> None:
    model, outer, meta = _float64_setup()
    support = (torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 3)
    call, which = DETACHED_CALLS[case]
    before = _snapshot(model, outer)
    with pytest.raises(
        ValueError, match=rf"the {which} .*does not depend on the parameters.*grad_fn"
    ):
        call(meta, support)
    _assert_unchanged(before, model, outer)


# --- warnings point at the user's line and say what happened ---------------------------------


def test_vmap_fallback_warning_points_at_the_call() -> None:
    model = nn.Linear(4, 3).double()
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        inner="lbfgs",
        inner_steps=2,
        inner_lr=1.0,
    )
    batch = (torch.randn(2, 6, 4, dtype=torch.float64), torch.arange(6).repeat(2, 1) % 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        meta.meta_backward_batch(ce, batch, batch, strategy="vmap")
    fallback = [w for w in caught if "falls back to a loop" in str(w.message)]
    assert len(fallback) == 1
    assert fallback[0].filename == __file__


def test_forward_over_reverse_fallback_says_the_result_is_exact() -> None:
    # F.mse_loss has no usable forward-over-reverse rule under vmap ("ZeroTensors are
    # immutable"); the products fall back to reverse-over-reverse, which is exact.
    model = _regressor().double()
    x = torch.randn(3, 5, 1, dtype=torch.float64)
    batch = (x, torch.sin(x))
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), inner_lr=0.01, cg_steps=5
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batched = meta.meta_backward_batch(mse, batch, batch, reduction="sum", strategy="vmap")
    fallback = [w for w in caught if "reverse-over-reverse" in str(w.message)]
    assert fallback, [str(w.message) for w in caught]
    message = str(fallback[0].message)
    assert re.search(
        r"falling back to reverse-over-reverse, which computes the same products exactly", message
    )
    assert "meta-gradient is unaffected" in message
    assert message.index("exactly") < message.find("ZeroTensor")  # torch's words come last
    assert fallback[0].filename == __file__
    vmapped = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    meta.zero_grad()
    looped = meta.meta_backward_batch(mse, batch, batch, reduction="sum", strategy="loop")
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in model.parameters()]), vmapped)
    torch.testing.assert_close(looped.outer_loss, batched.outer_loss)


def test_concepts_page_does_not_claim_forward_over_reverse_composes_with_everything() -> None:
    text = (ROOT / "docs" / "concepts.md").read_text(encoding="utf-8")
    assert "composes with every transform" not in text
    assert "mse_loss" in text  # the counterexample is named


# --- torch.optim.LBFGS as inner solver: each step is up to max_iter iterations ----------------


def test_torch_lbfgs_step_runs_max_iter_iterations_and_the_docs_say_so() -> None:
    evaluations: list[int] = []

    def objective(params: dict[str, Tensor]) -> Tensor:
        evaluations.append(1)
        w = params["w"]
        return ((w - torch.arange(8.0, dtype=w.dtype)) ** 4).sum() + 0.5 * (w**2).sum()

    start = {"w": torch.zeros(8, dtype=torch.float64)}
    im.get_inner_solver("lbfgs")(objective, start, steps=2, lr=1.0)
    builtin = len(evaluations)
    evaluations.clear()
    im.torch_optimizer_solver(torch.optim.LBFGS)(objective, start, steps=2, lr=1.0)
    adapter = len(evaluations)
    assert adapter >= 10 * builtin, (adapter, builtin)  # 2 steps of up to 20 iterations each
    guide = (ROOT / "docs" / "guides" / "choosing-settings.md").read_text(encoding="utf-8")
    row = next(line for line in guide.splitlines() if line.startswith("| `torch.optim.<Name>`"))
    assert "max_iter" in row and "25" in row
    assert "max_iter" in (im.torch_optimizer_solver.__doc__ or "")
    assert "order of magnitude" in (im.torch_optimizer_solver.__doc__ or "")
