"""Gauss-Newton products against dense J^T H_l J, curvlinops, and the ridge closed form."""

from __future__ import annotations

import curvlinops
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im
from implicit_meta.functional import CGStatus, ComposedLoss, gauss_newton_products
from implicit_meta.functional.adjoint import ImplicitAdjoint, solve_adjoint
from implicit_meta.models import Conv4
from implicit_meta.module_losses import functional_inner_loss, split_state
from tests.conftest import flatten, unflatten


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 4),
    ).double()


def _dense_ggn(model: nn.Module, batch: tuple[Tensor, Tensor], criterion) -> Tensor:
    """J^T H_l J from the full Jacobian and the output Hessian, both by torch.func."""
    params, _, buffers = split_state(model)
    x, y = batch

    def outputs(flat: Tensor) -> Tensor:
        state = {**unflatten(flat, params), **{k: v.clone() for k, v in buffers.items()}}
        return torch.func.functional_call(model, state, (x,))

    # Row by row with plain autograd (vectorize=False): torch.func's vmapped rows are not
    # trusted with BatchNorm in training mode (see conftest.dense_hessian).
    flat = flatten(params)
    out = outputs(flat)
    jac = torch.autograd.functional.jacobian(lambda f: outputs(f).reshape(-1), flat)
    hess = torch.autograd.functional.hessian(
        lambda o: criterion(o.reshape(out.shape), y), out.reshape(-1).detach()
    )
    return jac.T @ hess @ jac


