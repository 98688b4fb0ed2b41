"""Test-time adaptation: ``im.adapt`` and ``ImplicitMetaOptimizer.adapt`` without copies."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import implicit_meta as im
from implicit_meta.data import EpisodeSampler, FewShotDataset
from implicit_meta.fewshot import TrainConfig, build_meta_optimizer, build_model
from implicit_meta.fewshot.evaluation import episode_accuracies


def _mse(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(module(batch[0]), batch[1])


def _ridge_problem() -> tuple[nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    return model, (x, x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64))


def test_adapt_reaches_the_ridge_closed_form_and_reports_stationarity() -> None:
    model, (x, y) = _ridge_problem()
    theta = model.weight.detach().clone()
    reg = 0.5
    adapted = im.adapt(model, _mse, (x, y), reg=reg, inner="lbfgs", inner_steps=100, inner_lr=1.0)
    # argmin ||x w - y||^2 / n + reg/2 ||w - theta||^2, in closed form.
    n = x.shape[0]
    a = 2.0 * x.T @ x / n + reg * torch.eye(3, dtype=torch.float64)
    w = torch.linalg.solve(a, 2.0 * x.T @ y / n + reg * theta.T)
    torch.testing.assert_close(adapted.params["weight"], w.T, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(adapted(x), x @ w, rtol=1e-8, atol=1e-10)
    assert float(adapted.stationarity) < 1e-8 and float(adapted.relative_stationarity) < 1e-8
    assert torch.equal(model.weight.detach(), theta)  # the model is unchanged


def test_stationarity_is_the_proximal_gradient_norm_at_the_adapted_point() -> None:
    model, batch = _ridge_problem()
    theta = model.weight.detach().clone()
    adapted = im.adapt(model, _mse, batch, reg=2.0, inner_steps=3, inner_lr=0.05)
    phi = adapted.params["weight"].clone().requires_grad_(True)
    loss = F.mse_loss(batch[0] @ phi.T, batch[1])
    (grad,) = torch.autograd.grad(loss, phi)
    expected = (grad + 2.0 * (phi.detach() - theta)).norm()
    w0 = theta.clone().requires_grad_(True)
    (start,) = torch.autograd.grad(F.mse_loss(batch[0] @ w0.T, batch[1]), w0)
    torch.testing.assert_close(adapted.stationarity, expected, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(
        adapted.relative_stationarity, expected / start.norm(), rtol=1e-12, atol=0.0
    )
    assert 0.0 < float(adapted.relative_stationarity) < 1.0  # 3 steps: solved only in part
    torch.testing.assert_close(adapted.inner_loss, loss.detach(), rtol=1e-12, atol=0.0)


def test_the_optimizer_adapts_as_the_function_does_and_copies_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
    batch = (torch.randn(8, 4), torch.randn(8, 2))
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.Adam(model.parameters()), reg=1.0, inner_steps=4, inner_lr=0.1
    )
    alone = im.adapt(model, _mse, batch, reg=1.0, inner_steps=4, inner_lr=0.1)
    before = copy.deepcopy(model.state_dict())

    def no_copies(*args: object, **kwargs: object) -> object:
        raise AssertionError("adapt deep-copied something")

    monkeypatch.setattr(copy, "deepcopy", no_copies)
    adapted = meta.adapt(_mse, batch)
    outputs = adapted(batch[0])
    monkeypatch.undo()
    for name, value in alone.params.items():
        assert torch.equal(adapted.params[name], value)
    # BatchNorm's running statistics are not written by the adapted calls.
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    # The independent copy computes the same outputs.
    module = adapted.to_module()
    assert module is not model
    torch.testing.assert_close(module(batch[0]), outputs, rtol=0.0, atol=0.0)


def test_evaluation_accuracies_are_those_of_an_adapted_copy() -> None:
    images = torch.randint(0, 256, (6, 4, 1, 28, 28), dtype=torch.uint8)
    dataset = FewShotDataset(images, tuple(f"c{i}" for i in range(6)))
    config = TrainConfig(backbone="conv4-8", ways=3, shots=1, queries=2, inner_steps=2)
    torch.manual_seed(0)
    model = build_model(config, (1, 28, 28))
    meta = build_meta_optimizer(model, config)
    values = episode_accuracies(meta, EpisodeSampler(dataset, 3, 1, 2, seed=3), 5)
    sampler = EpisodeSampler(dataset, 3, 1, 2, seed=3)
    expected = []
    for _ in range(5):
        batch = sampler.sample(1)
        copied = meta.adapt(im.output_loss(F.cross_entropy), batch.support(0)).to_module()
        xq, yq = batch.query(0)
        with torch.no_grad():
            expected.append(float((copied(xq).argmax(-1) == yq).float().mean()))
    assert values == expected


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"reg": 0.0}, ValueError, "reg"),
        ({"inner": "no_such_solver"}, ValueError, "no_such_solver"),
        ({"inner_lr": 1.0, "reg": 2.0}, ValueError, "diverge"),
        ({"inner_steps": -1}, ValueError, "inner_steps"),
        ({"inner_options": {"momentun": 0.9}}, ValueError, "momentun"),
    ],
)
def test_bad_settings_are_refused_before_any_work(
    changes: dict[str, object], error: type[Exception], match: str
) -> None:
    model, batch = _ridge_problem()
    settings: dict[str, object] = {"reg": 1.0} | changes
    with pytest.raises(error, match=match):
        im.adapt(model, _mse, batch, **settings)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        im.adapt("model", _mse, batch, reg=1.0)  # type: ignore[arg-type]


def test_stationarity_costs_nothing_until_it_is_read() -> None:
    model, batch = _ridge_problem()
    calls = 0

    def counted(module: nn.Module, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return _mse(module, b)

    adapted = im.adapt(model, counted, batch, reg=1.0, inner_steps=2, inner_lr=0.1)
    after_adapt = calls
    adapted(batch[0])
    assert calls == after_adapt  # calling the model does not evaluate the loss
    first = adapted.relative_stationarity
    assert calls > after_adapt
    evaluated = calls
    assert adapted.relative_stationarity is first and calls == evaluated  # computed once
