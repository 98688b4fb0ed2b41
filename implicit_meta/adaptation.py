"""Adapting a model to one task: the inner solve alone, with no outer optimizer and no copy.

At test time a meta-trained model is adapted to each new task and then only evaluated. That
needs the inner solver and its settings, nothing of the meta-gradient: :func:`adapt` takes
them directly, and returns an :class:`AdaptedModel` that calls the model at the adapted
parameters with :func:`torch.func.functional_call`, so no episode deep-copies the model. It
also says how well the inner problem was solved (its stationarity), which is how far the
adapted parameters are from the ``phi*`` the theory assumes.
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from implicit_meta._diagnostics import eval_mode_warning, naming_batch_errors
from implicit_meta._partial_task import (
    HeadSplit,
    find_head_split,
    head_inner_loss,
    head_split_mismatch,
)
from implicit_meta.functional._stack import user_stacklevel
from implicit_meta.functional.adjoint import stationarity
from implicit_meta.functional.grad import grad_and_value
from implicit_meta.functional.implicit import safe_ratio, solve_inner, start_gradient
from implicit_meta.functional.tree import Params, tree_norm
from implicit_meta.losses import OutputLoss, split_batch
from implicit_meta.module_losses import LossFn, check_batch, functional_loss, split_state
from implicit_meta.problem import (
    SHORTHANDS,
    AdaptSpec,
    InnerProblem,
    adapted_parameter_names,
    resolve_problem,
)
from implicit_meta.solvers.resolve import InnerSpec


@dataclass(frozen=True)
class AdaptedModel:
    """A model at the parameters adapted to one task; call it like the model.

    Calling it runs ``model`` at :attr:`params` (and the model's own frozen parameters) with
    :func:`torch.func.functional_call`: the model is neither copied nor changed, and buffers
    start from the model's values on every call (BatchNorm updates made in train mode are
    discarded). The model's current train/eval mode applies. :attr:`stationarity` and
    :attr:`relative_stationarity` are computed when first read (a gradient each), so
    evaluation that only calls the model pays nothing for them.

    Attributes:
        model: The model adapted (unchanged).
        params: The adapted trainable parameters ``phi*``, detached, by name.
        inner_loss: ``L_in(phi*)`` on the support batch (detached).
    """

    model: nn.Module
    params: Params
    inner_loss: Tensor
    _theta: Params = field(repr=False)
    _frozen: Params = field(repr=False)
    _buffers: Params = field(repr=False)
    _objective: Callable[[Params], Tensor] = field(repr=False)
    _reg: float = field(repr=False)

    @functools.cached_property
    def stationarity(self) -> Tensor:
        """``||grad L_in(phi*) + reg (phi* - theta)||`` (detached), zero at the inner optimum."""
        gradient, _ = grad_and_value(self._objective, self.params)
        return stationarity(gradient, self.params, self._theta, self._reg)

    @functools.cached_property
    def relative_stationarity(self) -> Tensor:
        """``stationarity / ||grad L_in(theta)||``, the inner problem's progress.

        Well below 1 when the inner problem was solved, near 1 when it was barely started,
        above 1 when it diverged.
        """
        start = start_gradient(self._objective, self._theta)
        return safe_ratio(self.stationarity, tree_norm(start).detach())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's output at the adapted parameters.

        Args:
            *args: Positional inputs of the model's ``forward``.
            **kwargs: Keyword inputs of the model's ``forward``.

        Returns:
            What the model's ``forward`` returns.
        """
        state = {**self.params, **self._frozen}
        state.update({name: buffer.clone() for name, buffer in self._buffers.items()})
        return torch.func.functional_call(self.model, state, args, kwargs, strict=False)

    def to_module(self) -> nn.Module:
        """An independent copy of the model with the adapted parameters loaded.

        For code that needs an ``nn.Module`` of its own (to fine-tune it further, save it, or
        keep BatchNorm statistics across calls); evaluation needs only :meth:`__call__`.

        Returns:
            A deep copy of the model at ``phi*``, without gradients.
        """
        adapted = copy.deepcopy(self.model)
        with torch.no_grad():
            for name, param in adapted.named_parameters():
                if name in self.params:
                    param.copy_(self.params[name])
                param.grad = None
        return adapted


