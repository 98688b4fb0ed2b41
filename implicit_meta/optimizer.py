"""``ImplicitMetaOptimizer``: iMAML meta-training as a plug-in around any model and optimizer."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from implicit_meta._batch_strategy import auto_strategy, loop_over_tasks, vmap_over_tasks
from implicit_meta._diagnostics import (
    check_finite_tasks,
    curvature_warning,
    divergence_warning,
    eval_mode_warning,
    naming_batch_errors,
)
from implicit_meta._partial_task import (
    HeadSplit,
    TaskFn,
    find_head_split,
    general_task,
    head_losses,
    head_split_mismatch,
    head_task,
)
from implicit_meta._settings import (
    check_model_and_optimizer,
    resolve_adjoint,
    saved_settings,
    unoptimized_warning,
    validated_settings,
)
from implicit_meta._task_axis import check_task_dimension, select_task, task_count
from implicit_meta.adaptation import AdaptedModel, adapt_with_solver
from implicit_meta.functional._stack import user_stacklevel
from implicit_meta.functional.adjoint import ImplicitAdjoint
from implicit_meta.functional.curvature import CurvatureFn, resolve_curvature
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


def _result(tasks: TaskGradient) -> MetaBackwardResult:
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


class ImplicitMetaOptimizer:
    """iMAML meta-training for any ``nn.Module`` and any outer ``torch.optim`` optimizer.

    Per task, the model's trainable parameters ``theta`` are adapted by the inner solver to
    ``phi* = argmin_phi L_in(phi) + reg/2 ||phi - theta||^2`` (started at ``theta``, on detached
    tensors), and the meta-gradient ``(I + C/reg)^-1 grad L_out(phi*)`` is solved by conjugate
    gradient on curvature-vector products of ``L_in`` at ``phi*``. Nothing differentiates through
    the inner loop, so memory does not grow with ``inner_steps``.

    The linear solve is an :class:`~implicit_meta.functional.ImplicitAdjoint` (``adjoint=``):
    the curvature ``C`` (the Hessian, or the positive semidefinite Gauss-Newton matrix of a loss
    stated with :func:`~implicit_meta.output_loss`, which ``curvature="auto"`` picks), damping,
    CG steps and tolerance; ``cg_steps=0`` is first-order. ``reg=``, ``cg_steps=``, ``cg_tol=``
    and ``hvp=`` are shorthands for its fields.

    The default is the first-order meta-gradient ``grad L_out(phi*)``: on ReLU networks with a
    few inner steps it trained as well as the best implicit system in the adjoint study (see the
    Benchmarks page) at the lowest cost. Ask for the implicit one with ``cg_steps=5`` (the
    curvature ``"auto"`` picks) or ``adjoint=ImplicitAdjoint(curvature=...)``; it is exact where
    the theory holds, a smooth inner problem solved to stationarity.

    What adapts, ``reg`` and the inner solver form the :class:`~implicit_meta.InnerProblem`
    (``problem=``, or the shorthands ``adapt=``, ``reg=``, ``inner=``, ``inner_steps=``,
    ``inner_lr=``, ``inner_options=``, ``compile_inner=``). With ``adapt="head"`` (or names, a
    submodule, a predicate) only those parameters adapt per task; the other trainable ones are
    shared meta-parameters, meta-learned through the exact implicit function theorem (the
    guide *Adapt part of the network*). Parameters with ``requires_grad=False`` are not
    meta-parameters: they are used as constants, never adapted, and get no ``.grad``.

    Buffers: every evaluation starts from a fresh copy of the model's buffers, and updates made
    during it are discarded, so the inner loop, the outer loss and the Hessian products never
    write into the model. In training mode BatchNorm normalises with the statistics of the batch
    it sees (as in MAML and iMAML: adapt and evaluate a task in training mode); in eval mode it
    uses the model's running statistics, which meta-training leaves unchanged, and the first
    call warns (``RuntimeWarning``, once per optimizer) naming ``model.train()``. Layers built
    with ``track_running_stats=False`` (:class:`~implicit_meta.models.Conv4`'s) behave alike in
    both modes and do not warn.

    Warnings, once per optimizer each: an outer optimizer that holds only some of the trainable
    parameters (the others adapt but are never meta-updated; ``adapt=`` is the way to adapt
    only part of the model), CG meeting non-positive curvature, and an inner solve that moves
    away from its solution (``relative_stationarity`` above 1: lower ``inner_lr``).

    Args:
        model: The model whose trainable parameters are the meta-parameters.
        outer_optimizer: Any ``torch.optim`` optimizer over (some of) the model's parameters.
        reg: Proximal regularisation strength ``lambda > 0`` (shorthand for ``problem.reg``;
            default 2, or the ``reg`` of an ``adjoint=`` that sets one).
        inner: Inner solver (default ``"sgd"``, or dense ``"newton"`` for partial adaptation):
            a registered name (see :func:`list_inner_solvers`: ``"sgd"``,
            ``"adam"``, ``"lbfgs"``, ``"newton_cg"``, ...), a solver function
            ``solver(objective, params, *, steps, lr, **options)``, or a ``torch.optim.Optimizer``
            subclass such as ``torch.optim.Adam`` (run on detached copies; see
            :func:`torch_optimizer_solver`).
        inner_steps: Inner solver steps per task (``0`` gives ``phi* = theta``; default 16, or
            8 Newton steps for partial adaptation).
        inner_lr: Inner learning rate (default 0.1, or 1.0 for Newton steps); for
            ``"lbfgs"``, ``"newton"`` and ``"newton_cg"``, the first step length of the line
            search, where ``1.0`` is natural.
        inner_options: Extra keyword arguments for the inner solver, e.g. ``{"momentum": 0.9}``;
            checked against the solver's signature here (a torch.optim solver: its
            constructor's arguments and values), so a misspelt key fails at construction.
        cg_steps: CG iterations (curvature-vector products) per task; ``0`` is the first-order
            meta-gradient (shorthand for ``adjoint.cg_steps``; default: first-order for
            ``adapt="all"``, the exact system with CG 20 for partial adaptation).
        cg_tol: CG's relative residual tolerance (shorthand; default 1e-10). How to solve,
            not what: alone it leaves the first-order default, where it has no effect.
        hvp: Hessian-vector product strategy: ``"auto"``, ``"reverse_over_reverse"`` or
            ``"forward_over_reverse"`` (see :func:`implicit_meta.functional.make_hvp`;
            shorthand; default ``"auto"``). Like ``cg_tol``, it does not turn the solve on.
        compile_inner: Run the inner objective through ``torch.compile`` (opt-in): faster inner
            steps after a first compilation of tens of seconds that later tasks of the same
            shapes reuse, so worth it for long runs only (``docs/benchmarks.md``). Applies to
            tasks solved one by one; under vmap the inner step stays eager (see
            :func:`implicit_meta.functional.solve_inner`).
        adapt: Which parameters adapt (see :attr:`InnerProblem.adapt`; default ``"all"``).
        problem: The whole inner problem; give either it or its shorthands.
        adjoint: The whole linear-solve setting; give either it or its shorthands
            (``cg_steps=``, ``cg_tol=``, ``hvp=``). Its ``reg`` is replaced by the problem's.

    Raises:
        ValueError: If a setting is out of range, the solver name is unknown, ``inner_options``
            holds a key the solver does not take (the message lists those it takes) or a value
            a torch.optim solver rejects, an SGD momentum is outside ``[0, 1)``, an SGD inner
            step diverges on the proximal term (``inner_lr * reg >= 2`` without momentum), the
            model has no trainable parameters, the outer optimizer holds tensors that are not the
            model's, ``adjoint=`` or ``problem=`` comes with its shorthands, the problem's and
            the adjoint's ``reg`` disagree, or ``adapt=`` selects no trainable parameter (or
            every one, under the name ``"head"``).
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
        resolved_adjoint = resolve_adjoint(
            adjoint, {"cg_steps": cg_steps, "cg_tol": cg_tol, "hvp": hvp}
        )
        resolved_problem = resolve_problem(
            problem,
            {
                "adapt": adapt,
                "reg": reg,
                "solver": inner,
                "steps": inner_steps,
                "lr": inner_lr,
                "options": inner_options,
                "compile": compile_inner,
            },
            adjoint,
        )
        resolved_adjoint = default_adjoint_for(resolved_problem, resolved_adjoint)
        adapted = adapted_parameter_names(model, resolved_problem.adapt)
        self.model = model
        self.outer_optimizer = outer_optimizer
        self._apply_settings(resolved_problem, resolved_adjoint, adapted)
        self._warned: set[str] = set()
        self._vmap_failure: str | None = None
        self._curvature_in_use: str | CurvatureFn = self.adjoint.curvature

    def _apply_settings(
        self, problem: InnerProblem, adjoint: ImplicitAdjoint, adapted: tuple[str, ...]
    ) -> None:
        self.problem: InnerProblem = problem
        # reg belongs to the inner problem; the adjoint's system is scaled by the same value.
        self.adjoint: ImplicitAdjoint = (
            adjoint if adjoint.reg == problem.reg else adjoint.replace(reg=problem.reg)
        )
        self._adapted = adapted
        # The head split is checked against the model once, on the first task.
        self._head_split: HeadSplit | None = None
        self._head_split_checked = False

    @property
    def adapted(self) -> tuple[str, ...]:
        """The names of the adapted parameters (every trainable one for ``adapt="all"``)."""
        return self._adapted

    @property
    def inner_steps(self) -> int:
        """Inner solver steps per task, ``problem.steps``."""
        return self.problem.steps or 0

    @property
    def inner_lr(self) -> float:
        """The inner learning rate, ``problem.lr``."""
        return float(self.problem.lr or 0.0)

    @property
    def inner_options(self) -> dict[str, Any]:
        """Extra keyword arguments of the inner solver, ``problem.options``."""
        return dict(self.problem.options or {})

    @property
    def compile_inner(self) -> bool:
        """Whether the inner objective is compiled, ``problem.compile``."""
        return self.problem.compile

    @property
    def reg(self) -> float:
        """The proximal strength, ``problem.reg``."""
        return self.problem.reg

    @property
    def cg_steps(self) -> int:
        """CG iterations per task, ``adjoint.cg_steps`` (``0``: first-order)."""
        return self.adjoint.cg_steps or 0

    @property
    def cg_tol(self) -> float:
        """CG's relative tolerance, ``adjoint.cg_tol``."""
        return self.adjoint.cg_tol

    @property
    def hvp(self) -> str:
        """The Hessian-vector product strategy, ``adjoint.hvp``."""
        return self.adjoint.hvp

    @property
    def inner(self) -> Callable[..., Params]:
        """The inner solver function in use."""
        return self.problem.solver_fn

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _solve_task(
        self, loss_fn: LossFn, support: Any, query: Any, outer_loss_fn: LossFn | None
    ) -> TaskGradient:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        check_batch(support, "support")
        check_batch(query, "query")
        theta, frozen, buffers = self._split_checked()
        self._check_mode()
        self._check_curvature(loss_fn, support, frozen, buffers)
        # No separate check pass: the losses validate themselves (scalar, floating point,
        # differentiable) on their first evaluation, the gradient at theta, with the same
        # messages; a batch the model cannot take is named when torch trips over it.
        with naming_batch_errors(theta, support, query):
            one_task = self._task_function(loss_fn, outer_loss_fn, support)
            return one_task(support, query, buffers, theta)

    def _check_curvature(
        self, loss_fn: LossFn, support: Any, frozen: Params, buffers: Params
    ) -> None:
        # Before any solve: Gauss-Newton asked of a plain loss_fn fails here, with the fix.
        if not self.adjoint.first_order:
            inner_loss = functional_inner_loss(self.model, loss_fn, support, frozen, buffers)
            self._curvature_in_use = resolve_curvature(self.adjoint.curvature, inner_loss)

    def _check_mode(self) -> None:
        # Module attributes only, no tensor read; the modules are scanned in eval mode only.
        if not self.model.training and "eval_mode" not in self._warned:
            message = eval_mode_warning(self.model)
            if message is not None:
                self._warn_once("eval_mode", message)

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        # At the user's line, however deep the call (meta_backward_batch, the few-shot trainer).
        warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())

    def _check_and_accumulate(
        self, meta_grad: Params, tasks: TaskGradient, *, batched: bool
    ) -> None:
        """Check losses and gradients for NaN/inf (one host sync), then add into ``p.grad``."""
        checks = check_finite_tasks(meta_grad, tasks, batched=batched)
        count = tasks.cg.status.numel()
        if checks.nonpositive_curvature:
            system = self.adjoint.replace(curvature=self._curvature_in_use).describe()
            message = curvature_warning(system, checks.nonpositive_curvature, count)
            self._warn_once("curvature", message)
        if checks.diverged:
            message = divergence_warning(checks, count, self.problem.solver_name, self.inner_lr)
            self._warn_once("diverged", message)
        with torch.no_grad():
            for name, param in self._trainable():
                grad = meta_grad[name].to(dtype=param.dtype, device=param.device)
                if param.grad is None:
                    param.grad = grad.clone()
                else:
                    param.grad.add_(grad)

    def meta_backward(
        self,
        loss_fn: LossFn,
        support: Any,
        query: Any,
        *,
        outer_loss_fn: LossFn | None = None,
    ) -> MetaBackwardResult:
        """Adapt to one task and accumulate its implicit meta-gradient into ``p.grad``.

        Like ``loss.backward()``, gradients add up across calls until :meth:`zero_grad`. If
        anything fails (bad input, a non-finite loss), the parameters, their ``.grad`` and the
        optimizer state are left exactly as they were.

        Args:
            loss_fn: ``loss_fn(module, batch) -> scalar tensor``; inside it, calling ``module``
                evaluates the model at the current inner parameters. It may also return
                ``(loss, aux)``, ``aux`` a tensor or a dict, tuple or list of tensors: the
                ``aux`` of the query batch at the adapted parameters is reported as
                ``result.outer_aux`` (computed in the outer gradient's own forward pass).
            support: The task's support (inner) batch, passed to ``loss_fn``.
            query: The task's query (outer) batch.
            outer_loss_fn: Loss on the query batch, if it differs from ``loss_fn``; it may
                return ``(loss, aux)`` too.

        Returns:
            The task's losses and diagnostics (see :class:`MetaBackwardResult`).

        Raises:
            ValueError: For an empty batch, a loss that is not a scalar, a loss that does not
                depend on the parameters (returned ``.detach()``-ed, say), a ``(aux, loss)``
                pair in the wrong order, a batch the model cannot take (another dtype or
                device, float labels, uint8 images, a label outside the classes, a ``[T, ...]``
                meta-batch: the message names the fix), or a non-finite inner or outer loss or
                meta-gradient.
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
        task = self._solve_task(loss_fn, support, query, outer_loss_fn)
        self._check_and_accumulate(task.meta_grad, task, batched=False)
        return _result(task)

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

        ``support`` and ``query`` hold tensors with a leading task dimension ``T`` (for example
        ``xs`` of shape ``[T, N*K, C, H, W]`` and ``ys`` of shape ``[T, N*K]``); task ``t`` is
        what ``meta_backward`` would get as ``(xs[t], ys[t])``. With ``reduction="sum"`` the
        accumulated ``.grad`` equals calling :meth:`meta_backward` on every task in turn;
        ``"mean"`` divides it by ``T``.

        Strategies: ``"vmap"`` runs the inner solve, the outer gradient and CG vectorised over
        tasks (per-task CG stopping is handled with masks, no host syncs); ``"loop"`` runs the
        tasks one after the other. ``"auto"`` picks ``"vmap"`` on CUDA, where one kernel per
        operation for all tasks keeps the GPU busy, and ``"loop"`` on the CPU, where each task's
        convolutions already keep the cores busy (``benchmarks/meta_step.py`` measures both; the
        figures, time and memory, are on the Benchmarks page). Solvers that
        cannot be vmapped (``"lbfgs"``, torch.optim adapters) always loop under ``"auto"``; with
        ``"vmap"`` they, and models whose operators vmap rejects, fall back to the loop with a
        one-time warning that says why; the results are the same.

        BatchNorm under vmap uses per-task batch statistics; every task gets its own copy of the
        buffers, and nothing is written into the model.

        Single-task batches are refused: given ``(x, y)`` of one task (``x`` shaped
        ``[N, C, H, W]``, ``y`` shaped ``[N]``), the leading dimension would make every sample a
        task of its own. Without ``num_tasks`` the call raises when a tensor has no dimension
        beyond the task dimension (``y`` above: one label per "task") or when every task would
        hold a single sample in both batches (``x`` and ``y`` shaped ``[N, 1]``); pass
        ``num_tasks=T`` to state that the leading dimension is the task dimension (it is then
        checked against ``T`` and those checks are skipped).

        Args:
            loss_fn: ``loss_fn(module, batch) -> scalar tensor`` (or ``(loss, aux)``, see
                :meth:`meta_backward`) for a single task's batch.
            support: Support batches of all tasks, tensors shaped ``[T, ...]``.
            query: Query batches of all tasks, tensors shaped ``[T, ...]``.
            reduction: ``"mean"`` or ``"sum"`` over tasks for the accumulated gradient.
            outer_loss_fn: Loss on the query batches, if it differs from ``loss_fn``.
            strategy: ``"auto"``, ``"vmap"`` or ``"loop"``.
            num_tasks: The number of tasks ``T``, if stated: the batches' leading dimension
                must equal it, and the single-task checks above are skipped.

        Returns:
            Per-task diagnostics: every field of :class:`MetaBackwardResult` has shape ``[T]``
            (each tensor of ``outer_aux`` gets a leading ``T``).

        Raises:
            ValueError: For an unknown reduction or strategy, batches without a consistent task
                dimension, batches that look like a single task's (see above), a ``num_tasks``
                that does not match, an empty task, a non-scalar loss, a loss that does not
                depend on the parameters, a batch the model cannot take (as in
                :meth:`meta_backward`), or a non-finite loss or meta-gradient in any task
                (the message names the tasks); nothing is written then.

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
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        count = task_count(support, query)
        check_task_dimension(support, query, count, num_tasks)
        first_support, first_query = select_task(support, 0), select_task(query, 0)
        check_batch(first_support, "support")
        check_batch(first_query, "query")
        theta, frozen, buffers = self._split_checked()
        self._check_mode()
        if strategy == "auto":
            strategy = self._auto_strategy(next(iter(theta.values())).device)
        if strategy == "vmap" or not self.problem.partial:
            with naming_batch_errors(theta, first_support, first_query, call=_BATCH):
                self._precheck(loss_fn, outer_loss_fn, first_support, first_query)
        else:
            # The loop's first task runs outside any transform and fails with the same
            # messages; a second pass of the body over the first task is not paid for.
            self._check_curvature(loss_fn, first_support, frozen, buffers)
        tasks: TaskGradient | None = None
        if strategy == "vmap":
            # A failure is remembered: a model that vmap rejects would otherwise pay for a
            # failed vmapped solve at every meta-step.
            reason = vmap_unsupported_reason(self.problem.solver_fn) or self._vmap_failure
            if reason is None:
                try:
                    # A label out of range in a later task is the user's error, not vmap's.
                    with naming_batch_errors(
                        theta, first_support, first_query, call=_BATCH, errors=(IndexError,)
                    ):
                        tasks = self._solve_tasks_vmap(
                            loss_fn, support, query, outer_loss_fn, count
                        )
                except torch.OutOfMemoryError:
                    raise  # out of memory is not "unsupported": the loop is no answer to it
                except (RuntimeError, NotImplementedError) as error:
                    reason = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                    self._vmap_failure = reason
            if tasks is None:
                self._warn_once(
                    "vmap",
                    f"meta_backward_batch falls back to a loop over tasks ({reason})",
                )
        if tasks is None:
            with naming_batch_errors(theta, first_support, first_query, call=_BATCH):
                tasks = self._solve_tasks_loop(loss_fn, support, query, outer_loss_fn, count)
        scale = 1.0 / count if reduction == "mean" else 1.0
        total = {k: v.sum(dim=0) * scale for k, v in tasks.meta_grad.items()}
        self._check_and_accumulate(total, tasks, batched=True)
        return _result(tasks)

    def _auto_strategy(self, device: torch.device) -> str:
        return auto_strategy(self.problem.solver_fn, device)

    def _split_checked(self) -> tuple[Params, Params, Params]:
        theta, frozen, buffers = split_state(self.model)
        if not theta:
            raise ValueError("the model has no trainable parameters (none has requires_grad=True)")
        return theta, frozen, buffers

    def _task_function(self, loss_fn: LossFn, outer_loss_fn: LossFn | None, example: Any) -> TaskFn:
        """One task's function; ``example`` is a support batch for the one-time split check."""
        _, frozen, _ = self._split_checked()
        outer_name = "outer_loss_fn" if outer_loss_fn is not None else "loss_fn"
        if self.problem.partial:
            return self._partial_task_function(loss_fn, outer_loss_fn or loss_fn, example)

        def one_task(support: Any, query: Any, buffers: Params, theta: Params) -> TaskGradient:
            inner_loss = functional_inner_loss(
                self.model, loss_fn, support, frozen, buffers, "loss_fn"
            )
            outer_loss = functional_loss_and_aux(
                self.model, outer_loss_fn or loss_fn, query, frozen, buffers, outer_name
            )
            return task_meta_gradient(
                inner_loss,
                outer_loss,
                theta,
                self.problem.solver_fn,
                self.adjoint,
                steps=self.inner_steps,
                lr=self.inner_lr,
                solver_options=self.inner_options,
                has_aux=True,
                compile_objective=self.compile_inner,
            )

        return one_task

    def _solve_tasks_vmap(
        self, loss_fn: LossFn, support: Any, query: Any, outer_loss_fn: LossFn | None, count: int
    ) -> TaskGradient:
        theta, _, buffers = self._split_checked()
        one_task = self._task_function(loss_fn, outer_loss_fn, select_task(support, 0))
        return vmap_over_tasks(one_task, support, query, theta, buffers, count)

    def _solve_tasks_loop(
        self, loss_fn: LossFn, support: Any, query: Any, outer_loss_fn: LossFn | None, count: int
    ) -> TaskGradient:
        theta, _, buffers = self._split_checked()
        one_task = self._task_function(loss_fn, outer_loss_fn, select_task(support, 0))
        return loop_over_tasks(one_task, support, query, theta, buffers, count)

    def _partial_task_function(
        self, loss_fn: LossFn, outer_loss_fn: LossFn, example: Any
    ) -> TaskFn:
        _, frozen, _ = self._split_checked()
        outer_name = "outer_loss_fn" if outer_loss_fn is not loss_fn else "loss_fn"
        losses = head_losses(loss_fn, outer_loss_fn)
        split = self._checked_head_split(example) if losses is not None else None
        if split is not None and losses is not None:
            inner, outer = losses
            return head_task(split, inner, outer, outer_name, frozen, self.problem, self.adjoint)
        return general_task(
            self.model,
            loss_fn,
            outer_loss_fn,
            outer_name,
            self._adapted,
            frozen,
            self.problem,
            self.adjoint,
        )

    def _checked_head_split(self, example: Any) -> HeadSplit | None:
        # Once per optimizer, outside any transform: is model(x) the classifier of the body's
        # features? If not, the general split (the whole model per step) stays exact.
        if not self._head_split_checked:
            split = find_head_split(self.model, self._adapted)
            if split is not None:
                theta, frozen, buffers = self._split_checked()
                state = {**theta, **frozen, **buffers}
                reason = head_split_mismatch(split, state, split_batch(example)[0])
                if reason is not None:
                    self._warn_once("head_split", reason)
                    split = None
            self._head_split, self._head_split_checked = split, True
        return self._head_split

    def _precheck(
        self, loss_fn: LossFn, outer_loss_fn: LossFn | None, support: Any, query: Any
    ) -> None:
        # Evaluate both losses at theta outside any transform, so that a wrong loss (not a
        # scalar, not a tensor) or a batch of the wrong dtype fails with its own message rather
        # than deep inside a solver, or (under vmap) as a reason to fall back to the loop.
        theta, frozen, buffers = self._split_checked()
        self._check_curvature(loss_fn, support, frozen, buffers)
        functional_loss(self.model, loss_fn, support, frozen, buffers, "loss_fn")(theta)
        outer_name = "outer_loss_fn" if outer_loss_fn is not None else "loss_fn"
        functional_loss(self.model, outer_loss_fn or loss_fn, query, frozen, buffers, outer_name)(
            theta
        )

    def adapt(self, loss_fn: LossFn, support: Any) -> AdaptedModel:
        """The model at the parameters adapted to ``support``, for evaluation.

        The inner solve of meta-training (this optimizer's solver, steps, learning rate and
        ``reg``) without a meta-gradient. The result calls the model at ``phi*`` without
        copying it (:class:`~implicit_meta.AdaptedModel`; ``.to_module()`` gives an
        independent copy) and reports how well the inner problem was solved; the model itself
        is unchanged. :func:`implicit_meta.adapt` does the same without an optimizer.

        Args:
            loss_fn: ``loss_fn(module, batch) -> scalar tensor``.
            support: The task's support batch.

        Returns:
            The adapted model, callable like the model, in its current train/eval mode.

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
        theta, _, _ = self._split_checked()
        self._check_mode()
        with naming_batch_errors(theta, support, None, call="adapt"):
            split = None
            if self.problem.partial and head_losses(loss_fn, loss_fn) is not None:
                split = self._checked_head_split(support)
            return adapt_with_solver(
                self.model, loss_fn, support, self.problem, self._adapted, split
            )

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
        return {
            "adapt": self.problem.to_dict(self._adapted)["adapt"],
            "inner": self.problem.solver_name,
            "inner_steps": self.inner_steps,
            "inner_lr": self.inner_lr,
            "inner_options": dict(self.inner_options),
            "compile_inner": self.compile_inner,
            "adjoint": self.adjoint.to_dict(),
        }

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
        """
        if not isinstance(state_dict, Mapping) or not {"outer_optimizer", "settings"} <= set(
            state_dict
        ):
            raise ValueError("state_dict must hold 'outer_optimizer' and 'settings'")
        raw = saved_settings(state_dict["settings"])
        settings = validated_settings(raw)
        current = self.adjoint.curvature
        adjoint = ImplicitAdjoint.from_dict(
            raw["adjoint"], curvature=None if isinstance(current, str) else current
        )
        inner_name = raw.get("inner")
        adapt = raw.get("adapt", "all")
        problem = InnerProblem(
            adapt=tuple(adapt) if isinstance(adapt, list) else adapt,
            reg=adjoint.reg,
            solver=self.problem.solver_fn if inner_name is None else str(inner_name),
            steps=settings["inner_steps"],
            lr=settings["inner_lr"],
            options=settings["inner_options"],
            compile=settings["compile_inner"],
        )
        adapted = adapted_parameter_names(self.model, problem.adapt)
        # Loading the optimizer can still fail (mismatched groups); it validates before writing.
        backup = copy.deepcopy(self.outer_optimizer.state_dict())
        try:
            self.outer_optimizer.load_state_dict(state_dict["outer_optimizer"])
        except Exception:
            self.outer_optimizer.load_state_dict(backup)
            raise
        self._apply_settings(problem, adjoint, adapted)
