"""The adjoint: first-order, damping, the official code's system, finite differences, vmap."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im
from implicit_meta.fewshot import TrainConfig, build_meta_optimizer
from implicit_meta.functional import CGStatus, ImplicitAdjoint, solve_adjoint
from implicit_meta.module_losses import functional_inner_loss, split_state
from implicit_meta.solvers import get_inner_solver
from implicit_meta.solvers.first_order import proximal_step_limit
from tests.conftest import dense_hessian, flatten, rel_err, unflatten

CE = im.output_loss(F.cross_entropy)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _point(model: nn.Module):
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 3, (8,))
    params, frozen, buffers = split_state(model)
    inner = functional_inner_loss(model, CE, (x, y), frozen, buffers)
    phi = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}
    b = {k: torch.randn_like(v) for k, v in params.items()}
    return inner, phi, b


def test_first_order_is_the_outer_gradient_exactly() -> None:
    model = _mlp()
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), cg_steps=0, inner_steps=3
    )
    support = (torch.randn(6, 3, dtype=torch.float64), torch.arange(6) % 3)
    query = (torch.randn(9, 3, dtype=torch.float64), torch.arange(9) % 3)
    result = meta.meta_backward(CE, support, query)
    assert result.status == CGStatus.FIRST_ORDER
    assert int(result.cg_iterations) == 0
    theta, frozen, buffers = split_state(model)
    inner = functional_inner_loss(model, CE, support, frozen, buffers)
    # The default reg of a whole-model problem is 1.
    phi = im.functional.solve_inner(inner, theta, get_inner_solver("sgd"), reg=1.0, steps=3, lr=0.1)
    outer = functional_inner_loss(model, CE, query, frozen, buffers)
    expected = torch.func.grad(outer)(phi)
    for name, param in model.named_parameters():
        assert torch.equal(param.grad, expected[name])


def test_default_is_first_order_and_naming_a_system_turns_cg_on() -> None:
    assert ImplicitAdjoint().cg_steps == 0 and ImplicitAdjoint().first_order
    model = _mlp()
    meta = im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert meta.adjoint == ImplicitAdjoint(cg_steps=0) and meta.adjoint.cg_steps == 0
    assert TrainConfig(adapt="all").adjoint().first_order
    assert TrainConfig().adjoint().cg_steps == 20  # the head study: the exact gradient of a head
    for field, value in [
        ("curvature", "gauss_newton"),
        ("damping", 0.5),
        ("curvature_scale", 0.5),
    ]:
        assert ImplicitAdjoint(**{field: value}).cg_steps == 5, field
        assert ImplicitAdjoint().replace(**{field: value}).cg_steps == 5, field
        assert TrainConfig(adapt="all", **{field: value}).adjoint().cg_steps == 5, field
        with pytest.raises(ValueError, match=f"{field} given with cg_steps=0"):
            ImplicitAdjoint(cg_steps=0, **{field: value})
    # How to compute is not what to compute (issue 20, item 5): first-order stays, no error.
    for field, value in [("cg_tol", 1e-6), ("hvp", "forward_over_reverse")]:
        assert ImplicitAdjoint(**{field: value}).first_order, field
        assert ImplicitAdjoint().replace(**{field: value}).first_order, field
        assert TrainConfig(adapt="all", **{field: value}).adjoint().first_order, field
        assert ImplicitAdjoint(cg_steps=0, **{field: value}).first_order, field
        assert ImplicitAdjoint(curvature="hessian", **{field: value}).cg_steps == 5, field
    assert ImplicitAdjoint(cg_steps=3).curvature == "auto"
    # A given cg_steps is kept by replace(); a derived one is derived again.
    assert ImplicitAdjoint(curvature="hessian", cg_steps=7).replace(damping=1.0).cg_steps == 7
    assert ImplicitAdjoint(curvature="hessian").replace(curvature="auto").cg_steps == 0
    assert ImplicitAdjoint.from_dict(ImplicitAdjoint().to_dict()) == ImplicitAdjoint()
    with pytest.raises(ValueError, match="cg_steps must be"):
        ImplicitAdjoint(cg_steps=-1)


@pytest.mark.parametrize(("damping", "scale"), [(0.0, 1.0), (1.5, 1.0), (0.5, 0.25)])
def test_damped_solve_equals_the_dense_solve(damping: float, scale: float) -> None:
    reg = 3.0
    inner, phi, b = _point(_mlp())
    hessian = dense_hessian(inner, phi)
    size = hessian.shape[0]
    eye = torch.eye(size, dtype=torch.float64)
    system = eye + (scale * hessian + damping * eye) / reg
    adjoint = ImplicitAdjoint(
        reg=reg,
        curvature="hessian",
        damping=damping,
        curvature_scale=scale,
        cg_steps=4 * size,
        cg_tol=1e-13,
    )
    got = solve_adjoint(adjoint, inner, phi, b).cg
    assert CGStatus(int(got.status)) == CGStatus.CONVERGED
    expected = torch.linalg.solve(system, flatten(b))
    assert rel_err(flatten(got.solution), expected) <= 1e-9


def test_official_imaml_system_is_reproduced_exactly() -> None:
    """aravindr93/imaml_dev: Av = (1 + regu_coef) v + H v / (lam + lam_damping)."""
    lam, lam_damping, regu_coef = 2.0, 10.0, 1.0
    inner, phi, b = _point(_mlp())
    hessian = dense_hessian(inner, phi)
    size = hessian.shape[0]
    official = (1.0 + regu_coef) * torch.eye(size, dtype=torch.float64) + hessian / (
        lam + lam_damping
    )
    adjoint = ImplicitAdjoint.official_imaml(
        lam, lam_damping=lam_damping, regu_coef=regu_coef, cg_steps=4 * size
    ).replace(cg_tol=1e-13)
    # The operator itself: one CG step from zero returns (b^T b / b^T A b) b, so compare A b.
    got = solve_adjoint(adjoint, inner, phi, b).cg.solution
    expected = torch.linalg.solve(official, flatten(b))
    assert rel_err(flatten(got), expected) <= 1e-9
    # At its Omniglot settings the system is 2 (I + H/24).
    assert torch.allclose(official, 2.0 * (torch.eye(size, dtype=torch.float64) + hessian / 24))


def _smooth_bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.GELU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * 2 * 2, 3),
    ).double()


def test_hessian_meta_gradient_equals_finite_differences_of_the_bilevel_problem() -> None:
    """d/dtheta L_out(phi*(theta)) by central differences, the inner problem solved exactly."""
    reg = 1.0
    model = _smooth_bn_net()
    support = (torch.randn(6, 1, 6, 6, dtype=torch.float64), torch.arange(6) % 3)
    query = (torch.randn(9, 1, 6, 6, dtype=torch.float64), torch.arange(9) % 3)
    theta, frozen, buffers = split_state(model)
    inner = functional_inner_loss(model, CE, support, frozen, buffers)
    outer = functional_inner_loss(model, CE, query, frozen, buffers)
    solver = get_inner_solver("newton_cg")

    def phi_star(t: dict[str, Tensor]) -> dict[str, Tensor]:
        return im.functional.solve_inner(
            inner, t, solver, reg=reg, steps=12, lr=1.0, solver_options={"cg_steps": 60}
        )

    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        inner="newton_cg",
        inner_steps=12,
        inner_lr=1.0,
        inner_options={"cg_steps": 60},
        adjoint=ImplicitAdjoint(reg=reg, curvature="hessian", cg_steps=300, cg_tol=1e-13),
    )
    result = meta.meta_backward(CE, support, query)
    assert float(result.stationarity) < 1e-10
    meta_grad = flatten({k: p.grad for k, p in model.named_parameters()})
    flat = flatten(theta)
    eps = 1e-4
    for _ in range(3):
        direction = torch.randn_like(flat)
        direction /= direction.norm()
        plus = outer(phi_star(unflatten(flat + eps * direction, theta)))
        minus = outer(phi_star(unflatten(flat - eps * direction, theta)))
        numeric = float((plus - minus) / (2 * eps))
        analytic = float(meta_grad @ direction)
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(numeric)), (numeric, analytic)


def _conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    ).double()


def _twice(inner_loss, phi):
    return lambda v: {k: 2.0 * t for k, t in v.items()}


ADJOINTS = {
    "hessian": ImplicitAdjoint(reg=10.0, curvature="hessian"),
    "gauss_newton": ImplicitAdjoint(reg=1.0, curvature="gauss_newton"),
    "auto": ImplicitAdjoint(reg=1.0),
    "damped": ImplicitAdjoint(reg=1.0, curvature="gauss_newton", damping=0.5),
    "official": ImplicitAdjoint.official_imaml(1.0),
    "first_order": ImplicitAdjoint(reg=1.0, cg_steps=0),
    "custom": ImplicitAdjoint(reg=1.0, curvature=_twice),
}


@pytest.mark.parametrize("name", list(ADJOINTS))
def test_every_adjoint_under_vmap_equals_the_loop(name: str) -> None:
    model = _conv_bn()
    tasks = 3
    support = (
        torch.randn(tasks, 6, 1, 8, 8, dtype=torch.float64),
        torch.arange(6).repeat(3, 1) % 3,
    )
    query = (torch.randn(tasks, 9, 1, 8, 8, dtype=torch.float64), torch.arange(9).repeat(3, 1) % 3)
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        inner_steps=4,
        inner_lr=0.1,
        adjoint=ADJOINTS[name],
    )
    results = {}
    grads = {}
    for strategy in ("loop", "vmap"):
        meta.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # non-positive curvature (hessian)
            warnings.simplefilter("error", UserWarning)
            results[strategy] = meta.meta_backward_batch(
                CE, support, query, reduction="sum", strategy=strategy
            )
        assert "vmap" not in meta._warned, "vmap fell back to the loop"
        grads[strategy] = flatten({k: p.grad for k, p in model.named_parameters()})
    assert rel_err(grads["vmap"], grads["loop"]) <= 1e-10
    assert results["vmap"].cg_status.tolist() == results["loop"].cg_status.tolist()
    torch.testing.assert_close(
        results["vmap"].stationarity, results["loop"].stationarity, rtol=1e-8, atol=1e-12
    )


def test_gauss_newton_with_a_plain_loss_names_the_fix_and_changes_nothing() -> None:
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        adjoint=ImplicitAdjoint(curvature="gauss_newton"),
    )
    batch = (torch.randn(6, 3, dtype=torch.float64), torch.arange(6) % 3)
    plain = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    for call in (
        lambda: meta.meta_backward(plain, batch, batch),
        lambda: meta.meta_backward_batch(
            plain, (batch[0][None], batch[1][None]), (batch[0][None], batch[1][None])
        ),
    ):
        with pytest.raises(ValueError, match=r"output_loss\(F.cross_entropy\)"):
            call()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_nonpositive_curvature_warning_gives_the_share_and_the_remedy() -> None:
    model = _conv_bn()
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        inner_steps=2,
        adjoint=ImplicitAdjoint(reg=0.1, curvature="hessian", cg_steps=20),
        inner_lr=0.05,
    )
    support = (torch.randn(4, 6, 1, 8, 8, dtype=torch.float64), torch.arange(6).repeat(4, 1) % 3)
    with pytest.warns(RuntimeWarning) as caught:
        result = meta.meta_backward_batch(CE, support, support, strategy="loop")
    bad = sum(s == CGStatus.NONPOSITIVE_CURVATURE for s in result.status)
    assert bad > 0
    text = str(caught[0].message)
    assert f"in {bad} of 4 tasks" in text
    assert "Gauss-Newton" in text and "output_loss" in text


@pytest.mark.parametrize(
    ("momentum", "nesterov"), [(0.0, False), (0.5, False), (0.9, False), (0.5, True)]
)
def test_proximal_step_limit_is_where_sgd_starts_to_diverge(
    momentum: float, nesterov: bool
) -> None:
    """On reg/2 ||phi - theta||^2 alone, just below the limit SGD contracts, just above it grows."""
    reg = 4.0
    limit = proximal_step_limit(momentum, nesterov)
    sgd = get_inner_solver("sgd")
    objective = lambda p: 0.5 * reg * (p["w"] ** 2).sum()  # noqa: E731
    for factor, contracts in ((0.97, True), (1.03, False)):
        w = sgd(
            objective,
            {"w": torch.ones(1, dtype=torch.float64)},
            steps=400,
            lr=factor * limit / reg,
            momentum=momentum,
            nesterov=nesterov,
        )["w"]
        assert (float(w.abs()) < 1.0) == contracts, (factor, float(w))


def test_diverging_sgd_step_is_refused_up_front() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"inner_lr < 0\.2"):
        im.ImplicitMetaOptimizer(model, opt, reg=10.0, inner_lr=0.2)
    with pytest.raises(ValueError, match="Nesterov"):
        im.ImplicitMetaOptimizer(
            model, opt, reg=10.0, inner_lr=0.2, inner_options={"momentum": 0.5, "nesterov": True}
        )
    with pytest.raises(ValueError, match="diverges"):
        im.ImplicitMetaOptimizer(model, opt, reg=10.0, inner="torch.optim.SGD", inner_lr=0.25)
    im.ImplicitMetaOptimizer(model, opt, reg=10.0, inner_lr=0.2, inner_options={"momentum": 0.5})


def test_adjoint_round_trips_through_state_dict_and_old_settings_are_refused() -> None:
    model = _mlp()
    adjoint = ImplicitAdjoint(
        reg=3.0, curvature="gauss_newton", damping=0.5, cg_steps=7, cg_tol=1e-6
    )
    meta = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()), adjoint=adjoint)
    fresh = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()))
    fresh.load_state_dict(meta.state_dict())
    assert fresh.adjoint == adjoint
    old = {
        "outer_optimizer": meta.outer_optimizer.state_dict(),
        "settings": {
            "reg": 4.0,
            "inner": "sgd",
            "inner_steps": 3,
            "inner_lr": 0.1,
            "inner_options": {},
            "cg_steps": 2,
            "cg_tol": 1e-8,
            "hvp": "auto",
        },
    }
    # Settings saved before the adjoint existed (its fields at the top level) are refused,
    # with the missing key named, and change nothing.
    with pytest.raises(ValueError, match=r"settings lack \['adjoint'\]"):
        fresh.load_state_dict(old)
    assert fresh.adjoint == adjoint
    custom = im.ImplicitMetaOptimizer(
        model, torch.optim.Adam(model.parameters()), adjoint=ImplicitAdjoint(curvature=_twice)
    )
    with pytest.raises(ValueError, match="custom curvature"):
        fresh.load_state_dict(custom.state_dict())
    assert fresh.adjoint == adjoint
    other = im.ImplicitMetaOptimizer(
        model, torch.optim.Adam(model.parameters()), adjoint=ImplicitAdjoint(curvature=_twice)
    )
    other.load_state_dict(custom.state_dict())
    assert other.adjoint.curvature is _twice


def test_train_config_and_cli_carry_every_adjoint_field() -> None:
    from implicit_meta import cli

    args = cli.build_parser().parse_args(
        [
            "train",
            "--curvature",
            "hessian",
            "--damping",
            "0.5",
            "--curvature-scale",
            "0.25",
            "--cg-steps",
            "3",
            "--cg-tol",
            "1e-6",
            "--hvp",
            "forward_over_reverse",
            "--reg",
            "3",
        ]
    )
    config = cli._train_config(args, out=None)  # type: ignore[arg-type]
    expected = ImplicitAdjoint(
        reg=3.0,
        curvature="hessian",
        damping=0.5,
        curvature_scale=0.25,
        cg_steps=3,
        cg_tol=1e-6,
        hvp="forward_over_reverse",
    )
    assert config.adjoint() == expected
    model = nn.Linear(3, 5)
    assert build_meta_optimizer(model, config.replace(adapt="all")).adjoint == expected
    with pytest.raises(ValueError, match="curvature must be one of auto, hessian, gauss_newton"):
        TrainConfig(curvature="newton")
    with pytest.raises(ValueError, match="damping must be non-negative"):
        TrainConfig(damping=-1.0)
