"""Issue 20, items 1, 2, 5 and 8 (part): silent traps that now warn, and "how" that stays "how".

1. A model whose BatchNorm tracks running statistics, adapted or meta-trained in eval mode,
   warns once per meta-optimizer, naming ``model.train()``; Conv4 (``track_running_stats=False``)
   behaves alike in both modes and does not warn.
2. An inner solve that ends farther from stationary than it started (relative stationarity
   above 1) warns once, naming ``inner_lr``.
5. ``hvp=`` or ``cg_tol=`` alone keep the first-order default; ``describe()`` says what ``C`` is.
8. An outer optimizer over part of the trainable parameters warns at construction, naming
   ``adapt=``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im
from implicit_meta.functional import CGStatus, ImplicitAdjoint
from implicit_meta.models import Conv4

CE = im.output_loss(F.cross_entropy)


def _plain_ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def _bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _task() -> tuple[Any, Any]:
    return (torch.randn(9, 4), torch.arange(9) % 3), (torch.randn(9, 4), torch.arange(9) % 3)


def _tasks(count: int = 3) -> tuple[Any, Any]:
    xs, ys = torch.randn(count, 9, 4), (torch.arange(9) % 3).repeat(count, 1)
    return (xs, ys), (xs + 0.1, ys)


def _meta(model: nn.Module, **kw: Any) -> im.ImplicitMetaOptimizer:
    settings: dict[str, Any] = {"inner_steps": 3, "inner_lr": 0.1}
    settings.update(kw)
    return im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), 0.1), **settings)


# --- item 1: eval-mode BatchNorm ------------------------------------------------------------

CALLS: dict[str, Callable[[im.ImplicitMetaOptimizer], object]] = {
    "meta_backward": lambda meta: meta.meta_backward(CE, *_task()),
    "meta_backward_batch loop": lambda meta: meta.meta_backward_batch(
        CE, *_tasks(), strategy="loop"
    ),
    "meta_backward_batch vmap": lambda meta: meta.meta_backward_batch(
        CE, *_tasks(), strategy="vmap"
    ),
    "meta.adapt": lambda meta: meta.adapt(CE, _task()[0]),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_eval_mode_batchnorm_warns_once_naming_model_train(call: str) -> None:
    model = _bn_mlp().eval()
    meta = _meta(model)
    with pytest.warns(RuntimeWarning, match=r"eval mode.*BatchNorm1d.*model\.train\(\)") as caught:
        CALLS[call](meta)
    assert caught[0].filename == __file__  # at the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once per optimizer, across calls
        for again in CALLS.values():
            again(meta)


def test_im_adapt_in_eval_mode_warns_naming_model_train() -> None:
    model = _bn_mlp().eval()
    with pytest.warns(RuntimeWarning, match=r"eval mode.*model\.train\(\)") as caught:
        im.adapt(model, CE, _task()[0], reg=1.0, inner_steps=3)
    assert caught[0].filename == __file__


@pytest.mark.parametrize("call", list(CALLS))
def test_train_mode_and_conv4_in_eval_mode_do_not_warn(call: str) -> None:
    bn = _bn_mlp().train()
    conv4 = Conv4(3, width=4).eval()  # track_running_stats=False: the same in both modes
    frozen_stats = _bn_mlp()
    frozen_stats[1].eval()  # the user's choice for one layer, the model itself in train mode
    x = torch.randn(3, 9, 1, 28, 28)
    y = (torch.arange(9) % 3).repeat(3, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        CALLS[call](_meta(bn))
        CALLS[call](_meta(frozen_stats))
        meta = _meta(conv4, inner_steps=1)
        if call == "meta_backward":
            meta.meta_backward(CE, (x[0], y[0]), (x[1], y[1]))
        elif call == "meta.adapt":
            meta.adapt(CE, (x[0], y[0]))
        else:
            meta.meta_backward_batch(CE, (x, y), (x, y), strategy=call.split()[-1])
        im.adapt(conv4, CE, (x[0], y[0]), reg=1.0, inner_steps=1)
        im.adapt(bn, CE, _task()[0], reg=1.0, inner_steps=1)


# --- item 2: an inner solve that diverges but stays finite ------------------------------------


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))


def test_diverging_inner_solve_warns_once_naming_inner_lr() -> None:
    model = _mlp()
    meta = _meta(model, inner="adam", inner_lr=50.0, inner_steps=5)
    with pytest.warns(RuntimeWarning, match=r"moved away from its solution.*inner_lr") as caught:
        result = meta.meta_backward(CE, *_task())
    assert float(result.relative_stationarity) > 1
    assert f"{float(result.relative_stationarity):.3g}" in str(caught[0].message)
    assert caught[0].filename == __file__
    assert model[0].weight.grad is not None  # a warning: the gradient is still written
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # once per optimizer
        meta.meta_backward(CE, *_task())


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_diverging_tasks_of_a_meta_batch_are_counted(strategy: str) -> None:
    meta = _meta(_mlp(), inner="adam", inner_lr=50.0, inner_steps=5)
    with pytest.warns(RuntimeWarning, match="inner_lr") as caught:
        result = meta.meta_backward_batch(CE, *_tasks(3), strategy=strategy)
    diverged = int((result.relative_stationarity > 1).sum())
    assert diverged > 0
    ours = [str(w.message) for w in caught if "inner_lr" in str(w.message)]
    assert len(ours) == 1 and f"in {diverged} of 3 tasks" in ours[0]


@pytest.mark.parametrize("settings", [{}, {"inner_steps": 0}, {"inner_steps": 0, "cg_steps": 3}])
def test_solves_that_do_not_diverge_do_not_warn(settings: dict[str, Any]) -> None:
    meta = _meta(_mlp(), **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        result = meta.meta_backward(CE, *_task())
        batch = meta.meta_backward_batch(CE, *_tasks(3), strategy="loop")
    # inner_steps=0 gives phi = theta: exactly 1, no progress, not a divergence.
    assert float(result.relative_stationarity) <= 1
    assert bool((batch.relative_stationarity <= 1).all())


# --- item 5: how to compute does not change what is computed ----------------------------------


@pytest.mark.parametrize(
    "how", [{"hvp": "forward_over_reverse"}, {"cg_tol": 1e-6}, {"hvp": "reverse_over_reverse"}]
)
def test_hvp_or_cg_tol_alone_keep_the_first_order_default(how: dict[str, Any]) -> None:
    assert ImplicitAdjoint(**how).first_order
    assert ImplicitAdjoint(cg_steps=0, **how).first_order  # accepted, no effect
    torch.manual_seed(1)
    model = _mlp()
    reference = _mlp()
    reference.load_state_dict(model.state_dict())
    meta = _meta(model, **how)
    assert meta.adjoint.first_order and meta.adjoint.cg_steps == 0
    result = meta.meta_backward(CE, *_task_seeded())
    assert result.status == CGStatus.FIRST_ORDER
    _meta(reference).meta_backward(CE, *_task_seeded())
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    # Beside a named system they do what they say.
    assert ImplicitAdjoint(curvature="hessian", **how).cg_steps == 5


def _task_seeded() -> tuple[Any, Any]:
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(9, 4, generator=generator)
    return (x, torch.arange(9) % 3), (x + 0.1, torch.arange(9) % 3)


def test_describe_says_what_auto_and_custom_curvatures_are() -> None:
    auto = ImplicitAdjoint(reg=2.0, cg_steps=5).describe()
    assert auto.startswith("I + C/2, CG 5")
    assert "Gauss-Newton" in auto and "output_loss" in auto and "Hessian" in auto
    custom = ImplicitAdjoint(curvature=lambda loss, phi: lambda v: v, cg_steps=2).describe()
    assert custom.startswith("I + C/1, CG 2") and "custom" in custom  # reg 1 by default
    assert ImplicitAdjoint(reg=2.0, curvature="hessian", cg_steps=5).describe() == "I + H/2, CG 5"
    assert ImplicitAdjoint(reg=2.0, curvature="gauss_newton").describe() == "I + G/2, CG 5"


def test_curvature_warning_names_the_curvature_auto_resolved_to() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).double()
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        inner_steps=2,
        inner_lr=0.05,
        adjoint=ImplicitAdjoint(reg=0.1, cg_steps=20),  # "auto": the Hessian of a plain loss
    )
    x = torch.randn(4, 6, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(6).repeat(4, 1) % 3
    with pytest.warns(RuntimeWarning, match="not positive definite") as caught:
        meta.meta_backward_batch(_plain_ce, (x, y), (x, y), strategy="loop")
    text = " ".join(str(w.message) for w in caught)
    assert "I + H/0.1, CG 20 is not positive definite" in text


# --- item 8: an outer optimizer over part of the parameters -----------------------------------


def test_outer_optimizer_over_part_of_the_parameters_warns_naming_adapt() -> None:
    model = _mlp()
    with pytest.warns(RuntimeWarning, match=r"holds 2 of the model's 4.*adapt=") as caught:
        meta = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model[2].parameters()))
    assert len(caught) == 1 and caught[0].filename == __file__
    assert "'0.weight', '0.bias'" in str(caught[0].message)
    assert "adapt='head'" in str(caught[0].message)
    meta.meta_backward(CE, *_task())  # still accepted: the body gets .grad, never an update
    assert model[0].weight.grad is not None


def test_every_trainable_parameter_held_or_frozen_does_not_warn() -> None:
    model = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()))
        im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()), adapt=["2"])
        model[0].requires_grad_(False)  # frozen: a constant, not a meta-parameter
        im.ImplicitMetaOptimizer(model, torch.optim.Adam(model[2].parameters()))
        im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()))
