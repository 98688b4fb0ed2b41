"""Partial adaptation: adapt a head, meta-learn the shared body through the exact IFT."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im
from implicit_meta.functional import ImplicitAdjoint
from implicit_meta.functional.implicit import task_meta_gradient
from implicit_meta.models import Conv4

DTYPE = torch.float64
CE = im.output_loss(F.cross_entropy)


def plain_ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


class HeadNet(nn.Module):
    """A small MLP body and a linear-softmax head, with timm's split."""

    def __init__(self, features: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, features), nn.Tanh())
        self.head = nn.Linear(features, classes)
        self.body_calls = 0

    def forward_features(self, x: Tensor) -> Tensor:
        self.body_calls += 1
        out: Tensor = self.body(x)
        return out

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x if pre_logits else self.head(x)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class PlainNet(nn.Module):
    """The same network without timm's methods: only the general split applies."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh())
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.head(self.body(x))
        return out


def _task(seed: int, tasks: int | None = None) -> tuple[tuple[Tensor, Tensor], ...]:
    gen = torch.Generator().manual_seed(seed)
    lead = () if tasks is None else (tasks,)
    xs = torch.randn(*lead, 6, 3, generator=gen, dtype=DTYPE)
    xq = torch.randn(*lead, 9, 3, generator=gen, dtype=DTYPE)
    ys = (torch.arange(6) % 3).expand(*lead, 6).clone()
    yq = (torch.arange(9) % 3).expand(*lead, 9).clone()
    return (xs, ys), (xq, yq)


def _model(cls: type[nn.Module] = HeadNet, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().to(DTYPE)


def _grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- an independent reference


def _flat(params: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def _unflat(vector: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, start = {}, 0
    for k, v in like.items():
        out[k] = vector[start : start + v.numel()].reshape(v.shape)
        start += v.numel()
    return out


def _losses(
    model: nn.Module, support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor]
) -> tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, Tensor], Tensor], dict, dict]:
    """L_in(phi, w) and L_out(phi, w) on flat vectors, written with torch.func directly."""
    head = {k: v.detach() for k, v in model.named_parameters() if k.startswith("head.")}
    body = {k: v.detach() for k, v in model.named_parameters() if not k.startswith("head.")}

    def loss(batch: tuple[Tensor, Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
        def value(phi: Tensor, w: Tensor) -> Tensor:
            state = {**_unflat(phi, head), **_unflat(w, body)}
            logits = torch.func.functional_call(model, state, (batch[0],))
            return F.cross_entropy(logits, batch[1])

        return value

    return loss(support), loss(query), head, body


def _exact_inner_solution(
    inner: Callable[[Tensor, Tensor], Tensor], theta: Tensor, w: Tensor, reg: float
) -> Tensor:
    """Dense Newton on the strictly convex head problem, to machine precision."""
    phi = theta.clone()
    for _ in range(60):
        grad = torch.func.grad(inner)(phi, w) + reg * (phi - theta)
        hess = torch.func.hessian(inner)(phi, w) + reg * torch.eye(phi.numel(), dtype=DTYPE)
        phi = phi - torch.linalg.solve(hess, grad)
    final = torch.func.grad(inner)(phi, w) + reg * (phi - theta)
    assert float(final.norm()) < 1e-13
    return phi


def _dense_ift(model: nn.Module, support, query, reg: float) -> dict[str, Tensor]:
    """d L_out(phi*(theta, w), w) / d(theta, w) by dense matrices and torch.linalg.solve."""
    inner, outer, head, body = _losses(model, support, query)
    theta, w = _flat(head), _flat(body)
    phi = _exact_inner_solution(inner, theta, w, reg)
    hessian = torch.func.hessian(inner, argnums=0)(phi, w)
    mixed = torch.func.jacfwd(torch.func.grad(inner, argnums=0), argnums=1)(phi, w)  # [n_phi, n_w]
    g_phi, g_w = torch.func.grad(outer, argnums=(0, 1))(phi, w)
    system = hessian + reg * torch.eye(phi.numel(), dtype=DTYPE)
    v = torch.linalg.solve(system, g_phi)
    d_theta = reg * v
    d_w = g_w - mixed.T @ v
    return {**_unflat(d_theta, head), **_unflat(d_w, body)}


def _finite_differences(model: nn.Module, support, query, reg: float) -> dict[str, Tensor]:
    """Central differences of L_out(phi*(theta, w), w), phi* solved to 1e-13."""
    inner, outer, head, body = _losses(model, support, query)
    theta, w = _flat(head), _flat(body)
    point = torch.cat([theta, w])
    split = theta.numel()

    def total(z: Tensor) -> Tensor:
        phi = _exact_inner_solution(inner, z[:split], z[split:], reg)
        return outer(phi, z[split:])

    eps = 1e-5
    grads = torch.zeros_like(point)
    for i in range(point.numel()):
        step = torch.zeros_like(point)
        step[i] = eps
        grads[i] = (total(point + step) - total(point - step)) / (2 * eps)
    return {**_unflat(grads[:split], head), **_unflat(grads[split:], body)}


def _meta_grads(model: nn.Module, loss_fn, support, query, **settings) -> dict[str, Tensor]:
    meta = im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), 0.1), **settings)
    meta.zero_grad()
    meta.meta_backward(loss_fn, support, query)
    grads = _grads(model)
    meta.zero_grad()
    return grads


EXACT = {"adapt": "head", "reg": 0.7, "inner_steps": 30, "cg_steps": 60, "cg_tol": 1e-15}


@pytest.mark.parametrize(
    ("cls", "loss_fn", "curvature"),
    [
        (HeadNet, CE, "auto"),  # head split, Gauss-Newton (= Hessian for a linear head)
        (HeadNet, plain_ce, "hessian"),  # general split: a plain loss_fn
        (PlainNet, CE, "gauss_newton"),  # general split: no timm methods
    ],
)
def test_meta_gradient_equals_the_dense_implicit_function_theorem(cls, loss_fn, curvature):
    model = _model(cls)
    support, query = _task(1)
    reference = _dense_ift(model, support, query, reg=0.7)
    adjoint = ImplicitAdjoint(curvature=curvature, cg_steps=60, cg_tol=1e-15)
    settings = {k: v for k, v in EXACT.items() if k not in ("cg_steps", "cg_tol")}
    got = _meta_grads(model, loss_fn, support, query, adjoint=adjoint, **settings)
    assert set(got) == set(reference)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=1e-8)
    # The body's gradient is not the direct one alone: the mixed term matters here.
    first_order = _meta_grads(model, loss_fn, support, query, adapt="head", reg=0.7, cg_steps=0)
    assert (first_order["body.0.weight"] - reference["body.0.weight"]).abs().max() > 1e-4


def test_meta_gradient_equals_finite_differences():
    model = _model()
    support, query = _task(2)
    reference = _finite_differences(model, support, query, reg=0.7)
    got = _meta_grads(model, CE, support, query, **EXACT)
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], rtol=0, atol=1e-6)


def test_first_order_partial_gives_the_direct_gradient_only():
    model = _model()
    support, query = _task(3)
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), 0.1), adapt="head", reg=0.7, inner_steps=30
    )
    adapted = meta.adapt(CE, support)
    settings = {"adapt": "head", "reg": 0.7, "inner_steps": 30, "cg_steps": 0}
    got = _meta_grads(model, CE, support, query, **settings)
    state = {**dict(model.named_parameters()), **adapted.params}
    leaves = {k: v.detach().requires_grad_(True) for k, v in state.items()}
    loss = F.cross_entropy(torch.func.functional_call(model, leaves, (query[0],)), query[1])
    expected = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-12)


def test_adapt_all_is_todays_meta_gradient_bit_for_bit():
    model = _model()
    support, query = _task(4)
    settings = {"reg": 0.7, "inner_steps": 5, "cg_steps": 5}
    default = _meta_grads(model, CE, support, query, **settings)
    explicit = _meta_grads(model, CE, support, query, adapt="all", **settings)
    # The functional core, called directly with today's arguments, is the reference.
    theta = {k: v.detach() for k, v in model.named_parameters()}
    from implicit_meta.module_losses import functional_inner_loss, functional_loss_and_aux

    inner = functional_inner_loss(model, CE, support, {}, {})
    outer = functional_loss_and_aux(model, CE, query, {}, {})
    direct = task_meta_gradient(
        inner,
        outer,
        theta,
        im.get_inner_solver("sgd"),
        ImplicitAdjoint(reg=0.7, cg_steps=5),
        steps=5,
        lr=0.1,
        has_aux=True,
    ).meta_grad
    for name in direct:
        assert torch.equal(default[name], direct[name])
        assert torch.equal(explicit[name], direct[name])
    # Every parameter named explicitly takes the partial code path with nothing shared.
    names = [n for n, _ in model.named_parameters()]
    listed = _meta_grads(model, CE, support, query, adapt=names, inner="sgd", **settings)
    for name in direct:
        torch.testing.assert_close(listed[name], direct[name], rtol=0, atol=1e-12)


def test_the_body_runs_once_on_the_support_and_once_on_the_query():
    model = _model()
    support, query = _task(5)
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), 0.1), adapt="head", reg=0.7, cg_steps=5
    )
    meta.meta_backward(CE, support, query)  # the first call also checks the split once
    assert meta.problem.steps == 8  # Newton: several head evaluations per step
    model.body_calls = 0
    meta.meta_backward(CE, support, query)
    assert model.body_calls == 2
    model.body_calls = 0
    supports, queries = _task(6, tasks=3)
    meta.meta_backward_batch(CE, supports, queries, strategy="loop")
    assert model.body_calls == 2 * 3
    model.body_calls = 0
    meta.adapt(CE, support)
    assert model.body_calls == 1


@pytest.mark.parametrize("cls", [HeadNet, PlainNet])
@pytest.mark.parametrize("cg_steps", [0, 8])
def test_vmap_equals_loop_for_partial_adaptation(cls, cg_steps):
    supports, queries = _task(7, tasks=3)
    results = {}
    for strategy in ("vmap", "loop"):
        model = _model(cls)
        meta = im.ImplicitMetaOptimizer(
            model,
            torch.optim.SGD(model.parameters(), 0.1),
            adapt="head",
            reg=0.7,
            cg_steps=cg_steps,
        )
        with torch.no_grad():
            pass
        out = meta.meta_backward_batch(CE, supports, queries, strategy=strategy)
        results[strategy] = (_grads(model), out)
    (vmap_grads, vmap_out), (loop_grads, loop_out) = results["vmap"], results["loop"]
    assert set(vmap_grads) == {n for n, _ in _model(cls).named_parameters()}
    for name in loop_grads:
        torch.testing.assert_close(vmap_grads[name], loop_grads[name], rtol=0, atol=1e-10)
    torch.testing.assert_close(vmap_out.outer_loss, loop_out.outer_loss, rtol=0, atol=1e-10)


def test_frozen_parameters_stay_constants():
    model = _model()
    model.body[0].bias.requires_grad_(False)
    before = model.body[0].bias.detach().clone()
    support, query = _task(8)
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), 0.1), adapt="head", reg=0.7, cg_steps=5
    )
    meta.meta_backward(CE, support, query)
    meta.step()
    assert model.body[0].bias.grad is None
    assert torch.equal(model.body[0].bias, before)
    assert model.body[0].weight.grad is not None and model.head.weight.grad is not None


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return params, grads, copy.deepcopy(optimizer.state_dict())


@pytest.mark.parametrize(
    ("adapt", "message"),
    [
        ("classifier", "no parameter is named 'classifier'"),
        (("body.0", "fc"), "no parameter is named 'fc'"),
        (lambda name, p: False, "selects no trainable parameter"),
        ("head", "selects every trainable parameter"),
    ],
)
def test_an_adapt_that_selects_nothing_or_everything_as_head_is_refused(adapt, message):
    model = _model()
    if message.startswith("selects every"):
        for p in model.body.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    meta = im.ImplicitMetaOptimizer(model, optimizer)
    support, query = _task(9)
    meta.meta_backward(CE, support, query)
    meta.step()
    before = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match=message):
        im.ImplicitMetaOptimizer(model, optimizer, adapt=adapt)
    state = meta.state_dict()
    state["settings"]["adapt"] = list(adapt) if isinstance(adapt, tuple) else adapt
    if isinstance(adapt, str | tuple):
        with pytest.raises(ValueError, match=message):
            meta.load_state_dict(state)
    after = _snapshot(model, optimizer)
    for old, new in zip(before[:2], after[:2], strict=True):
        assert all((old[k] is None and new[k] is None) or torch.equal(old[k], new[k]) for k in old)
    assert str(before[2]) == str(after[2])
    assert meta.adapted == tuple(n for n, p in model.named_parameters() if p.requires_grad)


def test_adapt_accepts_names_prefixes_a_submodule_and_a_predicate():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    expected = ("head.weight", "head.bias")
    for adapt in ("head", ["head"], ("head.weight", "head.bias"), model.head):
        assert im.ImplicitMetaOptimizer(model, optimizer, adapt=adapt).adapted == expected
    predicate = im.ImplicitMetaOptimizer(model, optimizer, adapt=lambda n, p: n.endswith("bias"))
    assert predicate.adapted == ("body.0.bias", "body.2.bias", "head.bias")


def test_settings_round_trip_through_the_state_dict():
    model = _model()
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.Adam(model.parameters()), adapt=model.head, reg=0.5, cg_steps=3
    )
    state = meta.state_dict()
    assert state["settings"]["adapt"] == ["head.weight", "head.bias"]
    fresh = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()))
    fresh.load_state_dict(state)
    assert fresh.adapted == meta.adapted and fresh.problem.reg == 0.5
    assert fresh.problem.solver == "newton" and fresh.adjoint == meta.adjoint
    problem = im.InnerProblem(adapt="head", reg=0.5, steps=4)
    assert im.InnerProblem.from_dict(problem.to_dict()) == problem


def test_reg_belongs_to_the_problem():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    problem = im.InnerProblem(adapt="head", reg=0.5)
    meta = im.ImplicitMetaOptimizer(model, optimizer, problem=problem, adjoint=ImplicitAdjoint())
    assert meta.problem.reg == 0.5 and meta.adjoint.reg == 0.5
    legacy = im.ImplicitMetaOptimizer(model, optimizer, adjoint=ImplicitAdjoint(reg=3.0))
    assert legacy.problem.reg == 3.0
    with pytest.raises(ValueError, match="disagree"):
        im.ImplicitMetaOptimizer(model, optimizer, reg=1.0, adjoint=ImplicitAdjoint(reg=3.0))
    with pytest.raises(ValueError, match="given beside problem="):
        im.ImplicitMetaOptimizer(model, optimizer, problem=problem, inner_steps=3)


def test_conv4_follows_timms_split():
    model = Conv4(5, width=8).eval()
    x = torch.randn(4, 1, 28, 28)
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    assert torch.equal(model.get_classifier()(features), model(x))
    assert im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), 0.1), adapt="head"
    ).adapted == ("head.weight", "head.bias")


def test_partial_adaptation_defaults_to_the_exact_gradient():
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), 0.1)
    head = im.ImplicitMetaOptimizer(model, optimizer, adapt="head")
    assert head.adjoint.cg_steps == 20 and head.adjoint.curvature == "auto"
    assert im.ImplicitMetaOptimizer(model, optimizer, adapt="head", cg_steps=0).adjoint.first_order
    assert im.ImplicitMetaOptimizer(model, optimizer).adjoint.first_order
    named = im.ImplicitMetaOptimizer(
        model, optimizer, adapt="head", adjoint=ImplicitAdjoint(curvature="hessian")
    )
    assert named.adjoint.cg_steps == 5  # a system named without cg_steps: as everywhere
