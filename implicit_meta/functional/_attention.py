"""Second-order products on models that call ``scaled_dot_product_attention``.

PyTorch's fused attention kernels (flash and memory-efficient, on CPU and GPU) have a backward
but no derivative of that backward, and no forward-mode rule, so a Hessian-vector or
Gauss-Newton product through a model that calls ``F.scaled_dot_product_attention`` (timm's
ViTs, ``nn.MultiheadAttention``) fails with "derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented". The math kernel
is made of ordinary differentiable operators and computes the same attention, so the products
select it while they build their graphs and while they run. Only the second-order products do:
the inner loop and the first-order meta-gradient keep the fused kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TypeVar

from torch.nn.attention import SDPBackend, sdpa_kernel

_T = TypeVar("_T")
_R = TypeVar("_R")


def math_attention() -> AbstractContextManager[object]:
    """A context in which ``scaled_dot_product_attention`` uses its twice-differentiable kernel."""
    return sdpa_kernel(SDPBackend.MATH)


def with_math_attention(product: Callable[[_T], _R]) -> Callable[[_T], _R]:
    """``product`` run under :func:`math_attention` at every call."""

    def wrapped(vector: _T) -> _R:
        with math_attention():
            return product(vector)

    return wrapped
