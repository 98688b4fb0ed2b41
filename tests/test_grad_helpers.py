"""``implicit_meta.functional.grad``: the same derivatives in and out of ``torch.func`` transforms.

The reference is closed form: ``f(w, c, u) = 1/2 w^T A w + a^T w + sum(c^3)/3`` (``u`` unused)
has gradient ``(A w + a, c^2, 0)`` and Hessian ``blockdiag(A, diag(2 c), 0)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from implicit_meta.functional.grad import (
    grad,
    grad_and_value,
    inside_transform,
    reverse_over_reverse,
    vjp,
)

Params = dict[str, Tensor]

_A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
_a = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


def f(p: Params) -> Tensor:
    w, c = p["w"], p["c"]
    return 0.5 * w @ _A @ w + _a @ w + (c**3).sum() / 3


def f_twice_used(p: Params) -> Tensor:  # every parameter reaches the value (reverse-over-reverse)
    return f(p) + 0.5 * (p["u"] ** 2).sum()


def gradient_of(p: Params) -> Params:
    return {"w": _A @ p["w"] + _a, "c": p["c"] ** 2, "u": torch.zeros_like(p["u"])}


def params(seed: int = 0) -> Params:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(n, generator=g, dtype=torch.float64)
        for k, n in (("w", 3), ("c", 2), ("u", 2))
    }


def batch(count: int) -> Params:
    points = [params(seed) for seed in range(count)]
    return {k: torch.stack([p[k] for p in points]) for k in points[0]}


def assert_close(a: Params, b: Params) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-12, atol=1e-12)


@pytest.fixture
def no_torch_func(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``torch.func``'s entry points raise: what passes used plain autograd only."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.func used outside transforms")

    for name in ("grad", "grad_and_value", "vjp", "jvp"):
        monkeypatch.setattr(torch.func, name, refuse)
    yield


def test_inside_transform_is_false_outside_and_true_inside() -> None:
    assert not inside_transform()
    seen: list[bool] = []

    def probe(x: Tensor) -> Tensor:
        seen.append(inside_transform())
        return x

    torch.func.vmap(probe)(torch.zeros(2))
    torch.func.grad(lambda x: probe(x).sum())(torch.zeros(2))
    assert seen == [True, True]


def test_grad_and_value_outside_transforms_is_closed_form_by_autograd_alone(
    no_torch_func: None,
) -> None:
    p = params()
    gradient, value = grad_and_value(f, p)
    assert_close(gradient, gradient_of(p))  # the unused u gets zeros
    torch.testing.assert_close(value, f(p))
    assert not value.requires_grad
    assert not any(g.requires_grad for g in gradient.values())
    assert not any(torch._C._functorch.is_functorch_wrapped_tensor(g) for g in gradient.values())
    assert_close(grad(f)(p), gradient_of(p))
    assert not any(v.requires_grad for v in p.values())  # the caller's tensors are left alone


def test_grad_and_value_under_vmap_is_closed_form_per_point() -> None:
    points = batch(4)
    gradient, value = torch.func.vmap(lambda p: grad_and_value(f, p))(points)
    assert_close(gradient, torch.func.vmap(gradient_of)(points))
    torch.testing.assert_close(value, torch.func.vmap(f)(points))
    assert_close(torch.func.vmap(grad(f))(points), torch.func.vmap(gradient_of)(points))


def test_grad_and_value_composes_with_an_outer_grad() -> None:
    # d/dw sum(grad_w f) = A^T 1: only torch.func inside keeps the dependence on w.
    p = params()
    outer = torch.func.grad(lambda q: grad_and_value(f, q)[0]["w"].sum())(p)
    torch.testing.assert_close(outer["w"], _A.T @ torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(outer["c"], torch.zeros(2, dtype=torch.float64))


def test_grad_and_value_with_aux_in_and_out_of_vmap() -> None:
    def with_aux(p: Params) -> tuple[Tensor, dict[str, Tensor]]:
        return f(p), {"norm": p["w"].norm(), "twice": 2 * p["c"]}

    p = params()
    gradient, (value, aux) = grad_and_value(with_aux, p, has_aux=True)
    assert_close(gradient, gradient_of(p))
    torch.testing.assert_close(value, f(p))
    torch.testing.assert_close(aux["twice"], 2 * p["c"])
    assert not aux["twice"].requires_grad  # no graph kept to the autograd leaves

    points = batch(3)
    gradient, (value, aux) = torch.func.vmap(lambda q: grad_and_value(with_aux, q, has_aux=True))(
        points
    )
    assert_close(gradient, torch.func.vmap(gradient_of)(points))
    torch.testing.assert_close(aux["norm"], points["w"].norm(dim=1))


def test_vjp_is_the_transposed_jacobian_in_and_out_of_vmap() -> None:
    x = torch.randn(4, 3, dtype=torch.float64)

    def linear(p: Params) -> Tensor:
        return x @ p["w"] + p["c"].sum()

    p = params()
    cotangents = torch.randn(5, 4, dtype=torch.float64)
    # J^T u: x^T u for w, sum(u) for each entry of c, 0 for the unused u.
    expected = {
        "w": cotangents @ x,
        "c": cotangents.sum(1, keepdim=True).expand(5, 2),
        "u": torch.zeros(5, 2, dtype=torch.float64),
    }
    output, vjp_fn = vjp(linear, p)
    torch.testing.assert_close(output.detach(), linear(p))
    outside = {k: torch.stack([vjp_fn(u)[k] for u in cotangents]) for k in p}
    assert_close(outside, expected)
    inside = torch.func.vmap(lambda u: vjp(linear, p)[1](u))(cotangents)
    assert_close(inside, expected)


def test_vjp_outside_transforms_is_autograd_and_differentiable_with_create_graph(
    no_torch_func: None,
) -> None:
    # The double-backward trick Gauss-Newton products use: u -> J^T u is linear in u, so its
    # own backward in u gives J v. Needs create_graph, which torch.func's products do not have.
    x = torch.randn(4, 3, dtype=torch.float64)
    p = params()
    _, vjp_fn = vjp(lambda q: torch.tanh(x @ q["w"]), p)
    dual = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    transposed = vjp_fn(dual, create_graph=True)
    v = torch.randn(3, dtype=torch.float64)
    (jv,) = torch.autograd.grad(transposed["w"], dual, v)
    jacobian = (1 - torch.tanh(x @ p["w"]) ** 2)[:, None] * x
    torch.testing.assert_close(jv, jacobian @ v)
    plain = vjp_fn(torch.ones(4, dtype=torch.float64))
    assert not plain["w"].requires_grad  # without create_graph a product keeps no graph


def test_reverse_over_reverse_outside_transforms_is_closed_form_by_autograd_alone(
    no_torch_func: None,
) -> None:
    p = params()
    value, gradient, hvp_fn = reverse_over_reverse(f_twice_used, p)
    expected = gradient_of(p)
    expected["u"] = p["u"]
    assert_close(gradient, expected)
    torch.testing.assert_close(value, f(p) + 0.5 * (p["u"] ** 2).sum())
    v = params(seed=7)
    for _ in range(2):  # the gradient's graph is kept for every product
        product = hvp_fn(v)
        assert_close(product, {"w": _A @ v["w"], "c": 2 * p["c"] * v["c"], "u": v["u"]})
        assert not any(t.requires_grad for t in product.values())
    assert not value.requires_grad and not any(g.requires_grad for g in gradient.values())


def test_reverse_over_reverse_under_vmap_is_closed_form_per_point() -> None:
    points = batch(3)
    v = params(seed=7)

    def at(q: Params) -> tuple[Tensor, Params, Params]:
        value, gradient, hvp_fn = reverse_over_reverse(f, q)
        return value, gradient, hvp_fn(v)

    value, gradient, product = torch.func.vmap(at)(points)
    torch.testing.assert_close(value, torch.func.vmap(f)(points))
    assert_close(gradient, torch.func.vmap(gradient_of)(points))
    expected = {
        "w": (_A @ v["w"]).expand(3, 3),
        "c": 2 * points["c"] * v["c"],
        "u": torch.zeros(3, 2, dtype=torch.float64),
    }
    assert_close(product, expected)
