"""BatchNorm, frozen layers, buffers, dtype/device and the meta-training loop end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im
from implicit_meta.module_losses import functional_loss, split_state
from tests.conftest import dense_hessian, flatten, rel_err

REG = 2.0


def ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y)


def _batches(device: torch.device, dtype: torch.dtype = torch.float64):
    support = (torch.randn(12, 4, dtype=dtype, device=device), torch.arange(12, device=device) % 3)
    query = (torch.randn(9, 4, dtype=dtype, device=device), torch.arange(9, device=device) % 3)
    return support, query


def _dense_reference(model: nn.Module, meta: im.ImplicitMetaOptimizer, support, query) -> Tensor:
    phi = dict(meta.adapt(ce, support).params)  # the trainable parameters only
    _, frozen, buffers = split_state(model)
    inner = functional_loss(model, ce, support, frozen, buffers)
    outer = functional_loss(model, ce, query, frozen, buffers)
    hessian = dense_hessian(inner, phi)
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    return torch.linalg.solve(eye + hessian / REG, flatten(torch.func.grad(outer)(phi)))


def _meta(model: nn.Module, **kw: object) -> im.ImplicitMetaOptimizer:
    settings: dict[str, object] = {
        "reg": REG,
        "inner": "newton_cg",
        "inner_steps": 10,
        "inner_lr": 1.0,
        "cg_steps": 80,
        "cg_tol": 1e-14,
    }
    settings.update(kw)
    params = [p for p in model.parameters() if p.requires_grad]
    return im.ImplicitMetaOptimizer(model, torch.optim.SGD(params, lr=0.1), **settings)  # type: ignore[arg-type]


def test_batchnorm_model_gradient_and_buffers_untouched(device: torch.device) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    model = model.to(device=device, dtype=torch.float64).train()
    with torch.no_grad():  # non-trivial running statistics, to see that they stay put
        model[1].running_mean.uniform_()
    buffers_before = {k: v.clone() for k, v in model.named_buffers()}
    support, query = _batches(device)
    meta = _meta(model, inner_steps=30, cg_steps=60)
    result = meta.meta_backward(ce, support, query)
    assert float(result.stationarity) < 1e-9
    got = flatten({k: p.grad for k, p in model.named_parameters()})
    assert rel_err(got, _dense_reference(model, meta, support, query)) <= 1e-6
    for k, v in model.named_buffers():
        assert torch.equal(v, buffers_before[k]), f"buffer {k} changed"


def test_batchnorm_in_eval_mode_uses_running_statistics() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)).double().eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    support, query = _batches(torch.device("cpu"))
    meta = _meta(model, inner_steps=0)
    result = meta.meta_backward(ce, support, query)
    # With zero inner steps phi = theta, so the outer loss is the eval-mode model's loss.
    torch.testing.assert_close(result.outer_loss, ce(model, query).detach())
    model.train()
    assert not torch.allclose(result.outer_loss, ce(model, query).detach())


def test_frozen_layer_gets_no_grad_and_is_not_adapted(device: torch.device) -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(device, torch.float64)
    model[0].requires_grad_(False)
    frozen_before = model[0].weight.detach().clone()
    support, query = _batches(device)
    meta = _meta(model, cg_steps=25)
    meta.meta_backward(ce, support, query)
    meta.step()
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert torch.equal(model[0].weight, frozen_before)
    adapted = meta.adapt(ce, support).to_module()
    assert "0.weight" not in meta.adapt(ce, support).params  # frozen: not adapted
    assert torch.equal(adapted[0].weight, frozen_before)
    assert not torch.allclose(adapted[2].weight, model[2].weight)
    model[2].weight.grad = None
    model[2].bias.grad = None
    meta.meta_backward(ce, support, query)
    got = flatten({k: p.grad for k, p in model.named_parameters() if p.requires_grad})
    assert rel_err(got, _dense_reference(model, meta, support, query)) <= 1e-6


def test_float32_matches_float64_reference(device: torch.device) -> None:
    model64 = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(device, torch.float64)
    model32 = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(device, torch.float32)
    model32.load_state_dict({k: v.float() for k, v in model64.state_dict().items()})
    support, query = _batches(device)
    s32 = (support[0].float(), support[1])
    q32 = (query[0].float(), query[1])
    kw = {"inner": "sgd", "inner_steps": 50, "inner_lr": 0.3, "cg_steps": 10}
    _meta(model64, **kw).meta_backward(ce, support, query)
    _meta(model32, **kw).meta_backward(ce, s32, q32)
    for p32, p64 in zip(model32.parameters(), model64.parameters(), strict=True):
        assert p32.grad.dtype == torch.float32 and p32.grad.device.type == device.type
        assert rel_err(p32.grad.double(), p64.grad) < 1e-4


def test_loss_fn_may_call_any_module_method() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 5)
            self.head = nn.Linear(5, 3)

        def features(self, x: Tensor) -> Tensor:
            return torch.tanh(self.body(x))

        def forward(self, x: Tensor) -> Tensor:
            return self.head(self.features(x))

    model = Net().double()
    support, query = _batches(torch.device("cpu"))
    via_forward = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    via_method = lambda m, b: F.cross_entropy(m.head(m.features(b[0])), b[1])  # noqa: E731
    grads = []
    for loss_fn in (via_forward, via_method):
        model.zero_grad(set_to_none=True)
        _meta(model).meta_backward(loss_fn, support, query)
        grads.append(flatten({k: p.grad for k, p in model.named_parameters()}))
    torch.testing.assert_close(grads[0], grads[1])


def test_outer_loss_fn_is_used_on_the_query() -> None:
    model = nn.Linear(4, 3).double()
    support, query = _batches(torch.device("cpu"))
    meta = _meta(model)

    def smooth_ce(m: nn.Module, b: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(m(b[0]), b[1], label_smoothing=0.2)

    result = meta.meta_backward(ce, support, query, outer_loss_fn=smooth_ce)
    adapted = meta.adapt(ce, support)
    torch.testing.assert_close(result.outer_loss, smooth_ce(adapted, query).detach())


@pytest.mark.parametrize("inner", ["sgd", "adam", "newton_cg"])
def test_meta_training_reduces_query_loss_on_a_task_family(inner: str) -> None:
    # Tasks: linear regressions whose weights share a common mean; meta-learning theta should
    # move it toward that mean and lower the post-adaptation query loss.
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(5, dtype=torch.float64, generator=g) * 3

    def task() -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
        w = mean + 0.1 * torch.randn(5, dtype=torch.float64, generator=g)
        xs, xq = (torch.randn(n, 5, dtype=torch.float64, generator=g) for n in (4, 20))
        return (xs, xs @ w), (xq, xq @ w)

    model = nn.Linear(5, 1, bias=False).double()
    mse = lambda m, b: F.mse_loss(m(b[0]).squeeze(-1), b[1])  # noqa: E731
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.Adam(model.parameters(), lr=0.1),
        reg=1.0,
        inner=inner,
        inner_steps=3 if inner == "newton_cg" else 20,
        inner_lr=1.0 if inner == "newton_cg" else 0.05,
        inner_options={"cg_steps": 5, "line_search_steps": 4} if inner == "newton_cg" else None,
    )
    losses = []
    for _ in range(40):
        meta.zero_grad()
        results = [meta.meta_backward(mse, *task()) for _ in range(4)]
        losses.append(sum(float(r.outer_loss) for r in results) / 4)
        meta.step()
    assert losses[-1] < 0.1 * losses[0]
    assert rel_err(model.weight.detach().reshape(-1), mean) < 0.2


@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse"])
def test_batchnorm_hvp_matches_central_differences(mode: str) -> None:
    from implicit_meta.functional import make_hvp

    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    support, _ = _batches(torch.device("cpu"))
    theta, frozen, buffers = split_state(model)
    inner = functional_loss(model, ce, support, frozen, buffers)
    v = {k: torch.randn_like(t) for k, t in theta.items()}
    grad_fn = torch.func.grad(inner)
    eps = 1e-5
    plus = grad_fn({k: theta[k] + eps * v[k] for k in theta})
    minus = grad_fn({k: theta[k] - eps * v[k] for k in theta})
    fd = flatten({k: (plus[k] - minus[k]) / (2 * eps) for k in theta})
    assert rel_err(flatten(make_hvp(inner, theta, mode=mode)[1](v)), fd) < 1e-7
