"""One task of partial adaptation, on an ``nn.Module``: the general split and the head split.

:func:`~implicit_meta.functional.partial.partial_task_meta_gradient` works on losses of the
adapted parameters given a context. This module builds those from a model and a user's loss:

- the general split: any subset adapts; the context is the shared parameters themselves, so
  the whole model runs in every inner step (correct for any model and any ``loss_fn``);
- the head split: the adapted parameters are exactly the classifier of a model that follows
  timm's contract (``forward_features``, ``forward_head(x, pre_logits=True)``,
  ``get_classifier()``) and both losses are :func:`~implicit_meta.output_loss` losses; the
  context is the body's features, computed once on the support and once on the query, and
  every inner step and curvature product runs the classifier alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from implicit_meta.functional.adjoint import ImplicitAdjoint
from implicit_meta.functional.curvature import ComposedLoss
from implicit_meta.functional.implicit import TaskGradient
from implicit_meta.functional.partial import Contexts, LossAt, partial_task_meta_gradient
from implicit_meta.functional.tree import Params
from implicit_meta.losses import OutputLoss, split_batch
from implicit_meta.module_losses import (
    LossFn,
    functional_inner_loss,
    functional_loss_and_aux,
    split_loss_and_aux,
)
from implicit_meta.problem import InnerProblem

TaskFn = Callable[[Any, Any, Params, Params], TaskGradient]
"""One task's meta-gradient: ``one_task(support, query, buffers, params)``."""

_TIMM_SPLIT = ("forward_features", "forward_head", "get_classifier")


@dataclass(frozen=True)
class HeadSplit:
    """A model split into a body (features) and its classifier, the adapted head.

    Attributes:
        model: The whole model.
        classifier: ``model.get_classifier()``.
        prefix: The classifier's name in the model followed by a dot (``"head."``).
    """

    model: nn.Module
    classifier: nn.Module
    prefix: str

    def features(self, state: Mapping[str, Tensor], inputs: Any) -> Tensor:
        """The body's output (the classifier's input) at the tensors of ``state``.

        Args:
            state: Parameters and buffers by the model's names (buffers already cloned).
            inputs: The batch's inputs.

        Returns:
            ``model.forward_head(model.forward_features(inputs), pre_logits=True)``.
        """
        value = torch.func.functional_call(
            _Body(self.model), {"model." + k: v for k, v in state.items()}, (inputs,), strict=False
        )
        if not isinstance(value, Tensor):
            raise TypeError(
                f"forward_head(..., pre_logits=True) must return a tensor, got {type(value)}"
            )
        return value

    def logits(self, head: Params, features: Tensor) -> Tensor:
        """The classifier's output at the head parameters ``head`` (the model's names).

        Args:
            head: The classifier's parameters, keyed by the model's names.
            features: What :meth:`features` returned.

        Returns:
            The model's output for those features.
        """
        local = {k[len(self.prefix) :]: v for k, v in head.items()}
        if type(self.classifier) is nn.Linear and "weight" in local:
            # The common head, called directly: functional_call's module swap costs more than
            # the matrix product itself, and the inner solver calls this dozens of times.
            return F.linear(features, local["weight"], local.get("bias"))
        value = torch.func.functional_call(self.classifier, local, (features,), strict=False)
        assert isinstance(value, Tensor)
        return value