def adapt_with_solver(
    model: nn.Module,
    loss_fn: LossFn,
    support: Any,
    problem: InnerProblem,
    adapted: tuple[str, ...],
    split: HeadSplit | None = None,
) -> AdaptedModel:
    """:func:`adapt` with a validated problem and resolved names (what the meta-optimizer calls).

    Args:
        model: The model to adapt (its adapted parameters are ``theta``).
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``.
        support: The task's support batch.
        problem: The inner problem (``reg``, solver, steps, rate, options).
        adapted: The names of the parameters that adapt; the other trainable ones stay.
        split: The model's head split, when the adapted parameters are its classifier and
            ``loss_fn`` is an :func:`~implicit_meta.output_loss`: the body then runs once.

    Returns:
        The adapted model.

    Raises:
        ValueError: For an empty batch, a loss that is not a scalar or does not depend on the
            parameters, or a non-finite inner loss at the adapted parameters.
        TypeError: If ``loss_fn`` is not callable.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    check_batch(support, "support")
    trainable, frozen, buffers = split_state(model)
    theta = {k: trainable[k] for k in adapted}
    constants = {**frozen, **{k: v for k, v in trainable.items() if k not in theta}}
    inner_loss: Callable[[Params], Tensor]
    if split is not None and isinstance(loss_fn, OutputLoss):
        inputs, targets = split_batch(support)
        state = {**constants, **theta, **{k: v.clone() for k, v in buffers.items()}}
        with torch.no_grad():
            features = split.features(state, inputs)
        head_constants = {k: v for k, v in frozen.items() if k.startswith(split.prefix)}
        head_loss = head_inner_loss(split, loss_fn, features, targets)

        def inner_loss(params: Params) -> Tensor:
            return head_loss({**head_constants, **params})
    else:
        inner_loss = functional_loss(model, loss_fn, support, constants, buffers, "loss_fn")
    phi = solve_inner(
        inner_loss,
        theta,
        problem.solver_fn,
        reg=problem.reg,
        steps=problem.steps or 0,
        lr=float(problem.lr or 0.0),
        solver_options=dict(problem.options or {}),
        compile_objective=problem.compile,
    )
    with torch.no_grad():
        value = inner_loss(phi)
    if not bool(torch.isfinite(value)):
        raise ValueError(f"the inner loss is not finite ({float(value)}) at the adapted parameters")
    return AdaptedModel(
        model=model,
        params={name: tensor.detach() for name, tensor in phi.items()},
        inner_loss=value.detach(),
        _theta=theta,
        _frozen=constants,
        _buffers=buffers,
        _objective=inner_loss,
        _reg=problem.reg,
    )


def adapt(
    model: nn.Module,
    loss_fn: LossFn,
    support: Any,
    *,
    reg: float | None = None,
    inner: InnerSpec | None = None,
    inner_steps: int | None = None,
    inner_lr: float | None = None,
    inner_options: Mapping[str, Any] | None = None,
    adapt: AdaptSpec | None = None,
) -> AdaptedModel:
    """Adapt ``model`` to one task's support batch with an inner solver, nothing else.

    Solves ``argmin_phi L_in(phi) + reg/2 ||phi - theta||^2`` from ``theta`` (the model's
    adapted parameters) as :class:`~implicit_meta.ImplicitMetaOptimizer` does in
    meta-training, with the same solvers and checks, but without an outer optimizer or a
    meta-gradient: the test-time half of iMAML. The model is not changed.

    A model in eval mode with BatchNorm layers that keep running statistics is adapted with
    those statistics, which meta-training never updates; that warns (``RuntimeWarning``), since
    such a model should be adapted in training mode (``model.train()``).

    Args:
        model: The (meta-trained) model.
        loss_fn: ``loss_fn(module, batch) -> scalar tensor`` on the support batch.
        support: The task's support batch.
        reg: Proximal strength ``lambda > 0``, as in meta-training (default: 1, or 0.5
            when only part of the model adapts; see :class:`~implicit_meta.InnerProblem`).
        inner: A registered solver name, a solver function or a ``torch.optim.Optimizer``
            subclass (see :class:`~implicit_meta.InnerProblem`; default ``"sgd"``, or
            ``"newton"`` when only part of the model adapts).
        inner_steps: Inner steps (default 5, or 8 Newton steps for a part).
        inner_lr: Inner learning rate (default 0.1, or 1.0 for Newton steps).
        inner_options: Extra keyword arguments for the solver.
        adapt: Which parameters adapt (see :attr:`~implicit_meta.InnerProblem.adapt`); the
            others keep their values.

    Returns:
        The adapted model, with its stationarity.

    Raises:
        ValueError: For an invalid setting, an unknown solver or option, an SGD step that
            diverges on the proximal term, an ``adapt`` that selects nothing, an empty batch,
            a batch the model cannot take (the message names the fix: float labels, uint8
            images, a meta-batch of several tasks, ...), or a non-finite inner loss.
        TypeError: If an argument has the wrong type.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import implicit_meta as im
        >>> model = torch.nn.Linear(2, 1)
        >>> batch = (torch.randn(8, 2), torch.randn(8, 1))
        >>> mse = lambda m, b: F.mse_loss(m(b[0]), b[1])
        >>> adapted = im.adapt(model, mse, batch, reg=1.0, inner="lbfgs", inner_steps=50,
        ...                    inner_lr=1.0)
        >>> adapted(batch[0]).shape, float(adapted.relative_stationarity) < 1e-3
        (torch.Size([8, 1]), True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shorthands = {
        "adapt": adapt,
        "reg": reg,
        "inner": inner,
        "inner_steps": inner_steps,
        "inner_lr": inner_lr,
        "inner_options": inner_options,
    }
    problem = resolve_problem(None, {SHORTHANDS[k]: v for k, v in shorthands.items()})
    adapted = adapted_parameter_names(model, problem.adapt)
    mode_warning = eval_mode_warning(model)
    if mode_warning is not None:
        warnings.warn(mode_warning, RuntimeWarning, stacklevel=user_stacklevel())
    trainable, frozen, buffers = split_state(model)
    with naming_batch_errors(trainable, support, None, call="adapt"):
        split = find_head_split(model, adapted) if problem.partial else None
        if split is not None and isinstance(loss_fn, OutputLoss):
            state = {**trainable, **frozen, **buffers}
            if head_split_mismatch(split, state, split_batch(support)[0]) is not None:
                split = None  # the whole model per inner step: exact for any forward
        return adapt_with_solver(model, loss_fn, support, problem, adapted, split)
