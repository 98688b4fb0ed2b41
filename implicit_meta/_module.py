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
from torch import Tensor, nn

from implicit_meta.functional._tree import Params

LossFn = Callable[[nn.Module, Any], Tensor]
"""A user's loss: ``loss_fn(module, batch) -> scalar tensor``."""

_PREFIX = "model."


class _LossModule(nn.Module):
    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


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
        raise TypeError(f"{what} must return a scalar tensor, got {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(
            f"{what} must return a scalar (0-dim) tensor, got shape {tuple(value.shape)}; "
            "reduce it, e.g. with .mean()"
        )
    if not value.is_floating_point():
        raise ValueError(f"{what} must return a floating-point tensor, got dtype {value.dtype}")
    return value


def functional_loss(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    frozen: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    what: str = "loss_fn",
) -> Callable[[Params], Tensor]:
    """``phi -> loss_fn(model at phi, batch)``, a pure function of the trainable parameters.

    Buffers are cloned inside every call: in-place updates (BatchNorm running statistics) land in
    the clones, which are thrown away, so the model's buffers never change and the function stays
    pure under ``torch.func`` transforms.

    Args:
        model: The module to evaluate.
        loss_fn: ``loss_fn(module, batch) -> scalar tensor``.
        batch: Passed to ``loss_fn`` unchanged.
        frozen: Parameters that are not adapted (``requires_grad=False``), used as constants.
        buffers: Buffers to start every evaluation from.
        what: Name of the loss, for error messages.

    Returns:
        A scalar function of a parameter dict.
    """
    wrapper = _LossModule(model, loss_fn)
    constants = {_PREFIX + k: v for k, v in frozen.items()}

    def loss(params: Params) -> Tensor:
        state: dict[str, Tensor] = {_PREFIX + k: v for k, v in params.items()}
        state.update(constants)
        state.update({_PREFIX + k: v.clone() for k, v in buffers.items()})
        value = torch.func.functional_call(wrapper, state, (batch,), strict=False)
        return check_scalar_loss(value, what)

    return loss


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