class _Body(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> Any:
        return self.model.forward_head(self.model.forward_features(inputs), pre_logits=True)  # type: ignore[operator]


def find_head_split(model: nn.Module, adapted: tuple[str, ...]) -> HeadSplit | None:
    """The head split of ``model`` if ``adapted`` is exactly its classifier's parameters.

    Args:
        model: The model.
        adapted: The names of the adapted parameters.

    Returns:
        The split, or ``None`` when the model lacks timm's methods or other parameters adapt.
    """
    if not all(callable(getattr(model, name, None)) for name in _TIMM_SPLIT):
        return None
    classifier = model.get_classifier()  # type: ignore[operator]
    if not isinstance(classifier, nn.Module):
        return None
    found = [name for name, module in model.named_modules() if module is classifier]
    if not found or not found[0]:
        return None
    prefix = found[0] + "."
    names = {prefix + n for n, p in classifier.named_parameters() if p.requires_grad}
    if names != set(adapted):
        return None
    return HeadSplit(model, classifier, prefix)


def head_split_mismatch(split: HeadSplit, state: Mapping[str, Tensor], inputs: Any) -> str | None:
    """Why ``classifier(features(x))`` is not ``model(x)`` on ``inputs``, or ``None``.

    Checked once per meta-optimizer, outside any transform: the head split is exact only if
    the model's forward is its classifier applied to its pre-logits features.

    Args:
        split: The split.
        state: The model's parameters and buffers by name.
        inputs: A batch of inputs.

    Returns:
        ``None`` when both agree, else a sentence for a warning.
    """
    with torch.no_grad():
        clone = {k: v.clone() for k, v in state.items()}
        whole = torch.func.functional_call(split.model, clone, (inputs,), strict=False)
        clone = {k: v.clone() for k, v in state.items()}
        head = {k: v for k, v in state.items() if k.startswith(split.prefix)}
        parts = split.logits(head, split.features(clone, inputs))
    if isinstance(whole, Tensor) and whole.shape == parts.shape:
        scale = float(whole.abs().max()) + 1.0
        if float((whole - parts).abs().max()) <= 1e-5 * scale:
            return None
    return (
        "the model's forward is not get_classifier()(forward_head(forward_features(x), "
        "pre_logits=True)) (dropout in the head, or another forward?), so the head is adapted "
        "with the whole model in every inner step (exact, slower)"
    )


def solver_settings(problem: InnerProblem) -> dict[str, Any]:
    """The keyword arguments a task's meta-gradient takes from the inner problem.

    Args:
        problem: The inner problem.

    Returns:
        ``steps``, ``lr``, ``solver_options`` (a fresh dict), ``compile_objective``, and
        ``has_aux=True`` (the outer loss may return ``(loss, aux)``).
    """
    return {
        "steps": problem.steps,
        "lr": problem.lr,
        "solver_options": dict(problem.options or {}),
        "has_aux": True,
        "compile_objective": problem.compile,
    }


def _solve(
    problem: InnerProblem,
    adjoint: ImplicitAdjoint,
    inner_at: LossAt,
    outer_at: LossAt,
    contexts: Contexts,
    theta: Params,
    shared: Params,
) -> TaskGradient:
    """:func:`partial_task_meta_gradient` with the problem's solver settings."""
    return partial_task_meta_gradient(
        inner_at,
        outer_at,
        contexts,
        theta,
        shared,
        problem.solver_fn,
        adjoint,
        **solver_settings(problem),
    )


def general_task(
    model: nn.Module,
    loss_fn: LossFn,
    outer_loss_fn: LossFn,
    outer_name: str,
    adapted: tuple[str, ...],
    frozen: Params,
    problem: InnerProblem,
    adjoint: ImplicitAdjoint,
) -> TaskFn:
    """One task's function for any adapted subset: the whole model in every evaluation.

    Args:
        model: The model.
        loss_fn: The inner loss.
        outer_loss_fn: The outer loss.
        outer_name: Its name, for messages.
        adapted: The adapted parameters' names.
        frozen: Parameters with ``requires_grad=False``.
        problem: The inner problem (solver, steps, rate, options).
        adjoint: The linear solve, with the problem's ``reg``.

    Returns:
        ``one_task(support, query, buffers, params)``, ``params`` every trainable parameter.
    """

    def one_task(support: Any, query: Any, buffers: Params, params: Params) -> TaskGradient:
        theta = {k: params[k] for k in adapted}
        shared = {k: v for k, v in params.items() if k not in theta}

        def inner_at(context: Params) -> Callable[[Params], Tensor]:
            constants = {**frozen, **context}
            return functional_inner_loss(model, loss_fn, support, constants, buffers, "loss_fn")

        def outer_at(context: Params) -> Callable[[Params], Any]:
            constants = {**frozen, **context}
            return functional_loss_and_aux(
                model, outer_loss_fn, query, constants, buffers, outer_name
            )

        return _solve(problem, adjoint, inner_at, outer_at, lambda w: (w, w), theta, shared)

    return one_task


def head_losses(loss_fn: LossFn, outer_loss_fn: LossFn) -> tuple[OutputLoss, OutputLoss] | None:
    """The two losses as :class:`~implicit_meta.OutputLoss`, or ``None`` if either is not.

    The head split evaluates the losses on features, so it needs them stated on the model's
    outputs; any other loss takes the general split.

    Args:
        loss_fn: The inner loss.
        outer_loss_fn: The outer loss.

    Returns:
        ``(inner, outer)``, or ``None``.
    """
    if isinstance(loss_fn, OutputLoss) and isinstance(outer_loss_fn, OutputLoss):
        return loss_fn, outer_loss_fn
    return None


def head_inner_loss(
    split: HeadSplit, criterion: OutputLoss, features: Tensor, targets: Any
) -> ComposedLoss:
    """``L_in`` of the head on fixed features, as a :class:`ComposedLoss` (Gauss-Newton ready).

    Args:
        split: The head split.
        criterion: The inner :func:`~implicit_meta.output_loss`.
        features: The body's support features (detached).
        targets: The support targets.

    Returns:
        The inner loss as a function of the head parameters.
    """

    def outputs(head: Params) -> Tensor:
        return split.logits(head, features)

    def loss(out: Tensor) -> Tensor:
        return split_loss_and_aux(criterion.criterion(out, targets), "loss_fn")[0]

    return ComposedLoss(outputs, loss)


def head_task(
    split: HeadSplit,
    inner: OutputLoss,
    outer: OutputLoss,
    outer_name: str,
    frozen: Params,
    problem: InnerProblem,
    adjoint: ImplicitAdjoint,
) -> TaskFn:
    """One task's function for a head on a shared body: the body runs once per batch.

    Args:
        split: The head split.
        inner: The inner loss.
        outer: The outer loss (its criterion may return ``(loss, aux)``).
        outer_name: Its name, for messages.
        frozen: Parameters with ``requires_grad=False``.
        problem: The inner problem.
        adjoint: The linear solve, with the problem's ``reg``.

    Returns:
        ``one_task(support, query, buffers, params)``, ``params`` every trainable parameter.
    """

    def one_task(support: Any, query: Any, buffers: Params, params: Params) -> TaskGradient:
        support_inputs, support_targets = split_batch(support)
        query_inputs, query_targets = split_batch(query)
        theta = {k: v for k, v in params.items() if k.startswith(split.prefix)}
        shared = {k: v for k, v in params.items() if k not in theta}
        head_constants = {k: v for k, v in frozen.items() if k.startswith(split.prefix)}

        def contexts(w: Params) -> tuple[Tensor, Tensor]:
            def state() -> dict[str, Tensor]:
                # Buffers cloned per call: BatchNorm's updates land in the clones.
                values = {**frozen, **w, **{k: v.detach() for k, v in theta.items()}}
                values.update({k: v.clone() for k, v in buffers.items()})
                return values

            return (
                split.features(state(), support_inputs),
                split.features(state(), query_inputs),
            )

        def inner_at(features: Tensor) -> Callable[[Params], Tensor]:
            loss = head_inner_loss(split, inner, features, support_targets)
            if not head_constants:
                return loss
            return ComposedLoss(lambda p: loss.outputs({**head_constants, **p}), loss.criterion)

        def outer_at(features: Tensor) -> Callable[[Params], Any]:
            def loss_and_aux(head: Params) -> tuple[Tensor, Any]:
                logits = split.logits({**head_constants, **head}, features)
                return split_loss_and_aux(outer.criterion(logits, query_targets), outer_name)

            return loss_and_aux

        return _solve(problem, adjoint, inner_at, outer_at, contexts, theta, shared)

    return one_task