CASES = {
    "mlp cross-entropy": (_mlp, (torch.randn(7, 4), torch.randint(0, 3, (7,))), F.cross_entropy),
    "mlp mse": (_mlp, (torch.randn(7, 4), torch.randn(7, 3)), F.mse_loss),
    "conv batchnorm": (
        _conv_bn,
        (torch.randn(6, 1, 6, 6), torch.randint(0, 4, (6,))),
        F.cross_entropy,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ggn_product_equals_dense(case: str) -> None:
    make, (x, y), criterion = CASES[case]
    model = make()
    batch = (x.double() if x.is_floating_point() else x, y.double() if y.is_floating_point() else y)
    params, frozen, buffers = split_state(model)
    loss = functional_inner_loss(model, im.output_loss(criterion), batch, frozen, buffers)
    assert isinstance(loss, ComposedLoss)
    dense = _dense_ggn(model, batch, criterion)
    value, gradient, product = gauss_newton_products(loss, params)
    vectors = torch.randn(3, dense.shape[0], dtype=torch.float64)
    for v in vectors:
        got = flatten(product(unflatten(v, params)))
        torch.testing.assert_close(got, dense @ v, rtol=1e-10, atol=1e-12)
    # Called under a transform applied later (vmap over vectors), the product switches route.
    batched = torch.func.vmap(lambda v: flatten(product(unflatten(v, params))))(vectors)
    torch.testing.assert_close(batched, vectors @ dense.T, rtol=1e-10, atol=1e-12)
    # The gradient and value from the same pass.
    reference_grad = torch.func.grad(lambda f: loss(unflatten(f, params)))(flatten(params))
    torch.testing.assert_close(flatten(gradient), reference_grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(value, loss(params))
    assert float(torch.linalg.eigvalsh(dense).min()) > -1e-12  # PSD, as the theory says


def test_ggn_equals_curvlinops_on_an_mlp() -> None:
    """curvlinops (another library) multiplies the same mini-batch GGN."""
    model = _mlp()
    x, y = torch.randn(9, 4, dtype=torch.float64), torch.randint(0, 3, (9,))
    params, frozen, buffers = split_state(model)
    loss = functional_inner_loss(model, im.output_loss(F.cross_entropy), (x, y), frozen, buffers)
    _, _, product = gauss_newton_products(loss, params)
    operator = curvlinops.GGNLinearOperator(
        model, nn.CrossEntropyLoss(), list(model.parameters()), [(x, y)]
    )
    v = torch.randn(sum(p.numel() for p in params.values()), dtype=torch.float64)
    torch.testing.assert_close(
        flatten(product(unflatten(v, params))), operator @ v, rtol=1e-10, atol=1e-12
    )


def test_gauss_newton_equals_ridge_closed_form_for_least_squares() -> None:
    """Linear least squares: G = H, so the meta-gradient is the ridge closed form."""
    n, d, reg = 12, 4, 2.0
    x, y = torch.randn(n, d, dtype=torch.float64), torch.randn(n, 1, dtype=torch.float64)
    xq, yq = torch.randn(5, d, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        inner="lbfgs",
        inner_steps=50,
        inner_lr=1.0,
        adjoint=im.ImplicitAdjoint(reg=reg, curvature="gauss_newton", cg_steps=d, cg_tol=0.0),
    )
    half_sse = im.output_loss(lambda out, target: 0.5 * ((out - target) ** 2).sum())
    result = meta.meta_backward(half_sse, (x, y), (xq, yq))
    assert result.status in (CGStatus.CONVERGED, CGStatus.MAX_STEPS)
    theta = model.weight.detach().reshape(-1)
    system = x.T @ x + reg * torch.eye(d, dtype=torch.float64)
    phi = torch.linalg.solve(system, x.T @ y.reshape(-1) + reg * theta)
    outer_grad = xq.T @ (xq @ phi - yq.reshape(-1))
    expected = reg * torch.linalg.solve(system, outer_grad)
    got = model.weight.grad.reshape(-1)
    assert float((got - expected).norm() / expected.norm()) <= 1e-8


@pytest.mark.parametrize("reg", [0.1, 1.0, 2.0, 20.0])
def test_gauss_newton_cg_is_well_posed_on_conv4(reg: float) -> None:
    torch.manual_seed(1)
    model = Conv4(in_channels=1, num_classes=5, width=8, image_size=28).double().train()
    support = (torch.rand(5, 1, 28, 28, dtype=torch.float64), torch.arange(5))
    query = (torch.rand(10, 1, 28, 28, dtype=torch.float64), torch.arange(10) % 5)
    params, frozen, buffers = split_state(model)
    inner = functional_inner_loss(model, im.output_loss(F.cross_entropy), support, frozen, buffers)
    outer = functional_inner_loss(model, im.output_loss(F.cross_entropy), query, frozen, buffers)
    phi = im.functional.solve_inner(
        inner, params, im.get_inner_solver("sgd"), reg=reg, steps=5, lr=min(0.1, 1.0 / reg)
    )
    b = dict(torch.func.grad(outer)(phi))
    short = solve_adjoint(ImplicitAdjoint(reg=reg, curvature="gauss_newton"), inner, phi, b)
    assert int(short.cg.status) != CGStatus.NONPOSITIVE_CURVATURE
    # The Hessian system at the same point is indefinite (this is why Gauss-Newton exists).
    long = solve_adjoint(
        ImplicitAdjoint(reg=reg, curvature="gauss_newton", cg_steps=400, cg_tol=1e-7),
        inner,
        phi,
        b,
    )
    assert CGStatus(int(long.cg.status)) == CGStatus.CONVERGED
    _, _, product = gauss_newton_products(inner, phi)
    x = long.cg.solution
    residual = {k: b[k] - x[k] - product(x)[k] / reg for k in b}
    assert float(flatten(residual).norm() / flatten(b).norm()) <= 1e-6


def test_conv4_hessian_system_is_indefinite_where_gauss_newton_is_not() -> None:
    """The reason for the Gauss-Newton default: at reg 1 the Hessian CG stops early."""
    torch.manual_seed(2)
    model = Conv4(in_channels=1, num_classes=5, width=8, image_size=28).double().train()
    support = (torch.rand(5, 1, 28, 28, dtype=torch.float64), torch.arange(5))
    params, frozen, buffers = split_state(model)
    inner = functional_inner_loss(model, im.output_loss(F.cross_entropy), support, frozen, buffers)
    phi = im.functional.solve_inner(
        inner, params, im.get_inner_solver("sgd"), reg=1.0, steps=5, lr=0.1
    )
    b = {k: torch.randn_like(v) for k, v in phi.items()}
    statuses = {
        curvature: CGStatus(
            int(
                solve_adjoint(
                    ImplicitAdjoint(reg=1.0, curvature=curvature, cg_steps=50), inner, phi, b
                ).cg.status
            )
        )
        for curvature in ("hessian", "gauss_newton")
    }
    assert statuses["hessian"] == CGStatus.NONPOSITIVE_CURVATURE
    assert statuses["gauss_newton"] != CGStatus.NONPOSITIVE_CURVATURE
