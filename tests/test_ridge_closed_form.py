"""Meta-gradients on ridge regression against the closed form (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im
from tests.conftest import rel_err

DIM, N_SUPPORT, N_QUERY, REG = 5, 12, 9, 1.5


def half_mse(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return 0.5 * F.mse_loss(module(x).squeeze(-1), y)


def _problem(
    device: torch.device,
) -> tuple[nn.Module, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    opts = {"dtype": torch.float64, "device": device}
    model = nn.Linear(DIM, 1, bias=False).to(**opts)
    xs, ys = torch.randn(N_SUPPORT, DIM, **opts), torch.randn(N_SUPPORT, **opts)
    xq, yq = torch.randn(N_QUERY, DIM, **opts), torch.randn(N_QUERY, **opts)
    return model, (xs, ys), (xq, yq)


def closed_form(model: nn.Module, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor]):
    xs, ys = support
    xq, yq = query
    theta = model.weight.detach().reshape(-1)
    eye = torch.eye(DIM, dtype=theta.dtype, device=theta.device)
    a = xs.T @ xs / len(xs)  # Hessian of L_in
    phi = torch.linalg.solve(a + REG * eye, xs.T @ ys / len(xs) + REG * theta)
    outer_grad = xq.T @ (xq @ phi - yq) / len(xq)
    meta_grad = REG * torch.linalg.solve(a + REG * eye, outer_grad)
    return phi, meta_grad


SOLVERS = {
    "lbfgs": {"inner_steps": 50, "inner_lr": 1.0},
    "newton_cg": {"inner_steps": 6, "inner_lr": 1.0},
    "sgd": {"inner_steps": 3000, "inner_lr": 0.3},
    torch.optim.LBFGS: {"inner_steps": 3, "inner_lr": 1.0},
}


@pytest.mark.parametrize("inner", list(SOLVERS), ids=lambda s: getattr(s, "__name__", s))
def test_meta_gradient_matches_closed_form(inner: object, device: torch.device) -> None:
    model, support, query = _problem(device)
    phi_star, expected = closed_form(model, support, query)
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        reg=REG,
        inner=inner,
        cg_steps=20,
        cg_tol=1e-14,
        **SOLVERS[inner],
    )
    result = meta.meta_backward(half_mse, support, query)
    # Function-value line searches (L-BFGS) cannot resolve loss changes below eps * loss, which
    # caps float64 stationarity near 1e-9; that is still far inside the 1e-8 gradient target.
    assert float(result.stationarity) < 1e-8
    assert rel_err(model.weight.grad.reshape(-1), expected) <= 1e-8
    adapted = meta.adapt(half_mse, support)
    assert rel_err(adapted.params["weight"].reshape(-1), phi_star) <= 1e-8
    torch.testing.assert_close(result.outer_loss, half_mse(adapted, query).detach())


def test_sgd_with_few_steps_is_not_the_closed_form() -> None:
    # The check above can fail: an unsolved inner problem gives a measurably different gradient.
    model, support, query = _problem(torch.device("cpu"))
    _, expected = closed_form(model, support, query)
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        reg=REG,
        inner="sgd",
        inner_steps=2,
        inner_lr=0.1,
        cg_steps=20,
    )
    result = meta.meta_backward(half_mse, support, query)
    assert float(result.stationarity) > 1e-3
    assert rel_err(model.weight.grad.reshape(-1), expected) > 1e-4


def test_gradients_accumulate_like_backward() -> None:
    model, support, query = _problem(torch.device("cpu"))
    _, expected = closed_form(model, support, query)
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        reg=REG,
        inner="newton_cg",
        inner_steps=6,
        inner_lr=1.0,
        cg_steps=20,
        cg_tol=1e-14,
    )
    meta.meta_backward(half_mse, support, query)
    meta.meta_backward(half_mse, support, query)
    assert rel_err(model.weight.grad.reshape(-1), 2 * expected) <= 1e-8
    meta.zero_grad()
    assert model.weight.grad is None
