"""Meta-gradient of a nonlinear MLP against a dense solve and against torchopt's custom_root."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchopt
from torch import Tensor, nn

import implicit_meta as im
from implicit_meta.module_losses import functional_loss, split_state
from tests.conftest import dense_hessian, flatten, rel_err

REG = 2.0


def ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y)


def _task(device: torch.device):
    opts = {"dtype": torch.float64, "device": device}
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).to(**opts)
    support = (torch.randn(10, 3, **opts), torch.randint(0, 4, (10,), device=device))
    query = (torch.randn(12, 3, **opts), torch.randint(0, 4, (12,), device=device))
    return model, support, query


def _meta(model: nn.Module, **kw: object) -> im.ImplicitMetaOptimizer:
    settings: dict[str, object] = {
        "reg": REG,
        "inner": "newton_cg",
        "inner_steps": 12,
        "inner_lr": 1.0,
        "cg_steps": 60,
        "cg_tol": 1e-14,
    }
    settings.update(kw)
    return im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)  # type: ignore[arg-type]


@pytest.mark.parametrize("hvp", ["reverse_over_reverse", "forward_over_reverse"])
def test_meta_gradient_matches_dense_solve(hvp: str, device: torch.device) -> None:
    model, support, query = _task(device)
    meta = _meta(model, hvp=hvp)
    result = meta.meta_backward(ce, support, query)
    assert float(result.stationarity) < 1e-10
    phi = dict(meta.adapt(ce, support).params)
    _, frozen, buffers = split_state(model)
    inner = functional_loss(model, ce, support, frozen, buffers)
    outer = functional_loss(model, ce, query, frozen, buffers)
    hessian = dense_hessian(inner, phi)
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=device)
    outer_grad = flatten(torch.func.grad(outer)(phi))
    expected = torch.linalg.solve(eye + hessian / REG, outer_grad)
    got = flatten({k: p.grad for k, p in model.named_parameters()})
    assert rel_err(got, expected) <= 1e-6


def test_meta_gradient_matches_torchopt_custom_root() -> None:
    model, support, query = _task(torch.device("cpu"))
    meta = _meta(model)
    meta.meta_backward(ce, support, query)
    ours = flatten({k: p.grad for k, p in model.named_parameters()})

    names = [k for k, _ in model.named_parameters()]
    _, frozen, buffers = split_state(model)
    inner = functional_loss(model, ce, support, frozen, buffers)
    outer = functional_loss(model, ce, query, frozen, buffers)

    def proximal(phi: tuple[Tensor, ...], theta: tuple[Tensor, ...]) -> Tensor:
        distance = sum(((p - t) ** 2).sum() for p, t in zip(phi, theta, strict=True))
        return inner(dict(zip(names, phi, strict=True))) + 0.5 * REG * distance

    # torchopt's own iMAML recipe: the optimality condition is the gradient of the objective.
    @torchopt.diff.implicit.custom_root(
        torch.func.grad(proximal, argnums=0),
        argnums=1,
        solve=torchopt.linear_solve.solve_cg(maxiter=200, rtol=1e-14),
    )
    def solve(phi0: tuple[Tensor, ...], theta: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        # Any converged solver will do: custom_root never differentiates through it.
        adapted = meta.adapt(ce, support)
        return tuple(adapted.params[name] for name in names)

    theta = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())
    phi = solve(tuple(t.detach() for t in theta), theta)
    loss = outer(dict(zip(names, phi, strict=True)))
    reference = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, theta)])
    assert rel_err(ours, reference) <= 1e-5


def test_first_order_limit_reg_to_infinity() -> None:
    # As reg grows, (I + H/reg)^-1 -> I: the meta-gradient tends to grad L_out at phi ~ theta.
    model, support, query = _task(torch.device("cpu"))
    meta = _meta(model, reg=1e8, inner_steps=2)
    meta.meta_backward(ce, support, query)
    got = flatten({k: p.grad for k, p in model.named_parameters()})
    model.zero_grad()
    ce(model, query).backward()
    expected = flatten({k: p.grad for k, p in model.named_parameters()})
    assert rel_err(got, expected) < 1e-6
