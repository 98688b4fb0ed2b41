"""Issue 20, items 7 and 8 (part): errors that name the fix, and a custom solver's ``inner_lr``.

Where torch raises for a batch the model cannot take, the library names the cause and the fix
(int64 labels, ``x.float() / 255``, ``meta_backward_batch``, labels outside the support's
classes, the device), keeps torch's error chained, and leaves parameters, gradients, buffers
and the outer optimizer's state bit-identical. A loss returning ``(aux, loss)`` is named as
swapped, not as detached. A custom solver gets its ``inner_lr`` checked like a registered one.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im
from implicit_meta._diagnostics import naming_batch_errors
from implicit_meta.models import Conv4

CE = im.output_loss(F.cross_entropy)
Batch = tuple[Tensor, Tensor]


def _plain_ce(module: nn.Module, batch: Batch) -> Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def _swapped(module: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    logits = module(batch[0])
    accuracy = (logits.argmax(1) == batch[1]).float().mean()
    return accuracy, F.cross_entropy(logits, batch[1])  # (aux, loss): the wrong order


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, im.ImplicitMetaOptimizer, Batch]:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    outer = torch.optim.Adam(model.parameters(), lr=1e-2)
    meta = im.ImplicitMetaOptimizer(model, outer, inner_steps=3)
    batch = (torch.randn(6, 4), torch.arange(6) % 3)
    # Real steps first, so that grads and Adam's state are non-trivial before the bad call.
    for _ in range(2):
        meta.zero_grad()
        meta.meta_backward(CE, batch, batch)
        meta.step()
    meta.meta_backward(CE, batch, batch)
    return model, outer, meta, batch


def _snapshot(model: nn.Module, outer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "optimizer": copy.deepcopy(outer.state_dict()),
    }


def _assert_unchanged(
    before: dict[str, Any], model: nn.Module, outer: torch.optim.Optimizer
) -> None:
    after = _snapshot(model, outer)
    for part in ("params", "grads", "buffers"):
        assert before[part].keys() == after[part].keys(), part
        for k, v in before[part].items():
            assert torch.equal(v, after[part][k]), f"{part} {k} changed"
    assert before["optimizer"]["param_groups"] == after["optimizer"]["param_groups"]
    for key, state in before["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(
                torch.as_tensor(value), torch.as_tensor(after["optimizer"]["state"][key][name])
            )


def _stack(batch: Batch, tasks: int = 2) -> Batch:
    return batch[0].expand(tasks, *batch[0].shape), batch[1].expand(tasks, *batch[1].shape)


# Each case: (support, query) from a good batch, what the message must say, torch's error type.
CASES: dict[str, tuple[Callable[[Batch], tuple[Batch, Batch]], str, type[Exception]]] = {
    "float labels": (
        lambda b: ((b[0], b[1].float()), (b[0], b[1].float())),
        r"int64.*support batch holds float32 labels.*y\.long\(\)",
        RuntimeError,
    ),
    "uint8 images": (
        lambda b: (((b[0].abs() * 50).to(torch.uint8), b[1]),) * 2,
        r"support batch holds a uint8 tensor.*float32.*x\.float\(\) / 255",
        RuntimeError,
    ),
    "query label outside the support's classes": (
        lambda b: (b, (b[0], torch.tensor([0, 1, 2, 3, 0, 1]))),
        r"label of the query batch \(3\) is outside the model's classes.*support's classes",
        IndexError,
    ),
}

CALLS: dict[str, Callable[[im.ImplicitMetaOptimizer, Any, Any, Any], object]] = {
    "meta_backward": lambda meta, loss, s, q: meta.meta_backward(loss, s, q),
    "meta_backward_batch loop": lambda meta, loss, s, q: meta.meta_backward_batch(
        loss, _stack(s), _stack(q), strategy="loop"
    ),
    "meta_backward_batch vmap": lambda meta, loss, s, q: meta.meta_backward_batch(
        loss, _stack(s), _stack(q), strategy="vmap"
    ),
    "meta.adapt": lambda meta, loss, s, q: meta.adapt(loss, s),
    "im.adapt": lambda meta, loss, s, q: im.adapt(meta.model, loss, s, reg=1.0, inner_steps=2),
}


# adapt sees no query batch.
CASE_CALLS = [(c, k) for c in CASES for k in CALLS if not (k.endswith("adapt") and "query" in c)]


@pytest.mark.parametrize(("case", "call"), CASE_CALLS)
@pytest.mark.parametrize("loss", [CE, _plain_ce], ids=["output_loss", "plain"])
def test_batch_errors_name_the_fix_and_change_nothing(case: str, call: str, loss: Any) -> None:
    model, outer, meta, batch = _setup()
    support, query = CASES[case][0](batch)
    message, cause = CASES[case][1], CASES[case][2]
    before = _snapshot(model, outer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # not a reason for a vmap fallback
        with pytest.raises(ValueError, match=message) as caught:
            CALLS[call](meta, loss, support, query)
    assert isinstance(caught.value.__cause__, cause)  # torch's error stays chained
    assert "(torch: " in str(caught.value)
    _assert_unchanged(before, model, outer)
    assert meta._vmap_failure is None


def test_a_label_out_of_range_in_a_later_task_is_named_under_vmap() -> None:
    model, outer, meta, batch = _setup()
    labels = _stack(batch, 3)[1].clone()
    labels[2, 0] = 3  # only the last task's query holds it
    before = _snapshot(model, outer)
    with pytest.raises(ValueError, match=r"label \(3\) is outside the model's classes"):
        meta.meta_backward_batch(CE, _stack(batch, 3), (_stack(batch, 3)[0], labels))
    _assert_unchanged(before, model, outer)
    assert meta._vmap_failure is None  # the user's error is not held against vmap


@pytest.mark.parametrize("call", ["meta_backward", "meta.adapt", "im.adapt"])
@pytest.mark.parametrize("loss", [CE, _plain_ce], ids=["output_loss", "plain"])
def test_a_meta_batch_given_as_one_task_points_to_meta_backward_batch(call: str, loss: Any) -> None:
    model, outer, meta, batch = _setup()
    tasks = _stack(batch, 4)
    before = _snapshot(model, outer)
    fix = "meta_backward_batch" if call == "meta_backward" else r"one task at a time.*x\[t\]"
    with pytest.raises(ValueError, match=rf"meta-batch of 4 tasks.*\(4, 6\).*{fix}") as caught:
        CALLS[call](meta, loss, tasks, tasks)
    assert isinstance(caught.value.__cause__, RuntimeError)
    _assert_unchanged(before, model, outer)


def test_a_meta_batch_of_images_given_as_one_task_is_named() -> None:
    model = Conv4(3, width=4)
    meta = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()), inner_steps=1)
    xs, ys = torch.randn(2, 6, 1, 28, 28), (torch.arange(6) % 3).repeat(2, 1)
    with pytest.raises(ValueError, match=r"meta-batch of 2 tasks.*meta_backward_batch"):
        meta.meta_backward(CE, (xs, ys), (xs, ys))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("call", list(CALLS))
def test_aux_and_loss_in_the_wrong_order_say_the_loss_comes_first(call: str) -> None:
    model, outer, meta, batch = _setup()
    before = _snapshot(model, outer)
    with pytest.raises(ValueError, match="first element must be the loss") as caught:
        CALLS[call](meta, _swapped, batch, batch)
    assert "detach" not in str(caught.value)
    _assert_unchanged(before, model, outer)
    # As the outer loss too, and the right order still works.
    if call == "meta_backward":
        with pytest.raises(ValueError, match=r"outer_loss_fn returned a pair.*first element"):
            meta.meta_backward(CE, batch, batch, outer_loss_fn=_swapped)
        _assert_unchanged(before, model, outer)
        meta.meta_backward(CE, batch, batch, outer_loss_fn=lambda m, b: _swapped(m, b)[::-1])


def test_a_device_mismatch_is_named_from_torchs_error() -> None:
    # No second device on a CPU machine: parameters on "meta" stand in for another device.
    theta = {"w": torch.zeros(3, 4, device="meta")}
    batch = (torch.randn(6, 4), torch.arange(6) % 3)
    raw = RuntimeError(
        "Expected all tensors to be on the same device, but found at least two devices, "
        "meta and cpu!"
    )
    with (
        pytest.raises(ValueError, match=r"device mismatch.*on meta.*support batch.*on cpu"),
        naming_batch_errors(theta, batch, None),
    ):
        raise raw
    # An error that does not mention devices is not blamed on them.
    with (
        pytest.raises(RuntimeError, match="something else"),
        naming_batch_errors(theta, batch, None),
    ):
        raise RuntimeError("something else")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_parameters_on_the_gpu_and_a_batch_on_the_cpu_are_named() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).cuda()
    outer = torch.optim.Adam(model.parameters())
    meta = im.ImplicitMetaOptimizer(model, outer, inner_steps=2)
    batch = (torch.randn(6, 4), torch.arange(6) % 3)
    for call in ("meta_backward", "meta_backward_batch loop", "meta_backward_batch vmap"):
        with pytest.raises(ValueError, match=r"device mismatch.*cuda:0.*support batch.*cpu"):
            CALLS[call](meta, CE, batch, batch)
    with pytest.raises(ValueError, match=r"device mismatch.*cuda:0.*cpu"):
        meta.adapt(CE, batch)
    assert all(p.grad is None for p in model.parameters())


# --- item 8 (part): a custom solver's inner_lr ------------------------------------------------


def _custom_solver(objective, params, *, steps, lr):  # type: ignore[no-untyped-def]
    for _ in range(steps):
        grads = torch.func.grad(objective)(params)
        params = {k: v - lr * grads[k] for k, v in params.items()}
    return params


BAD_LRS = {
    "zero": (0.0, "inner_lr must be positive"),
    "negative": (-0.1, "inner_lr must be positive"),
    "nan": (math.nan, "inner_lr must be finite"),
    "inf": (math.inf, "inner_lr must be finite"),
}


@pytest.mark.parametrize("lr", list(BAD_LRS))
@pytest.mark.parametrize(
    "solver", [_custom_solver, "registered", torch.optim.Adam], ids=["function", "name", "class"]
)
def test_a_custom_solvers_inner_lr_is_checked(solver: Any, lr: str) -> None:
    value, message = BAD_LRS[lr]
    name = "traps_custom_solver"
    if solver == "registered":
        im.register_inner_solver(name)(_custom_solver)
        solver = name
    try:
        model = nn.Linear(4, 3)
        batch = (torch.randn(6, 4), torch.arange(6) % 3)
        with pytest.raises(ValueError, match=message):
            im.ImplicitMetaOptimizer(
                model, torch.optim.SGD(model.parameters(), 0.1), inner=solver, inner_lr=value
            )
        with pytest.raises(ValueError, match=message):
            im.adapt(model, CE, batch, reg=1.0, inner=solver, inner_lr=value)
        with pytest.raises(ValueError, match=message):
            im.InnerProblem(solver=solver, lr=value)
        # Loading saved settings checks it too, and changes nothing when it refuses.
        outer = torch.optim.Adam(model.parameters())
        meta = im.ImplicitMetaOptimizer(model, outer, inner=solver, inner_steps=2)
        meta.meta_backward(CE, batch, batch)
        meta.step()
        state = meta.state_dict()
        state["settings"]["inner_lr"] = value
        snapshot = _snapshot(model, outer)
        with pytest.raises(ValueError, match=message):
            meta.load_state_dict(state)
        _assert_unchanged(snapshot, model, outer)
        assert meta.problem.lr == 0.1
    finally:
        if name in im.list_inner_solvers():
            im.unregister_inner_solver(name)
