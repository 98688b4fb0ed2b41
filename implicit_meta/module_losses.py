"""Evaluate a user's ``loss_fn(module, batch)`` at any parameters, without touching the module.

``loss_fn`` receives the real module, so it may call any of its methods (``forward_features`` of
a timm model, say). The module is wrapped in a tiny ``nn.Module`` whose ``forward`` calls
``loss_fn``, and ``torch.func.functional_call`` swaps the given tensors in for the duration of
that one call only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from implicit_meta.functional.curvature import ComposedLoss
from implicit_meta.functional.tree import Params
from implicit_meta.losses import OutputLoss, split_batch

LossFn = Callable[[nn.Module, Any], Any]
"""A user's loss: ``loss_fn(module, batch) -> scalar tensor``, or ``-> (scalar tensor, aux)``.

``aux`` is a tensor or a dict, tuple or list of tensors (query accuracy, say): the meta-optimizer
reports the one computed on the query batch at the adapted parameters, and ignores it elsewhere.
"""

_PREFIX = "model."


class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Any:
        return self.loss_fn(self.model, batch)


def _call_state(
    params: Mapping[str, Tensor],
    frozen: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    prefix: str,
) -> dict[str, Tensor]:
    # Buffers are cloned on every call: in-place updates (BatchNorm running statistics) land in
    # the clones and are thrown away.
    state = {prefix + k: v for k, v in params.items()}
    state.update({prefix + k: v for k, v in frozen.items()})
    state.update({prefix + k: v.clone() for k, v in buffers.items()})
    return state


def split_state(model: nn.Module) -> tuple[Params, Params, Params]:
    """Split a model's tensors into trainable parameters, frozen parameters and buffers.

    Args:
        model: The module.

    Returns:
        Detached ``(trainable, frozen, buffers)`` dicts keyed by the module's names.
    """
    trainable: Params = {}
    frozen: Params = {}
    for name, param in model.named_parameters():
        (trainable if param.requires_grad else frozen)[name] = param.detach()
    buffers = {name: buf.detach() for name, buf in model.named_buffers()}
    return trainable, frozen, buffers


def check_scalar_loss(value: object, what: str) -> Tensor:
    """Raise a clear error unless ``value`` is a floating-point scalar tensor.

    Args:
        value: What the loss function returned.
        what: Name of the loss, for the message.

    Returns:
        ``value`` as a tensor.

    Raises:
        TypeError: If ``value`` is not a tensor.
        ValueError: If it is not a 0-dim floating-point tensor.
    """
    if not isinstance(value, Tensor):
        raise TypeError(
            f"{what} must return a scalar tensor or a (scalar tensor, aux) pair, "
            f"got {type(value).__name__}"
        )
    if value.dim() != 0:
        raise ValueError(
            f"{what} must return a scalar (0-dim) tensor, got shape {tuple(value.shape)}; "
            "reduce it, e.g. with .mean()"
        )
    if not value.is_floating_point():
        raise ValueError(f"{what} must return a floating-point tensor, got dtype {value.dtype}")
    return value


def _is_tracked_scalar(value: object) -> bool:
    return (
        isinstance(value, Tensor)
        and value.dim() == 0
        and value.is_floating_point()
        and value.requires_grad
    )


def _swapped(loss: object, aux: object) -> bool:
    # (aux, loss) in the wrong order: only the second element carries a graph. Where nothing is
    # tracked (under torch.no_grad) neither does, and nothing is concluded. ``requires_grad`` is
    # metadata, under torch.func transforms too: no host sync.
    return _is_tracked_scalar(aux) and not _is_tracked_scalar(loss)


def split_loss_and_aux(value: object, what: str) -> tuple[Tensor, Any]:
    """Split what a loss function returned into the checked scalar loss and its aux output.

    Args:
        value: A scalar tensor, or a ``(scalar tensor, aux)`` pair.
        what: Name of the loss, for the message.

    Returns:
        ``(loss, aux)`` with ``aux`` detached; ``aux`` is ``{}`` when the loss returned none.

    Raises:
        TypeError: If the loss is not a tensor, or ``aux`` holds something other than tensors.
        ValueError: If the loss is not a 0-dim floating-point tensor, or the pair looks swapped
            (``(aux, loss)``: only its second element is a scalar with a graph).

    Example:
        >>> import torch
        >>> loss, aux = split_loss_and_aux((torch.tensor(1.0), {"acc": torch.tensor(0.5)}), "f")
        >>> aux
        {'acc': tensor(0.5000)}
    """
    if isinstance(value, tuple) and len(value) == 2:
        loss, aux = value
        if _swapped(loss, aux):
            raise ValueError(
                f"{what} returned a pair whose second element looks like the loss (a scalar "
                "that depends on the parameters) and whose first does not: the first element "
                "must be the loss, return (loss, aux)"
            )
    else:
        loss, aux = value, {}
    leaves = pytree.tree_leaves(aux)
    wrong = [type(leaf).__name__ for leaf in leaves if not isinstance(leaf, Tensor)]
    if wrong:
        raise TypeError(
            f"the aux output of {what} must hold only tensors (a tensor, or a dict, tuple or "
            f"list of tensors), got {wrong[0]}"
        )
    detached = pytree.tree_map(lambda t: t.detach(), aux)
    return check_scalar_loss(loss, what), detached


def functional_loss_and_aux(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    frozen: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    what: str = "loss_fn",
) -> Callable[[Params], tuple[Tensor, Any]]:
    """``phi -> (loss, aux)`` of ``loss_fn(model at phi, batch)``, a pure function of ``phi``.

    Buffers are cloned inside every call: in-place updates (BatchNorm running statistics) land in
    the clones, which are thrown away, so the model's buffers never change and the function stays
    pure under ``torch.func`` transforms.

    Args:
        model: The module to evaluate.
        loss_fn: ``loss_fn(module, batch) -> scalar tensor`` or ``-> (scalar tensor, aux)``.
        batch: Passed to ``loss_fn`` unchanged.
        frozen: Parameters that are not adapted (``requires_grad=False``), used as constants.
        buffers: Buffers to start every evaluation from.
        what: Name of the loss, for error messages.

    Returns:
        A function of a parameter dict returning the scalar loss and the detached aux output
        (``{}`` when ``loss_fn`` returns a bare tensor).
    """
    wrapper = _LossModule(model, loss_fn)

    def loss_and_aux(params: Params) -> tuple[Tensor, Any]:
        state = _call_state(params, frozen, buffers, _PREFIX)
        value = torch.func.functional_call(wrapper, state, (batch,), strict=False)
        return split_loss_and_aux(value, what)

    return loss_and_aux


def functional_loss(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    frozen: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    what: str = "loss_fn",
) -> Callable[[Params], Tensor]:
    """``phi -> loss_fn(model at phi, batch)``, the scalar loss alone (any aux is dropped).

    Args:
        model: The module to evaluate.
        loss_fn: ``loss_fn(module, batch) -> scalar tensor`` or ``-> (scalar tensor, aux)``.
        batch: Passed to ``loss_fn`` unchanged.
        frozen: Parameters that are not adapted (``requires_grad=False``), used as constants.
        buffers: Buffers to start every evaluation from (see :func:`functional_loss_and_aux`).
        what: Name of the loss, for error messages.

    Returns:
        A scalar function of a parameter dict.
    """
    loss_and_aux = functional_loss_and_aux(model, loss_fn, batch, frozen, buffers, what)

    def loss(params: Params) -> Tensor:
        return loss_and_aux(params)[0]

    return loss


def functional_inner_loss(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    frozen: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    what: str = "loss_fn",
) -> Callable[[Params], Tensor]:
    """The inner loss as a function of ``phi``: a :class:`ComposedLoss` for an ``OutputLoss``.

    For an :class:`~implicit_meta.OutputLoss` the outputs ``phi -> model(inputs)`` and the
    criterion are kept apart, which the Gauss-Newton curvature needs; any other ``loss_fn``
    becomes :func:`functional_loss`.

    Args:
        model: The module to evaluate.
        loss_fn: A plain ``loss_fn(module, batch)`` or an ``OutputLoss``.
        batch: The support batch (``(inputs, targets)`` for an ``OutputLoss``).
        frozen: Parameters used as constants.
        buffers: Buffers to start every evaluation from (cloned per call).
        what: Name of the loss, for error messages.

    Returns:
        A scalar function of a parameter dict.
    """
    if not isinstance(loss_fn, OutputLoss):
        return functional_loss(model, loss_fn, batch, frozen, buffers, what)
    inputs, targets = split_batch(batch)
    criterion_fn = loss_fn.criterion

    def outputs(params: Params) -> Tensor:
        state = _call_state(params, frozen, buffers, "")
        value = torch.func.functional_call(model, state, (inputs,), strict=False)
        if not isinstance(value, Tensor):
            raise TypeError(
                f"an output_loss needs a model that returns one tensor, got {type(value).__name__}"
            )
        return value

    def criterion(out: Tensor) -> Tensor:
        # An outer loss's (loss, aux) criterion may serve as the inner loss: aux is dropped.
        return split_loss_and_aux(criterion_fn(out, targets), what)[0]

    return ComposedLoss(outputs, criterion)


def dtype_mismatch(params: Mapping[str, Tensor], batches: Mapping[str, Any]) -> str | None:
    """Describe the first floating-point batch tensor whose dtype no parameter has, if any.

    Args:
        params: The model's trainable parameters.
        batches: Batches by name (``"support"``, ``"query"``); ``None`` entries are skipped.

    Returns:
        A sentence naming both dtypes and the fix, or ``None`` when they agree.

    Example:
        >>> import torch
        >>> params = {"w": torch.zeros(2, dtype=torch.float64)}
        >>> dtype_mismatch(params, {"support": (torch.zeros(3, 2), torch.zeros(3))})
        "dtype mismatch: the model's parameters are float64 but the support batch holds ..."
    """
    dtypes = {v.dtype for v in params.values() if v.is_floating_point()}
    if not dtypes:
        return None
    for what, batch in batches.items():
        if batch is None:
            continue
        for leaf in pytree.tree_leaves(batch):
            if isinstance(leaf, Tensor) and leaf.is_floating_point() and leaf.dtype not in dtypes:
                model = sorted(str(d).removeprefix("torch.") for d in dtypes)
                data = str(leaf.dtype).removeprefix("torch.")
                return (
                    f"dtype mismatch: the model's parameters are {', '.join(model)} but the "
                    f"{what} batch holds a {data} tensor of shape {tuple(leaf.shape)}; convert "
                    f"the batch (x.to(torch.{model[0]})) or the model (model.to(torch.{data}))"
                )
    return None


def _tensor_leaves(batch: Any) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [t for v in batch.values() for t in _tensor_leaves(v)]
    if isinstance(batch, list | tuple):
        return [t for v in batch for t in _tensor_leaves(v)]
    return []


def check_batch(batch: Any, what: str) -> None:
    """Raise a clear error if ``batch`` is empty.

    Args:
        batch: A tensor, or a (nested) tuple, list or dict of tensors; other objects pass.
        what: ``"support"`` or ``"query"``, for the message.

    Raises:
        ValueError: If the batch is ``None``, an empty container, or holds a tensor with zero
            rows.
    """
    if batch is None:
        raise ValueError(f"the {what} batch is None")
    if isinstance(batch, list | tuple | Mapping) and len(batch) == 0:
        raise ValueError(f"the {what} batch is empty ({type(batch).__name__} of length 0)")
    for tensor in _tensor_leaves(batch):
        if tensor.numel() == 0 or (tensor.dim() > 0 and tensor.shape[0] == 0):
            raise ValueError(
                f"the {what} batch is empty: it holds a tensor of shape {tuple(tensor.shape)}"
            )
