"""Hessian-vector products of a scalar function of a parameter dict.

Two strategies, both exact:

* ``"reverse_over_reverse"``: ``torch.func.vjp`` of ``torch.func.grad``. The gradient's graph is
  built once and every later product reuses it, so k products cost one gradient plus k backward
  passes. This is what torchopt does, and it is the faster choice for the few products CG needs
  (see ``benchmarks/hvp_modes.py``).
* ``"forward_over_reverse"``: ``torch.func.jvp`` of ``torch.func.grad``. Keeps no graph between
  products and composes with ``vmap`` and later transforms wherever every operator of the loss
  has a forward-mode derivative (some double-backward rules, BatchNorm's, do not compose with
  ``vmap``), but each product repeats a forward and a backward pass. Where an operator lacks one
  (a custom ``autograd.Function`` without ``jvp``; ``F.mse_loss`` under ``vmap``, whose
  forward-over-reverse rule writes into an immutable zero tensor), the products fall back to
  reverse-over-reverse once, with a warning; the fallback is exact too.

Both work on models that call ``F.scaled_dot_product_attention`` (timm's ViTs): its fused
kernels have no second derivative (nor a forward-mode one), so the products build their graphs,
and run, with the math kernel (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``), which
computes the same attention; first-order code keeps the fused kernels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from implicit_meta.functional._attention import math_attention, with_math_attention
from implicit_meta.functional._stack import user_stacklevel
from implicit_meta.functional.grad import inside_transform, reverse_over_reverse
from implicit_meta.functional.tree import Params

HVPMode = Literal["auto", "reverse_over_reverse", "forward_over_reverse"]
"""How Hessian-vector products are computed; ``"auto"`` picks the measured-faster one."""

HVP_MODES: tuple[str, ...] = ("auto", "reverse_over_reverse", "forward_over_reverse")

ScalarFn = Callable[[Params], Tensor]
HVPFn = Callable[[Params], Params]


def resolve_hvp_mode(mode: str) -> str:
    """Turn ``"auto"`` into a concrete strategy and reject unknown names.

    Reverse-over-reverse reuses one gradient graph for every product, which made it the faster
    of the two on Conv4 in ``benchmarks/meta_step.py`` (figures on the Benchmarks page), so it is
    the default.

    Args:
        mode: One of ``"auto"``, ``"reverse_over_reverse"``, ``"forward_over_reverse"``.

    Returns:
        The concrete strategy name.

    Raises:
        ValueError: If ``mode`` is not a known strategy.

    Example:
        >>> resolve_hvp_mode("auto")
        'reverse_over_reverse'
    """
    if mode not in HVP_MODES:
        raise ValueError(f"unknown hvp mode {mode!r}; expected one of {', '.join(HVP_MODES)}")
    return "reverse_over_reverse" if mode == "auto" else mode


def _reverse_over_reverse(fn: ScalarFn, params: Params) -> tuple[Tensor, Params, HVPFn]:
    built_outside = not inside_transform()
    value, gradient, products = reverse_over_reverse(fn, params)
    if not built_outside:
        return value, gradient, products

    def hvp_fn(vector: Params) -> Params:
        if inside_transform():
            # Called inside a torch.func transform (vmap over vectors, vjp for a transpose) that
            # was not active when the graph was built: that graph cannot see the transform's
            # wrapped vector, so the product would come out as a constant (a vjp through it
            # would be silently zero). Forward-over-reverse composes with these transforms.
            _, product = torch.func.jvp(  # type: ignore[misc]
                torch.func.grad(fn), (params,), (vector,)
            )
            return dict(product)
        return products(vector)

    return value, gradient, hvp_fn


def _under_vmap(params: Params) -> bool:
    # Inside torch.func.vmap the inputs are BatchedTensor wrappers. Reverse-over-reverse fails
    # there for some operators (BatchNorm's double backward reads `.data`), while
    # forward-over-reverse composes with vmap, so "auto" switches to it.
    return any(torch._C._functorch.is_batchedtensor(v) for v in params.values())


def make_hvp(fn: ScalarFn, params: Params, *, mode: str = "auto") -> tuple[Params, HVPFn]:
    """Gradient of ``fn`` at ``params`` and a function computing Hessian-vector products there.

    ``"auto"`` is reverse-over-reverse, except inside ``torch.func.vmap``, where it is
    forward-over-reverse (some double-backward rules do not compose with vmap). The returned
    ``hvp_fn`` composes with transforms applied to it later (``vmap`` over vectors, ``vjp``):
    called inside one, a product built outside transforms is computed forward-over-reverse.

    Args:
        fn: Scalar function of a parameter dict, twice differentiable.
        params: Point at which the gradient and the Hessian are taken.
        mode: ``"auto"``, ``"reverse_over_reverse"`` or ``"forward_over_reverse"``.

    Returns:
        ``(gradient, hvp_fn)`` where ``hvp_fn(v)`` returns ``H v`` as a dict like ``params``.

    Raises:
        ValueError: If ``mode`` is unknown.

    Example:
        >>> import torch
        >>> f = lambda p: (p["w"] ** 3).sum()
        >>> g, hvp_fn = make_hvp(f, {"w": torch.tensor([1.0, 2.0])})
        >>> hvp_fn({"w": torch.tensor([1.0, 1.0])})["w"]
        tensor([ 6., 12.])
    """
    _, gradient, hvp_fn = value_grad_and_hvp(fn, params, mode=mode)
    return gradient, hvp_fn


def value_grad_and_hvp(
    fn: ScalarFn, params: Params, *, mode: str = "auto"
) -> tuple[Tensor, Params, HVPFn]:
    """Value and gradient of ``fn`` at ``params``, and Hessian-vector products there.

    Like :func:`make_hvp`, and the value comes out of the same forward pass, so callers that
    also need ``fn(params)`` save one evaluation.

    Args:
        fn: Scalar function of a parameter dict, twice differentiable.
        params: Point at which the gradient and the Hessian are taken.
        mode: ``"auto"``, ``"reverse_over_reverse"`` or ``"forward_over_reverse"``.

    Returns:
        ``(value, gradient, hvp_fn)``; the value is detached.

    Raises:
        ValueError: If ``mode`` is unknown.

    Example:
        >>> import torch
        >>> value, g, hvp_fn = value_grad_and_hvp(lambda p: (p["w"] ** 2).sum(),
        ...                                       {"w": torch.tensor([1.0, 2.0])})
        >>> value, g["w"]
        (tensor(5.), tensor([2., 4.]))
    """
    concrete = resolve_hvp_mode(mode)
    if mode == "auto" and _under_vmap(params):
        concrete = "forward_over_reverse"
    # Attention's fused kernels have no second derivative: the products build their graphs,
    # and run, with the math kernel (see implicit_meta.functional._attention).
    with math_attention():
        value, gradient, hvp_fn = _value_grad_and_hvp(fn, params, concrete)
    return value, gradient, with_math_attention(hvp_fn)


def _value_grad_and_hvp(
    fn: ScalarFn, params: Params, concrete: str
) -> tuple[Tensor, Params, HVPFn]:
    if concrete == "reverse_over_reverse":
        return _reverse_over_reverse(fn, params)

    gradient, value = torch.func.grad_and_value(fn)(params)
    gradient = dict(gradient)
    value = value.detach()
    fallback: list[HVPFn] = []

    def hvp_fn(vector: Params) -> Params:
        if fallback:
            return fallback[0](vector)
        try:
            _, product = torch.func.jvp(  # type: ignore[misc]
                torch.func.grad(fn), (params,), (vector,)
            )
        except (NotImplementedError, RuntimeError) as error:
            # Some operators (and custom autograd.Functions without ``jvp``) have no forward-mode
            # derivative; reverse-over-reverse needs only what backward already needs.
            warnings.warn(
                "forward-over-reverse Hessian-vector products are not available for an "
                "operator of this loss (no forward-mode derivative here); falling back to "
                "reverse-over-reverse, which computes the same products exactly, so the "
                "meta-gradient is unaffected and only the cost differs. "
                "hvp='reverse_over_reverse' skips the attempt. "
                f"(torch: {type(error).__name__}: {str(error).splitlines()[0]})",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
            fallback.append(_reverse_over_reverse(fn, params)[2])
            return fallback[0](vector)
        return dict(product)

    return value, gradient, hvp_fn


def hvp(fn: ScalarFn, params: Params, vector: Params, *, mode: str = "auto") -> Params:
    """One Hessian-vector product ``H(params) @ vector`` of a scalar function.

    Args:
        fn: Scalar function of a parameter dict.
        params: Point at which the Hessian is taken.
        vector: Direction, a dict shaped like ``params``.
        mode: ``"auto"``, ``"reverse_over_reverse"`` or ``"forward_over_reverse"``.

    Returns:
        ``H v`` as a dict shaped like ``params``.

    Raises:
        ValueError: If ``mode`` is unknown.

    Example:
        >>> import torch
        >>> f = lambda p: (p["w"] ** 2).sum()
        >>> hvp(f, {"w": torch.ones(2)}, {"w": torch.tensor([1.0, -1.0])})["w"]
        tensor([ 2., -2.])
    """
    _, hvp_fn = make_hvp(fn, params, mode=mode)
    return hvp_fn(vector)
