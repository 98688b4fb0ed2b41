"""The functional layer against dense linear algebra."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor

from implicit_meta.functional import (
    CGStatus,
    conjugate_gradient,
    implicit_meta_gradient,
    make_hvp,
)
from tests.conftest import dense_hessian, flatten, rel_err, unflatten


def _mlp_loss(x: Tensor, y: Tensor):
    def loss(p: dict[str, Tensor]) -> Tensor:
        h = torch.tanh(x @ p["w1"].T + p["b1"])
        return torch.nn.functional.cross_entropy(h @ p["w2"].T, y)

    return loss


def _mlp_params(device: torch.device) -> dict[str, Tensor]:
    opts = {"dtype": torch.float64, "device": device}
    return {
        "w1": torch.randn(5, 3, **opts),
        "b1": torch.randn(5, **opts),
        "w2": torch.randn(4, 5, **opts),
    }


@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse", "auto"])
def test_hvp_matches_dense_hessian(mode: str, device: torch.device) -> None:
    x = torch.randn(7, 3, dtype=torch.float64, device=device)
    y = torch.randint(0, 4, (7,), device=device)
    loss, params = _mlp_loss(x, y), _mlp_params(device)
    hessian = dense_hessian(loss, params)
    gradient, hvp_fn = make_hvp(loss, params, mode=mode)
    expected_grad = torch.func.grad(loss)(params)
    assert rel_err(flatten(gradient), flatten(expected_grad)) < 1e-12
    for _ in range(3):  # the graph is reused across products
        v = {k: torch.randn_like(t) for k, t in params.items()}
        assert rel_err(flatten(hvp_fn(v)), hessian @ flatten(v)) < 1e-10


def test_hvp_modes_agree_in_float32(device: torch.device) -> None:
    x = torch.randn(7, 3, device=device)
    y = torch.randint(0, 4, (7,), device=device)
    params = {k: v.float() for k, v in _mlp_params(device).items()}
    loss = _mlp_loss(x, y)
    v = {k: torch.randn_like(t) for k, t in params.items()}
    a = make_hvp(loss, params, mode="reverse_over_reverse")[1](v)
    b = make_hvp(loss, params, mode="forward_over_reverse")[1](v)
    assert rel_err(flatten(a), flatten(b)) < 1e-5


class _CubeNoJvp(torch.autograd.Function):
    """x**3 with a differentiable backward but no forward-mode rule."""

    @staticmethod
    def forward(x: Tensor) -> Tensor:  # type: ignore[override]
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[no-untyped-def,override]
        (x,) = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:  # type: ignore[no-untyped-def,override]
        (x,) = ctx.saved_tensors
        return grad_out * 3 * x**2


def test_forward_over_reverse_falls_back_when_forward_ad_is_missing() -> None:
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    fn = lambda p: _CubeNoJvp.apply(p["w"]).sum()  # noqa: E731
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.func.jvp(torch.func.grad(fn), ({"w": w},), ({"w": torch.ones_like(w)},))
    _, hvp_fn = make_hvp(fn, {"w": w}, mode="forward_over_reverse")
    with pytest.warns(RuntimeWarning, match="falling back to reverse-over-reverse"):
        out = hvp_fn({"w": torch.tensor([1.0, 1.0], dtype=torch.float64)})
    torch.testing.assert_close(out["w"], 6 * w)  # H = diag(6 w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        hvp_fn({"w": torch.tensor([1.0, 1.0], dtype=torch.float64)})


def test_unknown_hvp_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown hvp mode 'fast'"):
        make_hvp(lambda p: p["w"].sum(), {"w": torch.ones(1)}, mode="fast")


def _spd(n: int, device: torch.device, cond: float = 50.0) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, device=device))
    eig = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=torch.float64)
    return q @ torch.diag(eig.to(device)) @ q.T


def test_cg_solves_spd_system_exactly_in_n_steps(device: torch.device) -> None:
    a = _spd(12, device)
    b = torch.randn(12, dtype=torch.float64, device=device)
    out = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, max_steps=40, tol=1e-12)
    expected = torch.linalg.solve(a, b)
    assert rel_err(out.solution["x"], expected) < 1e-9
    assert CGStatus(int(out.status)) is CGStatus.CONVERGED
    assert 1 <= int(out.iterations) <= 14
    true_residual = torch.linalg.norm(b - a @ out.solution["x"])
    assert float(out.residual_norm) <= 1e-12 * float(b.norm()) * 10
    assert float(true_residual) < 1e-9


def test_cg_with_few_steps_reports_max_steps_and_true_residual(device: torch.device) -> None:
    a = _spd(30, device, cond=1e3)
    b = torch.randn(30, dtype=torch.float64, device=device)
    out = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, max_steps=3)
    assert CGStatus(int(out.status)) is CGStatus.MAX_STEPS
    assert int(out.iterations) == 3
    true_residual = torch.linalg.norm(b - a @ out.solution["x"])
    torch.testing.assert_close(out.residual_norm, true_residual, rtol=1e-8, atol=0)


def test_cg_on_dict_pytree_matches_block_solve(device: torch.device) -> None:
    a = _spd(7, device)
    like = {"u": torch.zeros(3, dtype=torch.float64), "v": torch.zeros(2, 2, dtype=torch.float64)}
    b = torch.randn(7, dtype=torch.float64, device=device)
    like = {k: t.to(device) for k, t in like.items()}

    def matvec(p: dict[str, Tensor]) -> dict[str, Tensor]:
        return unflatten(a @ flatten(p), like)

    out = conjugate_gradient(matvec, unflatten(b, like), max_steps=20, tol=1e-13)
    assert rel_err(flatten(out.solution), torch.linalg.solve(a, b)) < 1e-9


def test_cg_zero_rhs_is_converged_at_zero() -> None:
    a = torch.eye(3)
    out = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": torch.zeros(3)}, max_steps=3)
    assert CGStatus(int(out.status)) is CGStatus.CONVERGED
    assert int(out.iterations) == 0
    assert torch.equal(out.solution["x"], torch.zeros(3))


def test_cg_stops_at_nonpositive_curvature_with_last_good_iterate() -> None:
    # Indefinite A: the first direction (b) has positive curvature, the second does not.
    a = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    b = torch.tensor([2.0, 1.0], dtype=torch.float64)
    calls: list[int] = []

    def matvec(v: dict[str, Tensor]) -> dict[str, Tensor]:
        calls.append(1)
        return {"x": a @ v["x"]}

    out = conjugate_gradient(matvec, {"x": b}, max_steps=5)
    assert CGStatus(int(out.status)) is CGStatus.NONPOSITIVE_CURVATURE
    # One CG step from zero along b: alpha = b.b / b.A.b = 5 / 3.
    torch.testing.assert_close(out.solution["x"], 5.0 / 3.0 * b)
    assert int(out.iterations) == 1
    true_residual = torch.linalg.norm(b - a @ out.solution["x"])
    torch.testing.assert_close(out.residual_norm, true_residual)
    assert all(torch.isfinite(out.solution["x"]))


def test_cg_negative_curvature_on_first_direction_returns_rhs() -> None:
    a = -torch.eye(2, dtype=torch.float64)
    b = torch.tensor([1.0, 3.0], dtype=torch.float64)
    out = conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, max_steps=4)
    assert CGStatus(int(out.status)) is CGStatus.NONPOSITIVE_CURVATURE
    torch.testing.assert_close(out.solution["x"], b)
    assert int(out.iterations) == 0
    torch.testing.assert_close(out.residual_norm, torch.linalg.norm(b - a @ b))


def test_cg_nonfinite_product_is_flagged() -> None:
    out = conjugate_gradient(
        lambda v: {"x": v["x"] * float("nan")}, {"x": torch.ones(2)}, max_steps=3
    )
    assert CGStatus(int(out.status)) is CGStatus.NONFINITE


def test_cg_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="max_steps must be at least 1"):
        conjugate_gradient(lambda v: v, {"x": torch.ones(1)}, max_steps=0)
    with pytest.raises(ValueError, match="tol must be non-negative"):
        conjugate_gradient(lambda v: v, {"x": torch.ones(1)}, max_steps=1, tol=-1.0)


def test_cg_makes_no_host_sync_per_iteration() -> None:
    # Every iteration must stay on the device: a sync would show up as a call to Tensor.item,
    # __bool__ or tolist inside the loop; run CG on a matvec that forbids nothing and count.
    a = _spd(6, torch.device("cpu"))
    b = torch.randn(6, dtype=torch.float64)
    synced: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "tolist")}

    def spy(name: str):
        def wrapped(self: Tensor, *args: object, **kwargs: object) -> object:
            synced.append(name)
            return originals[name](self, *args, **kwargs)

        return wrapped

    try:
        for name in originals:
            setattr(torch.Tensor, name, spy(name))
        conjugate_gradient(lambda v: {"x": a @ v["x"]}, {"x": b}, max_steps=6)
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
    assert synced == []


def test_implicit_meta_gradient_is_reg_times_ridge_inverse(device: torch.device) -> None:
    a = _spd(6, device, cond=20.0)
    reg = 0.7
    inner = lambda p: 0.5 * p["w"] @ a @ p["w"]  # noqa: E731
    g = torch.randn(6, dtype=torch.float64, device=device)
    out = implicit_meta_gradient(
        inner,
        {"w": torch.zeros(6, dtype=torch.float64, device=device)},
        {"w": g},
        reg=reg,
        cg_steps=20,
        cg_tol=1e-14,
    )
    expected = reg * torch.linalg.solve(a + reg * torch.eye(6, dtype=a.dtype, device=device), g)
    assert rel_err(out.solution["w"], expected) < 1e-10


@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse"])
def test_products_carry_no_graph(mode: str) -> None:
    # A product that kept a graph would chain every CG iterate to the previous ones' graphs,
    # and memory would grow with CG steps (it did with torch.func.vjp products).
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    loss, params = _mlp_loss(x, y), _mlp_params(torch.device("cpu"))
    _, hvp_fn = make_hvp(loss, params, mode=mode)
    product = hvp_fn({k: torch.randn_like(t) for k, t in params.items()})
    assert not any(t.requires_grad for t in product.values())


def test_reverse_over_reverse_inside_vmap_matches_outside() -> None:
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (2, 7))
    params = _mlp_params(torch.device("cpu"))
    v = {k: torch.randn_like(t) for k, t in params.items()}

    def one(xt: Tensor, yt: Tensor) -> dict[str, Tensor]:
        return make_hvp(_mlp_loss(xt, yt), params, mode="reverse_over_reverse")[1](v)

    batched = torch.func.vmap(one)(x, y)
    for t in range(2):
        single = make_hvp(_mlp_loss(x[t], y[t]), params, mode="reverse_over_reverse")[1](v)
        assert rel_err(flatten({k: batched[k][t] for k in single}), flatten(single)) < 1e-12


@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse", "auto"])
def test_hvp_built_outside_composes_with_transforms_applied_later(mode: str) -> None:
    # A product function built outside torch.func, then vmapped over vectors or differentiated
    # with vjp (torchopt's normal CG takes A^T that way): the plain-autograd graph cannot see
    # the wrapped vector, and the transpose once came out as the identity. H is symmetric, so
    # the vjp of v -> H v at u is H u.
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    loss, params = _mlp_loss(x, y), _mlp_params(torch.device("cpu"))
    hessian = dense_hessian(loss, params)
    _, hvp_fn = make_hvp(loss, params, mode=mode)
    vectors = {k: torch.randn(3, *t.shape, dtype=t.dtype) for k, t in params.items()}
    batched = torch.func.vmap(hvp_fn)(vectors)
    for i in range(3):
        expected = hessian @ flatten({k: v[i] for k, v in vectors.items()})
        assert rel_err(flatten({k: v[i] for k, v in batched.items()}), expected) < 1e-10
    u = {k: torch.randn_like(t) for k, t in params.items()}
    _, vjp_fn = torch.func.vjp(hvp_fn, u)
    (transposed,) = vjp_fn(u)
    assert rel_err(flatten(transposed), hessian @ flatten(u)) < 1e-10


@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse"])
def test_proximal_objective_derivatives_at_theta(mode: str) -> None:
    # At phi = theta (where every inner solve starts) the proximal term's gradient is zero and
    # its Hessian is reg * I; a norm-based implementation gets NaN there.
    from implicit_meta.functional import proximal_objective

    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    loss, theta = _mlp_loss(x, y), _mlp_params(torch.device("cpu"))
    objective = proximal_objective(loss, theta, reg=0.7)
    v = {k: torch.randn_like(t) for k, t in theta.items()}
    grad_obj, hvp_obj = make_hvp(objective, theta, mode=mode)
    grad_loss, hvp_loss = make_hvp(loss, theta, mode=mode)
    assert rel_err(flatten(grad_obj), flatten(grad_loss)) < 1e-14
    expected = {k: hvp_loss(v)[k] + 0.7 * v[k] for k in v}
    assert rel_err(flatten(hvp_obj(v)), flatten(expected)) < 1e-12
    torch.testing.assert_close(
        objective({k: t + 1.0 for k, t in theta.items()}),
        loss({k: t + 1.0 for k, t in theta.items()})
        + 0.35 * sum(t.numel() for t in theta.values()),
    )
