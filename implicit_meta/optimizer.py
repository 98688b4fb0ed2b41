"""``ImplicitMetaOptimizer``: iMAML meta-training as a plug-in around any model and optimizer.

What one call resolves once (state, curvature, task function) is in :mod:`._meta_step`.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from implicit_meta._batch_strategy import auto_strategy
from implicit_meta._diagnostics import check_finite_tasks, eval_mode_warning, step_warnings
from implicit_meta._meta_step import (
    MetaStepPlan,
    adapt_task,
    check_head_split,
    meta_backward_result,
    plan_meta_step,
)
from implicit_meta._partial_task import HeadSplit
from implicit_meta._settings import (
    check_model_and_optimizer,
    resolve_adjoint,
    restored_settings,
    settings_dict,
    unoptimized_warning,
)
from implicit_meta._task_axis import first_task
from implicit_meta.adaptation import AdaptedModel
from implicit_meta.functional._stack import user_stacklevel
from implicit_meta.functional.adjoint import ImplicitAdjoint
from implicit_meta.functional.implicit import TaskGradient
from implicit_meta.functional.tree import Params
from implicit_meta.module_losses import LossFn
from implicit_meta.problem import (
    AdaptSpec,
    InnerProblem,
    adapted_parameter_names,
    default_adjoint_for,
    resolve_problem,
)
from implicit_meta.result import MetaBackwardResult
from implicit_meta.solvers.registry import vmap_unsupported_reason
from implicit_meta.solvers.resolve import InnerSpec as InnerSpec

_BATCH = "meta_backward_batch"


class ImplicitMetaOptimizer:
    """iMAML meta-training for any ``nn.Module`` and any outer ``torch.optim`` optimizer.

    Per task, the inner solver adapts ``theta`` to ``phi* = argmin_phi L_in(phi) + reg/2
    ||phi - theta||^2``, and the meta-gradient ``(I + C/reg)^-1 grad L_out(phi*)`` is solved
    by CG at ``phi*``; nothing differentiates through the inner loop (see *Concepts*).

    Each setting has one home: :attr:`problem`, the :class:`~implicit_meta.InnerProblem`
    (what adapts, ``reg``, the inner solver), and :attr:`adjoint`, the
    :class:`~implicit_meta.ImplicitAdjoint` (curvature, damping, CG; first-order by default:
    the guide *Choose the meta-gradient*); the other keyword arguments are shorthands for
    their fields. With ``adapt="head"`` (or names, a submodule, a predicate) the other
    trainable parameters are meta-learned without adapting (guide *Adapt part of the
    network*). Parameters with ``requires_grad=False`` are constants, with no ``.grad``;
    buffers are copied per evaluation, never written (guide *BatchNorm and buffers*).

    Warnings (``RuntimeWarning``, once per optimizer each): a model in eval mode whose
    BatchNorm uses running statistics, an outer optimizer that holds only some trainable
    parameters (the others are never meta-updated), CG meeting non-positive curvature, and
    an inner solve that diverges (``relative_stationarity`` above 1: lower ``inner_lr``).

    Args:
        model: The model whose trainable parameters are the meta-parameters.
        outer_optimizer: Any ``torch.optim`` optimizer over (some of) the model's parameters.
        reg: Proximal strength ``lambda > 0``, ``problem.reg`` (default:
            :class:`~implicit_meta.InnerProblem`'s, or an ``adjoint=``'s ``reg`` if set).
        inner: Inner solver, ``problem.solver``: a registered name
            (:func:`list_inner_solvers`), a solver function or a ``torch.optim.Optimizer``
            subclass; default: :class:`~implicit_meta.InnerProblem`'s.
        inner_steps: Inner steps per task, ``problem.steps`` (``0`` gives ``phi* = theta``;
            default: :class:`~implicit_meta.InnerProblem`'s).
        inner_lr: Inner learning rate (a line search's first step), ``problem.lr`` (default:
            :class:`~implicit_meta.InnerProblem`'s).
        inner_options: Extra keyword arguments for the inner solver (``{"momentum": 0.9}``),
            checked against the solver here.
        cg_steps: CG iterations per task, ``adjoint.cg_steps``; ``0`` is first-order (default:
            first-order for ``adapt="all"``, the exact system for partial adaptation).
        cg_tol: CG's relative residual tolerance, ``adjoint.cg_tol`` (keeps first-order).
        hvp: Hessian-vector product strategy, ``adjoint.hvp`` (keeps first-order).
        compile_inner: Compile the inner objective with ``torch.compile``, ``problem.compile``
            (opt-in, for long runs; see the guide *Batched tasks with vmap*).
        adapt: Which parameters adapt (:attr:`InnerProblem.adapt`; default ``"all"``).
        problem: The whole inner problem; give either it or its shorthands.
        adjoint: The whole linear solve; give either it or its shorthands (``cg_steps=``,
            ``cg_tol=``, ``hvp=``). Its ``reg`` is replaced by the problem's.

    Attributes:
        model: The model.
        outer_optimizer: The outer optimizer.
        problem: The inner problem.
        adjoint: The linear solve, with the problem's ``reg``.

    Raises:
        ValueError: If a setting is out of range or unknown (a solver, an ``inner_options``
            key, an SGD step that diverges on the proximal term), the model has no trainable
            parameters, the outer optimizer holds tensors that are not the model's,
            ``problem=`` or ``adjoint=`` comes with its shorthands, the two ``reg`` disagree,
            or ``adapt=`` selects no trainable parameter (or every one, as ``"head"``).
        TypeError: If an argument has the wrong type.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import implicit_meta as im
        >>> model = torch.nn.Linear(4, 3)
        >>> meta = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters(), 1e-3),
        ...                                 reg=2.0, inner="sgd", inner_steps=5, inner_lr=0.1)
        >>> loss_fn = lambda module, batch: F.cross_entropy(module(batch[0]), batch[1])
        >>> support = (torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> query = (torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2]))
        >>> meta.zero_grad()
        >>> result = meta.meta_backward(loss_fn, support, query)
        >>> meta.step()
        >>> model.weight.grad.shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        model: nn.Module,
        outer_optimizer: torch.optim.Optimizer,
        reg: float | None = None,
        inner: InnerSpec | None = None,
        inner_steps: int | None = None,
        inner_lr: float | None = None,
        inner_options: Mapping[str, Any] | None = None,
        cg_steps: int | None = None,
        cg_tol: float | None = None,
        hvp: str | None = None,
        compile_inner: bool | None = None,
        *,
        adapt: AdaptSpec | None = None,
        problem: InnerProblem | None = None,
        adjoint: ImplicitAdjoint | None = None,
    ) -> None:
        check_model_and_optimizer(model, outer_optimizer)
        unoptimized = unoptimized_warning(model, outer_optimizer)
        if unoptimized is not None:
            warnings.warn(unoptimized, RuntimeWarning, stacklevel=user_stacklevel())
        solve = resolve_adjoint(adjoint, {"cg_steps": cg_steps, "cg_tol": cg_tol, "hvp": hvp})
        given: dict[str, Any] = {"adapt": adapt, "reg": reg, "solver": inner, "lr": inner_lr}
        given.update(steps=inner_steps, options=inner_options, compile=compile_inner)
        inner_problem = resolve_problem(problem, given, adjoint)
        self.model = model
        self.outer_optimizer = outer_optimizer
        adapted = adapted_parameter_names(model, inner_problem.adapt)
        self._apply_settings(inner_problem, default_adjoint_for(inner_problem, solve), adapted)
        self._warned: set[str] = set()
        self._vmap_failure: str | None = None

    def _apply_settings(
        self, problem: InnerProblem, adjoint: ImplicitAdjoint, adapted: tuple[str, ...]
    ) -> None:
        self.problem: InnerProblem = problem
        # reg belongs to the inner problem; the adjoint's system is scaled by the same value.
        self.adjoint: ImplicitAdjoint = (
            adjoint if adjoint.reg == problem.reg else adjoint.replace(reg=problem.reg)
        )
        self._adapted = adapted
        self._head_split: HeadSplit | None = None  # checked once, on the first task
        self._head_split_checked = False

    @property
    def adapted(self) -> tuple[str, ...]:
        """The names of the adapted parameters (every trainable one for ``adapt="all"``)."""
        return self._adapted

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _plan(self, losses: tuple[LossFn, LossFn | None], batches: Any, call: str) -> MetaStepPlan:
        self._check_mode()
        settings = (self.model, self.problem, self.adjoint, self._adapted)
        return plan_meta_step(*settings, losses, batches, self._checked_head_split, call)

    def _checked_head_split(self, state: Mapping[str, Tensor], support: Any) -> HeadSplit | None:
        # Once per optimizer, outside any transform: is model(x) the classifier of the body's
        # features? If not, the general split (the whole model per step) stays exact.
        if not self._head_split_checked:
            split, reason = check_head_split(self.model, self._adapted, state, support)
            if reason is not None:
                self._warn_once("head_split", reason)
            self._head_split, self._head_split_checked = split, True
        return self._head_split

    def _check_mode(self) -> None:
        # Module attributes only, no tensor read; the modules are scanned in eval mode only.
        if not self.model.training and "eval_mode" not in self._warned:
            message = eval_mode_warning(self.model)
            if message is not None:
                self._warn_once("eval_mode", message)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            # At the user's line, however deep the call (meta_backward_batch, the trainer).
            warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())

    def _check_and_accumulate(
        self, meta_grad: Params, tasks: TaskGradient, adjoint: ImplicitAdjoint, *, batched: bool
    ) -> None:
        """Check losses and gradients for NaN/inf (one host sync), then add into ``p.grad``."""
        checks = check_finite_tasks(meta_grad, tasks, batched=batched)
        count, solver = tasks.cg.status.numel(), self.problem.solver_name
        found = step_warnings(checks, count, adjoint.describe(), solver, self.problem.lr)
        for key, message in found.items():
            self._warn_once(key, message)
        with torch.no_grad():
            for name, param in self._trainable():
                grad = meta_grad[name].to(dtype=param.dtype, device=param.device)
                param.grad = grad.clone() if param.grad is None else param.grad.add_(grad)

    def meta_backward(
        self,
        loss_fn: LossFn,
        support: Any,
        query: Any,
        *,
        outer_loss_fn: LossFn | None = None,
    ) -> MetaBackwardResult:
        """Adapt to one task and accumulate its implicit meta-gradient into ``p.grad``.

        Like ``loss.backward()``, gradients add up until :meth:`zero_grad`. If anything
        fails, the parameters, their ``.grad`` and the optimizer state are left unchanged.

        Args:
            loss_fn: ``loss_fn(module, batch) -> scalar tensor``, ``module`` the model at the
                current inner parameters; or ``(loss, aux)``, ``aux`` a tensor or a dict, tuple
                or list of tensors (the query's ``aux`` at ``phi*`` is ``result.outer_aux``).
            support: The task's support (inner) batch.
            query: The task's query (outer) batch.
            outer_loss_fn: Loss on the query batch, if it differs from ``loss_fn`` (it may
                return ``(loss, aux)`` too).

        Returns:
            The task's losses and diagnostics (see :class:`MetaBackwardResult`).

        Raises:
            ValueError: For an empty batch, a loss that is not a scalar or does not depend on
                the parameters (``.detach()``-ed), a ``(aux, loss)`` pair, a batch the model
                cannot take (dtype, device, float labels, uint8 images, a label outside the
                classes, a ``[T, ...]`` meta-batch: the message names the fix), a curvature
                that does not fit the loss, or a non-finite loss or meta-gradient.
            TypeError: If ``loss_fn`` is not callable or returns something that is not a tensor.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> import implicit_meta as im
            >>> model = torch.nn.Linear(2, 1)
            >>> meta = im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), 0.1),
            ...                                 cg_steps=5)
            >>> mse = lambda m, b: F.mse_loss(m(b[0]), b[1])
            >>> batch = (torch.randn(8, 2), torch.randn(8, 1))
            >>> r = meta.meta_backward(mse, batch, batch)
            >>> r.status.name in {"CONVERGED", "MAX_STEPS"}
            True
        """
        plan = self._plan((loss_fn, outer_loss_fn), (support, query), "meta_backward")
        task = plan.solve()
        self._check_and_accumulate(task.meta_grad, task, plan.adjoint, batched=False)
        return meta_backward_result(task)

    def meta_backward_batch(
        self,
        loss_fn: LossFn,
        support: Any,
        query: Any,
        *,
        reduction: str = "mean",
        outer_loss_fn: LossFn | None = None,
        strategy: str = "auto",
        num_tasks: int | None = None,
    ) -> MetaBackwardResult:
        """Meta-gradients of a batch of tasks, vectorised with ``torch.func.vmap`` where it pays.

        Tensors of ``support`` and ``query`` have a leading task dimension ``T`` (task ``t``:
        every tensor indexed ``[t]``). ``"vmap"`` solves the tasks together, ``"loop"`` one
        after the other, with the same results; ``"auto"`` takes vmap on CUDA for solvers that
        allow it, else the loop; ``"vmap"`` falls back to the loop with a one-time warning that
        says why (the guide *Batched tasks with vmap*). Batches that look like one task's (no
        dimension beyond ``T``, or one sample per task) are refused unless ``num_tasks=T``.

        Args:
            loss_fn: A single task's loss, as in :meth:`meta_backward`.
            support: Support batches of all tasks, tensors shaped ``[T, ...]``.
            query: Query batches of all tasks, tensors shaped ``[T, ...]``.
            reduction: ``"sum"`` accumulates what :meth:`meta_backward` on every task would;
                ``"mean"`` divides that by ``T``.
            outer_loss_fn: Loss on the query batches, if it differs from ``loss_fn``.
            strategy: ``"auto"``, ``"vmap"`` or ``"loop"``.
            num_tasks: The number of tasks ``T``, if stated: the batches' leading dimension
                must equal it, and the single-task checks are skipped.

        Returns:
            Every field of :class:`MetaBackwardResult` with shape ``[T]`` (each tensor of
            ``outer_aux`` with a leading ``T``).

        Raises:
            ValueError: For an unknown reduction or strategy, batches without a consistent task
                dimension or that look like one task's, a ``num_tasks`` that does not match,
                or any error of :meth:`meta_backward` in any task (a non-finite result names
                the tasks); nothing is written then.
            TypeError: As :meth:`meta_backward`.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> import implicit_meta as im
            >>> model = torch.nn.Linear(3, 2)
            >>> meta = im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), 0.1))
            >>> xs, ys = torch.randn(4, 6, 3), torch.randint(0, 2, (4, 6))
            >>> ce = lambda m, b: F.cross_entropy(m(b[0]), b[1])
            >>> result = meta.meta_backward_batch(ce, (xs, ys), (xs, ys), strategy="vmap")
            >>> result.outer_loss.shape
            torch.Size([4])
        """
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if strategy not in ("auto", "vmap", "loop"):
            raise ValueError(f"strategy must be 'auto', 'vmap' or 'loop', got {strategy!r}")
        count, first = first_task(support, query, num_tasks)
        plan = self._plan((loss_fn, outer_loss_fn), first, _BATCH)
        if strategy == "auto":
            strategy = auto_strategy(self.problem.solver_fn, plan.device)
        if strategy == "vmap" or not self.problem.partial:
            # The loop of a partial problem runs its first task outside any transform, which
            # fails with the same messages; a second pass of the body over it is not paid for.
            plan.check_losses()
        tasks = None
        if strategy == "vmap":
            # A failure is remembered: a model that vmap rejects would otherwise pay for a
            # failed vmapped solve at every meta-step.
            reason = vmap_unsupported_reason(self.problem.solver_fn) or self._vmap_failure
            if reason is None:
                tasks, self._vmap_failure = plan.vmap_tasks(support, query, count)
                reason = self._vmap_failure
            if tasks is None:
                self._warn_once("vmap", f"{_BATCH} falls back to a loop over tasks ({reason})")
        if tasks is None:
            tasks = plan.loop_tasks(support, query, count)
        scale = 1.0 / count if reduction == "mean" else 1.0
        total = {k: v.sum(dim=0) * scale for k, v in tasks.meta_grad.items()}
        self._check_and_accumulate(total, tasks, plan.adjoint, batched=True)
        return meta_backward_result(tasks)

    def adapt(self, loss_fn: LossFn, support: Any) -> AdaptedModel:
        """The model at the parameters adapted to ``support``, for evaluation.

        The inner solve of meta-training (:attr:`problem`) without a meta-gradient; the model
        is unchanged (:func:`implicit_meta.adapt` does the same without an optimizer).

        Args:
            loss_fn: ``loss_fn(module, batch) -> scalar tensor``.
            support: The task's support batch.

        Returns:
            The :class:`~implicit_meta.AdaptedModel`: the model at ``phi*`` without a copy, in
            its current train/eval mode, with how well the inner problem was solved.

        Raises:
            ValueError: For an empty batch, a loss that is not a scalar, a batch the model
                cannot take (as in :meth:`meta_backward`), or a non-finite inner loss.

        Example:
            >>> import torch, torch.nn.functional as F
            >>> import implicit_meta as im
            >>> model = torch.nn.Linear(2, 1)
            >>> meta = im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), 0.1))
            >>> batch = (torch.randn(8, 2), torch.randn(8, 1))
            >>> adapted = meta.adapt(lambda m, b: F.mse_loss(m(b[0]), b[1]), batch)
            >>> adapted(batch[0]).shape, adapted.stationarity.shape
            (torch.Size([8, 1]), torch.Size([]))
        """
        self._check_mode()
        problem, adapted, split = self.problem, self._adapted, self._checked_head_split
        return adapt_task(self.model, problem, adapted, loss_fn, support, split)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of the model's trainable parameters and the outer optimizer's.

        Args:
            set_to_none: Set gradients to ``None`` instead of zero tensors.
        """
        self.outer_optimizer.zero_grad(set_to_none=set_to_none)
        for _, param in self._trainable():
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()

    def step(self) -> None:
        """Take one outer optimizer step with the accumulated meta-gradients."""
        self.outer_optimizer.step()

    def settings(self) -> dict[str, Any]:
        """The current settings as plain Python values (what :meth:`state_dict` stores).

        Returns:
            A dict with ``adapt`` (``"all"``, ``"head"``, or the adapted names), ``inner`` (the
            solver's name, or ``None`` for an unregistered function), ``inner_steps``,
            ``inner_lr``, ``inner_options``, ``compile_inner`` and ``adjoint``
            (:meth:`ImplicitAdjoint.to_dict`, whose ``reg`` is the problem's).
        """
        return settings_dict(self.problem, self.adjoint, self._adapted)

    def state_dict(self) -> dict[str, Any]:
        """The outer optimizer's state and the settings, loadable with ``weights_only=True``.

        Returns:
            ``{"outer_optimizer": ..., "settings": ...}``.
        """
        return {"outer_optimizer": self.outer_optimizer.state_dict(), "settings": self.settings()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; on error nothing changes.

        Args:
            state_dict: A dict from :meth:`state_dict`.

        Raises:
            ValueError: If keys are missing, a setting is invalid (``inner_options`` included,
                checked as in the constructor), the inner solver name is not registered, or the
                optimizer state does not match the optimizer.
            TypeError: If a setting has the wrong type.
        """
        problem, adjoint = restored_settings(state_dict, self.problem, self.adjoint)
        adapted = adapted_parameter_names(self.model, problem.adapt)
        # Loading the optimizer can still fail (mismatched groups); it validates before writing.
        backup = copy.deepcopy(self.outer_optimizer.state_dict())
        try:
            self.outer_optimizer.load_state_dict(state_dict["outer_optimizer"])
        except Exception:
            self.outer_optimizer.load_state_dict(backup)
            raise
        self._apply_settings(problem, adjoint, adapted)
