"""Derivatives of functions of a parameter dict, in and out of ``torch.func`` transforms.

Inside ``torch.func`` transforms (vmap, grad, jvp, ...) only ``torch.func`` composes. Outside
them, plain autograd computes the same derivatives without functorch's per-operator wrapping,
which is faster per call (inner loops take many steps), and a graph built once can serve many
products without each building (and, across CG iterations, chaining) a graph of its own.

Each helper here decides once, when it is called, which of the two it runs: ``torch.autograd``
on detached copies of the parameters outside transforms, ``torch.func`` inside. A product
function built outside transforms is an autograd graph: it cannot see a transform that wraps
its argument later (``vmap`` over vectors), so its callers check :func:`inside_transform` when
they call it and take the ``torch.func`` route there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol, overload

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from implicit_meta.functional.tree import Params

__all__ = [
    "VJPFn",
    "grad",
    "grad_and_value",
    "inside_transform",
    "reverse_over_reverse",
    "vjp",
]


class VJPFn(Protocol):
    """``cotangent -> J^T cotangent`` as a dict like the parameters (see :func:`vjp`)."""

    def __call__(self, cotangent: Tensor, *, create_graph: bool = False) -> Params:
        """The vector-Jacobian product; ``create_graph`` keeps its graph (outside transforms)."""
        ...


def inside_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, jvp, ...) is active.

    Returns:
        ``True`` inside one, where only ``torch.func`` composes.

    Example:
        >>> import torch
        >>> inside_transform()
        False
        >>> bool(torch.func.vmap(lambda x: torch.tensor(inside_transform()))(torch.zeros(2))[0])
        True
    """
    return torch._C._functorch.maybe_current_level() is not None


def _leaves(params: Params) -> tuple[list[str], list[Tensor]]:
    # Detached copies that require grad: autograd's graph starts here, never at the caller's.
    names = list(params)
    return names, [params[k].detach().requires_grad_(True) for k in names]


@overload
def grad_and_value(
    fn: Callable[[Params], Tensor], params: Params, *, has_aux: Literal[False] = False
) -> tuple[Params, Tensor]: ...


@overload
def grad_and_value(
    fn: Callable[[Params], tuple[Tensor, Any]], params: Params, *, has_aux: Literal[True]
) -> tuple[Params, tuple[Tensor, Any]]: ...


def grad_and_value(
    fn: Callable[[Params], Any], params: Params, *, has_aux: bool = False
) -> tuple[Params, Any]:
    """Gradient of a scalar function of a parameter dict, and its value, like ``torch.func``'s.

    Outside transforms one autograd backward pass; inside, ``torch.func.grad_and_value``.

    Args:
        fn: Scalar function of a parameter dict; with ``has_aux=True`` it returns
            ``(value, aux)``.
        params: Where the gradient is taken.
        has_aux: Whether ``fn`` returns ``(value, aux)``; ``aux`` (a pytree) comes back
            without a graph to ``params``.

    Returns:
        ``(gradient, value)`` or, with ``has_aux=True``, ``(gradient, (value, aux))``; the value
        is detached, and parameters ``fn`` does not use get zero gradients.

    Example:
        >>> import torch
        >>> f = lambda p: (p["w"] ** 2).sum()
        >>> g, value = grad_and_value(f, {"w": torch.tensor([1.0, 3.0])})
        >>> g["w"], value
        (tensor([2., 6.]), tensor(10.))
    """
    if inside_transform():
        gradient, result = torch.func.grad_and_value(fn, has_aux=has_aux)(params)
        value, aux = result if has_aux else (result, None)
        return dict(gradient), ((value.detach(), aux) if has_aux else value.detach())
    names, leaves = _leaves(params)
    with torch.enable_grad():
        result = fn(dict(zip(names, leaves, strict=True)))
        value, aux = result if has_aux else (result, None)
        grads = torch.autograd.grad(value, leaves, allow_unused=True, materialize_grads=True)
    gradient = dict(zip(names, grads, strict=True))
    if has_aux:
        return gradient, (value.detach(), pytree.tree_map_only(Tensor, Tensor.detach, aux))
    return gradient, value.detach()


def grad(fn: Callable[[Params], Tensor]) -> Callable[[Params], Params]:
    """``params -> d fn / d params`` as a dict, like ``torch.func.grad(fn)``.

    Args:
        fn: Scalar function of a parameter dict.

    Returns:
        The gradient function (:func:`grad_and_value` without the value); tensors ``fn`` does
        not depend on get zero gradients.

    Example:
        >>> import torch
        >>> grad(lambda p: (p["w"] ** 2).sum())({"w": torch.tensor([1.0, 3.0])})["w"]
        tensor([2., 6.])
    """

    def gradient(params: Params) -> Params:
        return grad_and_value(fn, params)[0]

    return gradient


