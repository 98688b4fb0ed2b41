"""One meta-step's plan: what a call of the meta-optimizer resolves once, then uses throughout.

A call of :meth:`~implicit_meta.ImplicitMetaOptimizer.meta_backward` or
:meth:`~implicit_meta.ImplicitMetaOptimizer.meta_backward_batch` splits the model's state once,
resolves the adjoint's curvature once for its inner loss, and chooses one task function (the
whole model, a head on a shared body, or the general split of
:mod:`implicit_meta._partial_task`). The result is a frozen :class:`MetaStepPlan` that every
task of the call runs with, so no setting is looked up twice and no check has side effects.
:func:`adapt_task` is the same for :meth:`~implicit_meta.ImplicitMetaOptimizer.adapt`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from implicit_meta._batch_strategy import loop_over_tasks, vmap_over_tasks
from implicit_meta._diagnostics import naming_batch_errors
from implicit_meta._partial_task import (
    HeadSplit,
    TaskFn,
    find_head_split,
    general_task,
    head_losses,
    head_split_mismatch,
    head_task,
    solver_settings,
)
from implicit_meta.adaptation import AdaptedModel, adapt_with_solver
from implicit_meta.functional.adjoint import ImplicitAdjoint
from implicit_meta.functional.curvature import resolve_curvature
from implicit_meta.functional.implicit import TaskGradient, task_meta_gradient
from implicit_meta.functional.tree import Params
from implicit_meta.losses import split_batch
from implicit_meta.module_losses import (
    LossFn,
    check_batch,
    functional_inner_loss,
    functional_loss,
    functional_loss_and_aux,
    split_state,
)
from implicit_meta.problem import InnerProblem
from implicit_meta.result import MetaBackwardResult

HeadSplitFn = Callable[[Mapping[str, Tensor], Any], HeadSplit | None]
"""``head_split(state, support)``: the head split in use (checked once per optimizer)."""


@dataclass(frozen=True)
class MetaStepPlan:
    """What the tasks of one call run with, resolved once (built by :func:`plan_meta_step`).

    Attributes:
        model: The model.
        losses: ``(loss_fn, outer_loss_fn)``, the latter ``None`` when it is ``loss_fn``.
        batches: One task's ``(support, query)``: the call's, or the first of a batch.
        call: The library call, which batch errors name.
        theta: The trainable parameters (the meta-parameters), by name.
        frozen: The parameters with ``requires_grad=False``, used as constants.
        buffers: The model's buffers (every evaluation starts from a copy).
        adjoint: The linear solve, its curvature resolved for this call's inner loss
            (``"auto"`` made concrete; unchanged when first-order).
        one_task: ``one_task(support, query, buffers, theta)``, one task's meta-gradient.
    """

    model: nn.Module
    losses: tuple[LossFn, LossFn | None]
    batches: tuple[Any, Any]
    call: str
    theta: Params
    frozen: Params
    buffers: Params
    adjoint: ImplicitAdjoint
    one_task: TaskFn

    @property
    def device(self) -> torch.device:
        """The device of the meta-parameters."""
        return next(iter(self.theta.values())).device

    def batch_errors(
        self, errors: tuple[type[Exception], ...] = (RuntimeError, IndexError)
    ) -> AbstractContextManager[None]:
        """:func:`~implicit_meta._diagnostics.naming_batch_errors` for this call's batches.

        Args:
            errors: The exception types to name.

        Returns:
            The context manager.
        """
        return naming_batch_errors(self.theta, *self.batches, call=self.call, errors=errors)

    def solve(self) -> TaskGradient:
        """The meta-gradient of the task in :attr:`batches` (what ``meta_backward`` solves).

        Returns:
            The task's gradient and diagnostics.
        """
        # No separate check pass: the losses validate themselves on their first evaluation,
        # the gradient at theta; a batch the model cannot take is named when torch trips.
        with self.batch_errors():
            return self.one_task(*self.batches, self.buffers, self.theta)

    def check_losses(self) -> None:
        """Evaluate both losses at ``theta`` on :attr:`batches`, outside any transform.

        A loss that is not a scalar or not a tensor, or a batch of the wrong dtype, then fails
        with its own message rather than deep inside a solver, or (under vmap) as a reason to
        fall back to the loop.
        """
        (loss_fn, outer_loss_fn), (support, query) = self.losses, self.batches
        outer_name = "outer_loss_fn" if outer_loss_fn is not None else "loss_fn"
        state = (self.frozen, self.buffers)
        with self.batch_errors():
            functional_loss(self.model, loss_fn, support, *state, "loss_fn")(self.theta)
            outer = functional_loss(self.model, outer_loss_fn or loss_fn, query, *state, outer_name)
            outer(self.theta)

    def vmap_tasks(
        self, support: Any, query: Any, count: int
    ) -> tuple[TaskGradient | None, str | None]:
        """The ``count`` tasks solved together under ``torch.func.vmap``, or why that failed.

        Args:
            support: Support batches, tensors shaped ``[T, ...]``.
            query: Query batches, tensors shaped ``[T, ...]``.
            count: The number of tasks ``T``.

        Returns:
            ``(tasks, None)``, or ``(None, reason)`` when vmap raised (a reason to loop).

        Raises:
            torch.OutOfMemoryError: Out of memory is not "unsupported": the loop is no answer.
        """
        try:
            # A label out of range in a later task is the user's error, not vmap's.
            with self.batch_errors((IndexError,)):
                args = (self.one_task, support, query, self.theta, self.buffers, count)
                return vmap_over_tasks(*args), None
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, NotImplementedError) as error:
            return None, f"{type(error).__name__}: {str(error).splitlines()[0]}"

    def loop_tasks(self, support: Any, query: Any, count: int) -> TaskGradient:
        """The ``count`` tasks solved one after the other.

        Args:
            support: Support batches, tensors shaped ``[T, ...]``.
            query: Query batches, tensors shaped ``[T, ...]``.
            count: The number of tasks ``T``.

        Returns:
            The tasks' results, stacked.
        """
        with self.batch_errors():
            return loop_over_tasks(self.one_task, support, query, self.theta, self.buffers, count)


def split_trainable(model: nn.Module) -> tuple[Params, Params, Params]:
    """The model's trainable parameters, frozen parameters and buffers (one ``split_state``).

    Args:
        model: The model.

    Returns:
        ``(theta, frozen, buffers)``.

    Raises:
        ValueError: If no parameter has ``requires_grad=True``.
    """
    theta, frozen, buffers = split_state(model)
    if not theta:
        raise ValueError("the model has no trainable parameters (none has requires_grad=True)")
    return theta, frozen, buffers


def resolved_adjoint(
    adjoint: ImplicitAdjoint,
    model: nn.Module,
    loss_fn: LossFn,
    support: Any,
    frozen: Params,
    buffers: Params,
) -> ImplicitAdjoint:
    """``adjoint`` with its curvature resolved for ``loss_fn`` (nothing is evaluated).

    Before any solve: Gauss-Newton asked of a plain ``loss_fn`` fails here, with the fix.
    The tasks then get a concrete curvature, which the solve keeps as it is.

    Args:
        adjoint: The adjoint.
        model: The model.
        loss_fn: The inner loss.
        support: A support batch.
        frozen: Parameters used as constants.
        buffers: The model's buffers.

    Returns:
        The adjoint with a concrete curvature (``adjoint`` itself when first-order or already
        concrete).

    Raises:
        ValueError: If the curvature does not fit the loss (see
            :func:`~implicit_meta.functional.resolve_curvature`).
    """
    if adjoint.first_order:
        return adjoint
    inner_loss = functional_inner_loss(model, loss_fn, support, frozen, buffers)
    concrete = resolve_curvature(adjoint.curvature, inner_loss)
    if concrete is adjoint.curvature:
        return adjoint
    return adjoint.replace(curvature=concrete, cg_steps=adjoint.cg_steps)


def check_head_split(
    model: nn.Module, adapted: tuple[str, ...], state: Mapping[str, Tensor], support: Any
) -> tuple[HeadSplit | None, str | None]:
    """The head split of ``model``, checked on a batch: is ``model(x)`` the head of the body?

    Args:
        model: The model.
        adapted: The adapted parameters' names.
        state: The model's parameters and buffers by name.
        support: A support batch (its inputs are evaluated once, without gradients).

    Returns:
        ``(split, None)`` when the split holds; ``(None, reason)`` when the model has the split
        but its forward is not it (the general split, exact, is used then); ``(None, None)``
        when the model has no split for ``adapted``.
    """
    split = find_head_split(model, adapted)
    if split is None:
        return None, None
    reason = head_split_mismatch(split, state, split_batch(support)[0])
    return (None, reason) if reason is not None else (split, None)


def whole_task(
    model: nn.Module,
    loss_fn: LossFn,
    outer_loss_fn: LossFn,
    outer_name: str,
    frozen: Params,
    problem: InnerProblem,
    adjoint: ImplicitAdjoint,
) -> TaskFn:
    """One task's function when every trainable parameter adapts.

    Args:
        model: The model.
        loss_fn: The inner loss.
        outer_loss_fn: The outer loss.
        outer_name: Its name, for messages.
        frozen: Parameters with ``requires_grad=False``.
        problem: The inner problem.
        adjoint: The linear solve.

    Returns:
        ``one_task(support, query, buffers, theta)``.
    """

    def one_task(support: Any, query: Any, buffers: Params, theta: Params) -> TaskGradient:
        inner_loss = functional_inner_loss(model, loss_fn, support, frozen, buffers, "loss_fn")
        outer_loss = functional_loss_and_aux(
            model, outer_loss_fn, query, frozen, buffers, outer_name
        )
        return task_meta_gradient(
            inner_loss, outer_loss, theta, problem.solver_fn, adjoint, **solver_settings(problem)
        )

    return one_task


def plan_meta_step(
    model: nn.Module,
    problem: InnerProblem,
    adjoint: ImplicitAdjoint,
    adapted: tuple[str, ...],
    losses: tuple[LossFn, LossFn | None],
    batches: tuple[Any, Any],
    head_split: HeadSplitFn,
    call: str,
) -> MetaStepPlan:
    """Check the inputs, split the state, resolve the curvature, choose the task function.

    Args:
        model: The model.
        problem: The inner problem.
        adjoint: The linear solve, with the problem's ``reg``.
        adapted: The adapted parameters' names.
        losses: ``(loss_fn, outer_loss_fn)``, the latter ``None`` when it is ``loss_fn``.
        batches: One task's ``(support, query)``, for the curvature and the head split.
        head_split: Where the head split is asked for (only for a partial problem whose two
            losses are :func:`~implicit_meta.output_loss` losses).
        call: The library call, for the names of batch errors.

    Returns:
        The plan.

    Raises:
        TypeError: If ``loss_fn`` is not callable.
        ValueError: For an empty batch, a model without trainable parameters, a curvature
            that does not fit the loss, or a batch the model cannot take (named as in
            ``meta_backward``).
    """
    loss_fn, outer_loss_fn = losses
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    check_batch(batches[0], "support")
    check_batch(batches[1], "query")
    outer = outer_loss_fn or loss_fn
    outer_name = "outer_loss_fn" if outer_loss_fn is not None else "loss_fn"
    theta, frozen, buffers = split_trainable(model)
    adjoint = resolved_adjoint(adjoint, model, loss_fn, batches[0], frozen, buffers)
    head = head_losses(loss_fn, outer) if problem.partial else None
    split = None
    if head is not None:
        with naming_batch_errors(theta, *batches, call=call):
            split = head_split({**theta, **frozen, **buffers}, batches[0])
    if not problem.partial:
        one_task = whole_task(model, loss_fn, outer, outer_name, frozen, problem, adjoint)
    elif split is not None and head is not None:
        one_task = head_task(split, *head, outer_name, frozen, problem, adjoint)
    else:
        one_task = general_task(
            model, loss_fn, outer, outer_name, adapted, frozen, problem, adjoint
        )
    return MetaStepPlan(model, losses, batches, call, theta, frozen, buffers, adjoint, one_task)


def adapt_task(
    model: nn.Module,
    problem: InnerProblem,
    adapted: tuple[str, ...],
    loss_fn: LossFn,
    support: Any,
    head_split: HeadSplitFn,
) -> AdaptedModel:
    """The model adapted to ``support`` (what ``ImplicitMetaOptimizer.adapt`` returns).

    Args:
        model: The model.
        problem: The inner problem.
        adapted: The adapted parameters' names.
        loss_fn: The inner loss.
        support: The task's support batch.
        head_split: Where the head split is asked for (as in :func:`plan_meta_step`).

    Returns:
        The adapted model.

    Raises:
        ValueError: As :func:`~implicit_meta.adaptation.adapt_with_solver`, with a batch the
            model cannot take named.
    """
    theta, frozen, buffers = split_trainable(model)
    with naming_batch_errors(theta, support, None, call="adapt"):
        split = None
        if problem.partial and head_losses(loss_fn, loss_fn) is not None:
            split = head_split({**theta, **frozen, **buffers}, support)
        return adapt_with_solver(model, loss_fn, support, problem, adapted, split)


def meta_backward_result(tasks: TaskGradient) -> MetaBackwardResult:
    """The user-facing result of one task or of a batch of tasks.

    Args:
        tasks: What the task function returned (stacked over tasks for a batch).

    Returns:
        The losses and diagnostics.
    """
    return MetaBackwardResult(
        outer_loss=tasks.outer_loss,
        inner_loss=tasks.inner_loss,
        stationarity=tasks.stationarity,
        cg_residual=tasks.cg.residual_norm.detach(),
        cg_iterations=tasks.cg.iterations,
        cg_status=tasks.cg.status,
        outer_aux=tasks.outer_aux,
        relative_stationarity=tasks.relative_stationarity,
        relative_cg_residual=tasks.relative_cg_residual,
    )
