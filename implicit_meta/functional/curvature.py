"""Curvature-vector products of the inner loss: the Hessian, or the generalized Gauss-Newton.

The implicit meta-gradient solves ``(I + C/reg) x = b`` with ``C`` a curvature of the inner loss
at the adapted parameters. The exact choice is the Hessian ``H``; on networks that are only
piecewise smooth (ReLU, max-pooling) or solved for a few steps, ``H`` is indefinite and CG on
that system is ill posed. The generalized Gauss-Newton matrix ``G = J^T H_l J`` (``J`` the
Jacobian of the model's outputs in the parameters, ``H_l`` the Hessian of the loss in the
outputs) is positive semidefinite whenever the loss is convex in the outputs (cross-entropy,
squared error), equals ``H`` where the residuals vanish (linear least squares), and is what
Hessian-free optimisation (Martens 2010) uses for the same reason.

A Gauss-Newton product needs the outputs apart from the loss, so the inner loss must come as a
:class:`ComposedLoss` (``criterion(outputs(phi))``).

Every curvature's products (a user's too) run attention on its twice-differentiable math kernel,
as the Hessian-vector products do (see :mod:`implicit_meta.functional.hvp`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from implicit_meta.functional._attention import math_attention, with_math_attention
from implicit_meta.functional.grad import (
    grad_and_value,
    inside_transform,
    reverse_over_reverse,
    vjp,
)
from implicit_meta.functional.hvp import HVPFn, ScalarFn, value_grad_and_hvp
from implicit_meta.functional.tree import Params

CURVATURES: tuple[str, ...] = ("auto", "hessian", "gauss_newton")
"""Named curvatures; ``"auto"`` is Gauss-Newton for a :class:`ComposedLoss`, else the Hessian."""


class CurvatureFn(Protocol):
    """A user's curvature: ``curvature(inner_loss, phi) -> (v -> C v)``.

    It is called once per task with the inner loss (a scalar function of a parameter dict, a
    :class:`ComposedLoss` when the user stated one) and the adapted parameters, and returns the
    product function CG calls a few times. ``C`` should be symmetric positive semidefinite for
    CG to be well posed. The products must be pure tensor functions (no ``.item()``) to run
    under ``torch.func.vmap``.

    Example:
        >>> import torch
        >>> def diagonal_curvature(inner_loss, phi):
        ...     return lambda v: {k: 2.0 * t for k, t in v.items()}  # C = 2 I
        >>> product = diagonal_curvature(None, {"w": torch.zeros(2)})
        >>> product({"w": torch.ones(2)})["w"]
        tensor([2., 2.])
    """

    def __call__(self, inner_loss: ScalarFn, phi: Params) -> HVPFn:
        """The product function ``v -> C v`` at ``phi``."""
        ...


@dataclass(frozen=True)
class ComposedLoss:
    """A scalar loss stated as ``criterion(outputs(phi))``, so Gauss-Newton products can split it.

    Calling it evaluates the whole loss, so it serves everywhere a plain scalar function of a
    parameter dict does (inner solvers, Hessian products).

    Attributes:
        outputs: ``phi -> outputs``, the model's output tensor on the batch's inputs.
        criterion: ``outputs -> scalar loss`` (the targets bound in).

    Example:
        >>> import torch
        >>> x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0], [3.0]])
        >>> loss = ComposedLoss(lambda p: x @ p["w"], lambda out: ((out - y) ** 2).mean())
        >>> loss({"w": torch.ones(1, 1)})
        tensor(0.5000)
    """

    outputs: Callable[[Params], Tensor]
    criterion: Callable[[Tensor], Tensor]

    def __call__(self, params: Params) -> Tensor:
        """The loss ``criterion(outputs(params))``."""
        return self.criterion(self.outputs(params))


def resolve_curvature(curvature: str | CurvatureFn, inner_loss: ScalarFn) -> str | CurvatureFn:
    """Turn ``"auto"`` into a concrete curvature for ``inner_loss`` and check that it fits.

    Args:
        curvature: ``"auto"``, ``"hessian"``, ``"gauss_newton"`` or a :class:`CurvatureFn`.
        inner_loss: The inner loss the products will be taken of.

    Returns:
        ``"hessian"``, ``"gauss_newton"`` or the user's function.

    Raises:
        ValueError: For an unknown name, or Gauss-Newton asked of a loss that is not a
            :class:`ComposedLoss` (the message names the fix).

    Example:
        >>> resolve_curvature("auto", lambda p: p["w"].sum())
        'hessian'
    """
    if callable(curvature):
        return curvature
    if curvature not in CURVATURES:
        raise ValueError(
            f"unknown curvature {curvature!r}; expected one of {', '.join(CURVATURES)} "
            "or a function (inner_loss, phi) -> (v -> C v)"
        )
    if curvature == "auto":
        return "gauss_newton" if isinstance(inner_loss, ComposedLoss) else "hessian"
    if curvature == "gauss_newton" and not isinstance(inner_loss, ComposedLoss):
        raise ValueError(
            "curvature='gauss_newton' needs the model's outputs apart from the loss: state the "
            "inner loss as implicit_meta.output_loss(criterion), for example "
            "im.output_loss(F.cross_entropy) on batches (inputs, targets), or use "
            "curvature='hessian'"
        )
    return curvature


def curvature_products(
    curvature: str | CurvatureFn, inner_loss: ScalarFn, phi: Params, *, hvp_mode: str = "auto"
) -> tuple[Tensor, Params, HVPFn]:
    """Value and gradient of ``inner_loss`` at ``phi``, and curvature-vector products there.

    Args:
        curvature: ``"auto"``, ``"hessian"``, ``"gauss_newton"`` or a :class:`CurvatureFn`.
        inner_loss: The inner loss (a :class:`ComposedLoss` for Gauss-Newton).
        phi: Where the curvature is taken.
        hvp_mode: Hessian-vector product strategy for ``"hessian"`` (see
            :func:`~implicit_meta.functional.make_hvp`).

    Returns:
        ``(value, gradient, product_fn)``; the value is detached.

    Raises:
        ValueError: As :func:`resolve_curvature`.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
        >>> loss = ComposedLoss(lambda p: x @ p["w"], lambda out: 0.5 * (out**2).sum())
        >>> _, _, ggn = curvature_products("gauss_newton", loss, {"w": torch.zeros(2)})
        >>> ggn({"w": torch.tensor([1.0, 0.0])})["w"]  # X^T X e_1
        tensor([2., 2.])
    """
    concrete = resolve_curvature(curvature, inner_loss)
    if concrete == "hessian":
        return value_grad_and_hvp(inner_loss, phi, mode=hvp_mode)
    if concrete == "gauss_newton":
        assert isinstance(inner_loss, ComposedLoss)  # resolve_curvature checked it
        return gauss_newton_products(inner_loss, phi)
    assert callable(concrete)
    gradient, value = grad_and_value(inner_loss, phi)
    # A user's products are second-order too: attention runs on its math kernel in them.
    with math_attention():
        product = concrete(inner_loss, phi)
    return value, gradient, with_math_attention(product)


def gauss_newton_products(loss: ComposedLoss, params: Params) -> tuple[Tensor, Params, HVPFn]:
    """Value and gradient of ``loss`` at ``params``, and products with ``J^T H_l J`` there.

    ``J`` is the Jacobian of ``loss.outputs`` over the whole batch (so BatchNorm's coupling of
    the samples is included) and ``H_l`` the Hessian of ``loss.criterion`` in the outputs. The
    gradient ``J^T grad_l`` comes out of the same forward pass.

    Outside ``torch.func`` transforms plain autograd builds one graph and every product reuses
    it: ``J v`` by the double-backward trick (the vector-Jacobian product ``u -> J^T u`` is
    linear in ``u``, so its own backward gives ``J v``), ``H_l`` on the small output tensor, and
    ``J^T`` by one more backward. Inside transforms (vmap) the products are ``torch.func.jvp``
    and one ``torch.func.vjp`` built once. A product function made outside transforms and called
    inside one (vmap over vectors, say) switches to the ``torch.func`` route, since the
    graph cannot see the transform's wrapped vector.

    Args:
        loss: The inner loss as ``criterion(outputs(params))``.
        params: Where the products are taken.

    Returns:
        ``(value, gradient, product_fn)``; the value is detached.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> loss = ComposedLoss(lambda p: x @ p["w"], lambda out: (out**2).sum())
        >>> value, grad, ggn = gauss_newton_products(loss, {"w": torch.ones(2)})
        >>> value, grad["w"], ggn({"w": torch.ones(2)})["w"]  # 2 x^T x v
        (tensor(9.), tensor([ 6., 12.]), tensor([ 6., 12.]))
    """
    # J v needs a derivative of the outputs' backward (double backward, or forward mode), which
    # attention's fused kernels lack: the products build their graphs, and run, with the math
    # kernel (see implicit_meta.functional._attention).
    with math_attention():
        value, gradient, product = _gauss_newton(loss, params)
    return value, gradient, with_math_attention(product)


_OUTPUTS = "outputs"


def _gauss_newton(loss: ComposedLoss, params: Params) -> tuple[Tensor, Params, HVPFn]:
    built_outside = not inside_transform()
    outputs, outputs_vjp = vjp(loss.outputs, params)
    # H_l by reverse-over-reverse on the (small) outputs: it is symmetric, so the vjp of the
    # criterion's gradient is the product. Forward mode through some criteria fails under vmap
    # (mse_loss's double backward meets an immutable ZeroTensor there).
    value, out_grad, criterion_hvp = reverse_over_reverse(
        lambda out: loss.criterion(out[_OUTPUTS]), {_OUTPUTS: outputs}
    )
    gradient = outputs_vjp(out_grad[_OUTPUTS])
    if built_outside:
        # u -> J^T u with u a leaf: differentiating it in u (it is linear) gives J v, one more
        # backward through the graph already built.
        dual = torch.zeros_like(outputs, requires_grad=True)
        transposed = outputs_vjp(dual, create_graph=True)

        def jacobian_product(vector: Params) -> Tensor:
            with torch.enable_grad():
                (jv,) = torch.autograd.grad(
                    list(transposed.values()),
                    dual,
                    [vector[k] for k in transposed],
                    retain_graph=True,
                    materialize_grads=True,
                )
            return jv

    else:

        def jacobian_product(vector: Params) -> Tensor:
            _, jv = torch.func.jvp(loss.outputs, (params,), (vector,))  # type: ignore[misc]
            return jv  # type: ignore[no-any-return]

    func_route: list[HVPFn] = []

    def product(vector: Params) -> Params:
        if built_outside and inside_transform():
            # Built outside transforms, called inside one (vmap over vectors): the graph cannot
            # see the transform's wrapped vector, so the torch.func route is built, once.
            if not func_route:
                func_route.append(_gauss_newton(loss, params)[2])
            return func_route[0](vector)
        hjv = criterion_hvp({_OUTPUTS: jacobian_product(vector)})[_OUTPUTS]
        # Detached so that CG iterates do not chain the graphs of successive products.
        return {k: v.detach() for k, v in outputs_vjp(hjv).items()}

    return value, {k: v.detach() for k, v in gradient.items()}, product