def vjp(fn: Callable[[Params], Tensor], params: Params) -> tuple[Tensor, VJPFn]:
    """``fn(params)`` and its vector-Jacobian products ``u -> J^T u``, ``J = d fn / d params``.

    Outside transforms ``fn`` runs once under autograd and every product is one backward pass
    through that graph (kept for the next); ``create_graph=True`` makes the product itself
    differentiable, in the cotangent too. Inside transforms this is ``torch.func.vjp``, whose
    products always compose with the transforms around them.

    Args:
        fn: Tensor-valued function of a parameter dict.
        params: Where the Jacobian is taken.

    Returns:
        ``(output, vjp_fn)``; ``vjp_fn(u)`` is a dict like ``params`` (zeros for parameters
        ``fn`` does not use). Outside transforms ``output`` belongs to the products' graph.

    Example:
        >>> import torch
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> out, vjp_fn = vjp(lambda p: x @ p["w"], {"w": torch.ones(2)})
        >>> out.detach(), vjp_fn(torch.tensor([1.0, 0.0]))["w"]  # x^T e_1
        (tensor([3., 7.]), tensor([1., 2.]))
    """
    if inside_transform():
        output, func_vjp = torch.func.vjp(fn, params)  # type: ignore[misc]

        def func_product(cotangent: Tensor, *, create_graph: bool = False) -> Params:
            (result,) = func_vjp(cotangent)
            return dict(result)

        return output, func_product
    names, leaves = _leaves(params)
    with torch.enable_grad():
        output = fn(dict(zip(names, leaves, strict=True)))

    def product(cotangent: Tensor, *, create_graph: bool = False) -> Params:
        with torch.enable_grad():
            result = torch.autograd.grad(
                output,
                leaves,
                cotangent,
                retain_graph=True,
                create_graph=create_graph,
                materialize_grads=True,
            )
        return dict(zip(names, result, strict=True))

    return output, product


def _with_value(fn: Callable[[Params], Tensor]) -> Callable[[Params], tuple[Tensor, Tensor]]:
    # The value as torch.func's auxiliary output, so one pass gives the gradient and the value.
    def fn_and_value(params: Params) -> tuple[Tensor, Tensor]:
        value = fn(params)
        return value, value.detach()

    return fn_and_value


def reverse_over_reverse(
    fn: Callable[[Params], Tensor], params: Params
) -> tuple[Tensor, Params, Callable[[Params], Params]]:
    """Value and gradient of ``fn``, and Hessian-vector products by reverse-over-reverse.

    The gradient's graph is built once and each product is one backward pass through it (the
    Hessian is symmetric, so the vector-Jacobian product of the gradient is ``H v``). Outside
    transforms that graph is autograd's (``create_graph``) and a product builds no graph of its
    own; inside, it is ``torch.func.vjp`` of ``torch.func.grad``. Products built outside
    transforms must be called outside them too (the graph cannot see a wrapped vector):
    :func:`~implicit_meta.functional.make_hvp` takes care of that for its callers.

    Args:
        fn: Scalar function of a parameter dict, twice differentiable; outside transforms every
            parameter must reach the value.
        params: Where the gradient and the Hessian are taken.

    Returns:
        ``(value, gradient, hvp_fn)``; the value is detached, and so are the products.

    Example:
        >>> import torch
        >>> value, g, hvp_fn = reverse_over_reverse(lambda p: (p["w"] ** 3).sum(),
        ...                                         {"w": torch.tensor([1.0, 2.0])})
        >>> value, g["w"], hvp_fn({"w": torch.tensor([1.0, 1.0])})["w"]
        (tensor(9.), tensor([ 3., 12.]), tensor([ 6., 12.]))
    """
    if inside_transform():
        grad_fn = torch.func.grad(_with_value(fn), has_aux=True)
        gradient, func_vjp, value = torch.func.vjp(  # type: ignore[misc]
            grad_fn, params, has_aux=True
        )

        def func_hvp(vector: Params) -> Params:
            # Detached so that CG iterates do not chain the graphs func_vjp builds.
            (product,) = func_vjp(vector)
            return {k: v.detach() for k, v in product.items()}

        return value, dict(gradient), func_hvp
    # A graph for the gradient (create_graph), each product one backward through it: a
    # torch.func.vjp product would build (and chain) a graph of its own, in time and memory.
    names, leaves = _leaves(params)
    with torch.enable_grad():
        value = fn(dict(zip(names, leaves, strict=True)))
        grads = torch.autograd.grad(value, leaves, create_graph=True)

    def hvp_fn(vector: Params) -> Params:
        with torch.enable_grad():
            products = torch.autograd.grad(
                grads, leaves, grad_outputs=[vector[k] for k in names], retain_graph=True
            )
        return dict(zip(names, products, strict=True))

    gradient = {k: g.detach() for k, g in zip(names, grads, strict=True)}
    return value.detach(), gradient, hvp_fn
