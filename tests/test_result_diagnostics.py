"""The relative diagnostics of MetaBackwardResult, against references computed independently."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im
from tests.conftest import dense_hessian, flatten

REG = 2.0
INNER_STEPS = 3
INNER_LR = 0.1


def mse(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.mse_loss(module(batch[0]), batch[1])


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()


def _batch(n: int = 8) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 2, dtype=torch.float64), torch.randn(n, 1, dtype=torch.float64)


def _loss_of(model: nn.Module, batch: tuple[Tensor, Tensor]):  # type: ignore[no-untyped-def]
    names = [n for n, _ in model.named_parameters()]

    def loss(params: dict[str, Tensor]) -> Tensor:
        return mse(lambda x: torch.func.functional_call(model, params, (x,)), batch)  # type: ignore[arg-type]

    return names, loss


def _autograd_grad(loss, params: dict[str, Tensor]) -> dict[str, Tensor]:  # type: ignore[no-untyped-def]
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    grads = torch.autograd.grad(loss(leaves), list(leaves.values()))
    return dict(zip(leaves, grads, strict=True))


def test_relative_diagnostics_match_a_dense_reference() -> None:
    model = _model()
    support, query = _batch(), _batch()
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        reg=REG,
        inner="sgd",
        inner_steps=INNER_STEPS,
        inner_lr=INNER_LR,
        cg_steps=2,  # few CG steps: a residual well above rounding, so the check has teeth
    )
    result = meta.meta_backward(mse, support, query)
    x = torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    # Independent reference: the inner solve by hand (plain gradient descent on the proximal
    # objective, autograd gradients), then the system I + H/reg as a dense matrix.
    _, inner = _loss_of(model, support)
    _, outer = _loss_of(model, query)
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    phi = dict(theta)
    for _ in range(INNER_STEPS):
        g = _autograd_grad(inner, phi)
        phi = {k: phi[k] - INNER_LR * (g[k] + REG * (phi[k] - theta[k])) for k in phi}
    b = flatten(_autograd_grad(outer, phi))
    a = torch.eye(b.numel(), dtype=torch.float64) + dense_hessian(inner, phi) / REG
    relative_residual = (b - a @ x).norm() / b.norm()
    assert relative_residual > 1e-8  # CG with 2 steps did not solve a 16-dimensional system
    torch.testing.assert_close(
        result.relative_cg_residual, relative_residual, rtol=1e-6, atol=1e-12
    )
    torch.testing.assert_close(
        result.relative_cg_residual, result.cg_residual / b.norm(), rtol=1e-10, atol=0.0
    )

    g_phi = _autograd_grad(inner, phi)
    gradient_of_objective = flatten({k: g_phi[k] + REG * (phi[k] - theta[k]) for k in phi})
    start = flatten(_autograd_grad(inner, theta)).norm()
    expected = gradient_of_objective.norm() / start
    assert 1e-3 < float(expected) < 1.0  # three steps made progress, not all the way
    torch.testing.assert_close(result.relative_stationarity, expected, rtol=1e-8, atol=0.0)
    assert result.relative_stationarity.shape == ()

    values = result.to_dict()
    assert values["relative_cg_residual"] == pytest.approx(float(relative_residual), rel=1e-5)
    assert values["relative_stationarity"] == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_batched_relative_diagnostics_are_per_task(strategy: str) -> None:
    model = _model()
    tasks = [(_batch(), _batch()) for _ in range(3)]
    settings = {"reg": REG, "inner_steps": INNER_STEPS, "inner_lr": INNER_LR, "cg_steps": 2}
    meta = im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), **settings)
    singles = [meta.meta_backward(mse, s, q) for s, q in tasks]
    support = tuple(torch.stack([s[i] for s, _ in tasks]) for i in range(2))
    query = tuple(torch.stack([q[i] for _, q in tasks]) for i in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # mse's hvp fallback under vmap
        batched = meta.meta_backward_batch(mse, support, query, strategy=strategy)
    for name in ("relative_stationarity", "relative_cg_residual"):
        per_task = getattr(batched, name)
        assert per_task.shape == (3,)
        expected = torch.stack([getattr(r, name) for r in singles])
        torch.testing.assert_close(per_task, expected, rtol=1e-7, atol=1e-14)
        assert batched.to_dict()[name] == pytest.approx(float(expected.mean()), rel=1e-5)


class Quadratic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))


def quadratic(module: nn.Module, curvature: Tensor) -> Tensor:  # H = diag(curvature)
    return 0.5 * (curvature * module.w**2).sum()  # type: ignore[operator]


def test_status_shares_and_closed_form_residuals() -> None:
    # Three convex tasks (A = I + diag(c)/reg, three distinct eigenvalues: CG is exact in three
    # steps) and one concave one (A has the eigenvalue 1 - 3 < 0: CG stops on its first step).
    convex = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    concave = torch.tensor([1.0, -3.0, 0.5], dtype=torch.float64)
    curvatures = torch.stack([convex, concave, convex * 2, convex * 3])
    model = Quadratic()
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), reg=1.0, inner_steps=0, cg_steps=3
    )
    with pytest.warns(
        RuntimeWarning, match="not positive definite at the adapted parameters in 1 of 4 tasks"
    ):
        result = meta.meta_backward_batch(quadratic, curvatures, curvatures, strategy="loop")

    shares = {k: float(v) for k, v in result.status_share().items()}
    assert shares == {
        "CONVERGED": 0.75,
        "MAX_STEPS": 0.0,
        "NONPOSITIVE_CURVATURE": 0.25,
        "NONFINITE": 0.0,
        "FIRST_ORDER": 0.0,
    }
    values = result.to_dict()
    assert values["status_share.CONVERGED"] == 0.75
    assert values["status_share.NONPOSITIVE_CURVATURE"] == 0.25
    assert values["status_share.MAX_STEPS"] == 0.0
    assert values["cg_status"] == "CONVERGED,NONPOSITIVE_CURVATURE"

    # Closed form: b = grad L(w = 1) = c; the concave task returns x = b, so its residual is
    # b - A b = -c * c / reg, and the converged tasks' residuals vanish.
    relative = result.relative_cg_residual
    expected = (concave * concave).norm() / concave.norm()
    torch.testing.assert_close(relative[1], expected, rtol=1e-12, atol=0.0)
    assert float(relative[[0, 2, 3]].max()) < 1e-10
    # No inner steps: phi = theta, so the inner gradient is all still there.
    torch.testing.assert_close(
        result.relative_stationarity, torch.ones(4, dtype=torch.float64), rtol=1e-12, atol=0.0
    )


def test_first_order_and_zero_gradients() -> None:
    model = Quadratic()
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), reg=1.0, inner_steps=2, cg_steps=0
    )
    zero = torch.zeros(3, dtype=torch.float64)
    result = meta.meta_backward(quadratic, zero, zero)  # L = 0: every gradient is zero
    assert result.status is im.CGStatus.FIRST_ORDER
    assert float(result.relative_cg_residual) == 0.0
    assert float(result.relative_stationarity) == 0.0  # 0/0: nothing to reduce, nothing left
    assert result.to_dict()["status_share.FIRST_ORDER"] == 1.0


def test_hand_built_result_keeps_working() -> None:
    scalars = (torch.tensor([0.5, 1.5]),) * 4
    result = im.MetaBackwardResult(*scalars, torch.tensor([2, 3]), torch.tensor([0, 1]))
    assert result.relative_stationarity.shape == (2,)
    assert torch.isnan(result.relative_cg_residual).all()
    values = result.to_dict()
    assert values["outer_loss"] == pytest.approx(1.0)
    assert values["cg_iterations"] == 3
    assert values["status_share.MAX_STEPS"] == 0.5
