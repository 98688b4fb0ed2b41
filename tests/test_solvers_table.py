"""One table of strongly convex problems that every registered inner solver must solve."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

import implicit_meta as im
from implicit_meta.functional import proximal_objective

Problem = tuple[Callable[[dict[str, Tensor]], Tensor], dict[str, Tensor], float]


def _quadratic() -> Problem:
    g = torch.Generator().manual_seed(1)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T / 6 + 0.1 * torch.eye(6, dtype=torch.float64)
    c = torch.randn(6, generator=g, dtype=torch.float64)
    loss = lambda p: 0.5 * p["w"] @ a @ p["w"] - c @ p["w"]  # noqa: E731
    return (
        loss,
        {"w": torch.randn(6, generator=g, dtype=torch.float64)},
        float(torch.linalg.eigvalsh(a).max()),
    )


def _logistic() -> Problem:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = (torch.rand(40, generator=g, dtype=torch.float64) > 0.5).to(torch.float64)

    def loss(p: dict[str, Tensor]) -> Tensor:
        logits = x @ p["w"] + p["b"]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y)

    theta = {
        "w": torch.randn(5, generator=g, dtype=torch.float64),
        "b": torch.zeros(1, dtype=torch.float64),
    }
    smoothness = float(torch.linalg.eigvalsh(x.T @ x / 40).max()) / 4 + 0.25
    return loss, theta, smoothness


PROBLEMS = {"quadratic": _quadratic, "logistic": _logistic}
REG = 1.0

# How each built-in solver is run; a solver registered later runs with the generic setting.
SETTINGS: dict[str, Callable[[float], dict[str, object]]] = {
    "sgd": lambda smooth: {"steps": 2000, "lr": 1.0 / (smooth + REG)},
    "adam": lambda smooth: {"steps": 4000, "lr": 0.02},
    "lbfgs": lambda smooth: {"steps": 100, "lr": 1.0},
    "newton_cg": lambda smooth: {"steps": 10, "lr": 1.0},
}


def generic(smooth: float) -> dict[str, object]:
    return {"steps": 2000, "lr": 1.0 / (smooth + REG)}


@pytest.fixture(autouse=True)
def _registry_unchanged() -> Iterator[None]:
    before = set(im.list_inner_solvers())
    yield
    for name in set(im.list_inner_solvers()) - before:
        im.unregister_inner_solver(name)


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("name", im.list_inner_solvers())
def test_every_registered_solver_reaches_stationarity(name: str, problem: str) -> None:
    loss, theta, smooth = PROBLEMS[problem]()
    objective = proximal_objective(loss, theta, REG)
    settings = SETTINGS.get(name, generic)(smooth)
    solver = im.get_inner_solver(name)
    phi = solver(objective, {k: v.clone() for k, v in theta.items()}, **settings)
    gradient = torch.func.grad(objective)(phi)
    stationarity = torch.sqrt(sum((g**2).sum() for g in gradient.values()))
    assert float(stationarity) <= 1e-6, f"{name} on {problem}: {float(stationarity):.3e}"
    # The start must not have been stationary already (the test could not fail otherwise).
    start_grad = torch.func.grad(objective)(theta)
    assert float(torch.sqrt(sum((g**2).sum() for g in start_grad.values()))) > 1e-2


def test_builtin_solvers_are_registered() -> None:
    assert {"sgd", "adam", "lbfgs", "newton_cg"} <= set(im.list_inner_solvers())


def test_sgd_momentum_option_is_passed_through() -> None:
    loss, theta, _ = _quadratic()
    objective = proximal_objective(loss, theta, REG)
    plain = im.get_inner_solver("sgd")(objective, dict(theta), steps=5, lr=0.1)
    heavy = im.get_inner_solver("sgd")(objective, dict(theta), steps=5, lr=0.1, momentum=0.9)
    # Reference heavy-ball recursion (PyTorch convention: v = mu v + g, w -= lr v).
    w, v = theta["w"].clone(), torch.zeros_like(theta["w"])
    for _ in range(5):
        g = torch.func.grad(objective)({"w": w})["w"]
        v = 0.9 * v + g
        w = w - 0.1 * v
    torch.testing.assert_close(heavy["w"], w)
    assert not torch.allclose(plain["w"], heavy["w"])


def test_adam_matches_torch_optim_adam() -> None:
    loss, theta, _ = _logistic()
    objective = proximal_objective(loss, theta, REG)
    ours = im.get_inner_solver("adam")(objective, dict(theta), steps=25, lr=0.05)
    reference = im.torch_optimizer_solver(torch.optim.Adam)(
        objective, dict(theta), steps=25, lr=0.05
    )
    # torchopt computes the bias corrections as pow(beta, int64 count), which is float32, so
    # they differ from torch.optim.Adam's at the 1e-6 level; a wrong rule differs at O(lr).
    for k in ours:
        torch.testing.assert_close(ours[k], reference[k], rtol=1e-5, atol=1e-7)
        assert not torch.allclose(ours[k], theta[k], atol=1e-2)


def test_custom_solver_decorator_returns_function_unchanged_and_is_usable() -> None:
    def my_gd(objective, params, *, steps, lr, scale=1.0):  # type: ignore[no-untyped-def]
        for _ in range(steps):
            g = torch.func.grad(objective)(params)
            params = {k: v - scale * lr * g[k] for k, v in params.items()}
        return params

    registered = im.register_inner_solver("my_gd")(my_gd)
    assert registered is my_gd
    assert "my_gd" in im.list_inner_solvers()
    model = torch.nn.Linear(3, 1).double()
    batch = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
    mse = lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    grads = []
    for inner in ("my_gd", my_gd):
        meta = im.ImplicitMetaOptimizer(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            inner=inner,
            inner_steps=3,
            inner_lr=0.1,
            inner_options={"scale": 0.5},
        )
        meta.zero_grad()
        meta.meta_backward(mse, batch, batch)
        grads.append(model.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="already registered"):
        im.register_inner_solver("my_gd")(lambda objective, params, *, steps, lr: params)
    im.unregister_inner_solver("my_gd")
    assert "my_gd" not in im.list_inner_solvers()


def test_unknown_solver_name_lists_registered_ones() -> None:
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"unknown inner solver 'bfgs'.*adam.*lbfgs"):
        im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), inner="bfgs")
