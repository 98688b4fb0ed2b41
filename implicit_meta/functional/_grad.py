"""Gradients of a scalar function of a parameter dict, by the cheapest route available.

Inside ``torch.func`` transforms (vmap, grad) only ``torch.func.grad`` composes. Outside them,
plain autograd computes the same gradient without functorch's per-operator wrapping, which is
faster per inner step, and inner loops take many steps.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from implicit_meta.functional.tree import Params


def inside_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is active."""
    return torch._C._functorch.maybe_current_level() is not None


def grad(fn: Callable[[Params], Tensor]) -> Callable[[Params], Params]:
    """``params -> d fn / d params`` as a dict, like ``torch.func.grad(fn)``.

    Args:
        fn: Scalar function of a parameter dict.

    Returns:
        The gradient function; tensors ``fn`` does not depend on get zero gradients.

    Example:
        >>> import torch
        >>> grad(lambda p: (p["w"] ** 2).sum())({"w": torch.tensor([1.0, 3.0])})["w"]
        tensor([2., 6.])
    """

    def gradient(params: Params) -> Params:
        if inside_transform():
            return dict(torch.func.grad(fn)(params))
        names = list(params)
        leaves = [params[k].detach().requires_grad_(True) for k in names]
        with torch.enable_grad():
            value = fn(dict(zip(names, leaves, strict=True)))
            grads = torch.autograd.grad(value, leaves, allow_unused=True, materialize_grads=True)
        return dict(zip(names, grads, strict=True))

    return gradient
