"""Aux outputs of a loss, ``loss_fn(module, batch) -> (loss, aux)``: reported, never in the way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im

pytestmark = pytest.mark.filterwarnings("ignore:I \\+ H/reg is not positive definite")

TASKS = 3


def _model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(
        device=device, dtype=torch.float64
    )


def _meta(model: nn.Module) -> im.ImplicitMetaOptimizer:
    return im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), 0.1), reg=2.0, inner_steps=4, cg_steps=3
    )


def ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def ce_with_aux(module: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, object]:
    logits = module(batch[0])
    correct = (logits.argmax(-1) == batch[1]).to(logits.dtype)
    aux = {"accuracy": correct.mean(), "logits": logits, "pair": (logits.sum(), correct)}
    return F.cross_entropy(logits, batch[1]), aux


def _tasks(device: torch.device) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(TASKS, 6, 4, generator=g, dtype=torch.float64).to(device)
    xq = torch.randn(TASKS, 9, 4, generator=g, dtype=torch.float64).to(device)
    ys = torch.randint(0, 3, (TASKS, 6), generator=g).to(device)
    yq = torch.randint(0, 3, (TASKS, 9), generator=g).to(device)
    return (xs, ys), (xq, yq)


def _grads(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def test_aux_is_the_query_output_at_the_adapted_parameters(device: torch.device) -> None:
    model = _model(device)
    meta = _meta(model)
    (xs, ys), (xq, yq) = _tasks(device)
    support, query = (xs[0], ys[0]), (xq[0], yq[0])
    result = meta.meta_backward(ce_with_aux, support, query)
    with_aux = _grads(model)
    # Independent reference: the adapted model evaluated on the query batch.
    adapted = meta.adapt(ce, support)
    logits = adapted(xq[0])
    torch.testing.assert_close(result.outer_aux["logits"], logits.detach(), rtol=1e-12, atol=1e-12)
    expected = float((logits.argmax(-1) == yq[0]).double().mean())
    assert float(result.outer_aux["accuracy"]) == pytest.approx(expected)
    assert not result.outer_aux["logits"].requires_grad
    # The aux output changes nothing else: the same call with the bare loss gives the same grad.
    meta.zero_grad()
    bare = meta.meta_backward(ce, support, query)
    torch.testing.assert_close(with_aux, _grads(model), rtol=0, atol=0)
    assert bare.outer_aux == {}
    torch.testing.assert_close(result.outer_loss, bare.outer_loss, rtol=0, atol=0)


@pytest.mark.parametrize("strategy", ["vmap", "loop"])
def test_batched_aux_has_a_task_dimension_and_matches_per_task_calls(
    strategy: str, device: torch.device
) -> None:
    model = _model(device)
    meta = _meta(model)
    support, query = _tasks(device)
    result = meta.meta_backward_batch(
        ce, support, query, outer_loss_fn=ce_with_aux, strategy=strategy
    )
    assert result.outer_aux["logits"].shape == (TASKS, 9, 3)
    assert result.outer_aux["pair"][1].shape == (TASKS, 9)
    for t in range(TASKS):
        single = meta.meta_backward(
            ce,
            (support[0][t], support[1][t]),
            (query[0][t], query[1][t]),
            outer_loss_fn=ce_with_aux,
        )
        torch.testing.assert_close(
            result.outer_aux["logits"][t], single.outer_aux["logits"], rtol=1e-10, atol=1e-10
        )
        torch.testing.assert_close(result.outer_aux["accuracy"][t], single.outer_aux["accuracy"])


def test_a_loss_with_aux_serves_as_the_inner_loss_too(device: torch.device) -> None:
    model = _model(device)
    meta = _meta(model)
    support, query = _tasks(device)
    meta.meta_backward_batch(ce_with_aux, support, query, strategy="loop")
    with_aux = _grads(model)
    meta.zero_grad()
    meta.meta_backward_batch(ce, support, query, strategy="loop")
    torch.testing.assert_close(with_aux, _grads(model), rtol=0, atol=0)
    adapted_aux = meta.adapt(ce_with_aux, (support[0][0], support[1][0]))
    adapted_bare = meta.adapt(ce, (support[0][0], support[1][0]))
    assert adapted_aux.params.keys() == adapted_bare.params.keys()
    for name, value in adapted_aux.params.items():
        torch.testing.assert_close(value, adapted_bare.params[name], rtol=0, atol=0)


@pytest.mark.parametrize(
    "aux", [{"note": "text"}, (1.5,), [torch.tensor(1.0), None]], ids=["str", "float", "none"]
)
def test_an_aux_that_is_not_tensors_is_refused_and_nothing_changes(aux: object) -> None:
    model = _model(torch.device("cpu"))
    meta = _meta(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    (xs, ys), (xq, yq) = _tasks(torch.device("cpu"))

    def bad(module: nn.Module, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, object]:
        return ce(module, batch), aux

    with pytest.raises(TypeError, match="aux output of outer_loss_fn must hold only tensors"):
        meta.meta_backward(ce, (xs[0], ys[0]), (xq[0], yq[0]), outer_loss_fn=bad)
    with pytest.raises(TypeError, match="aux output of loss_fn must hold only tensors"):
        meta.meta_backward_batch(bad, (xs, ys), (xq, yq), strategy="vmap")
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_to_dict_lists_dict_aux_entries_and_keeps_builtin_names() -> None:
    scalars = (torch.tensor([0.5, 1.5]),) * 4
    result = im.MetaBackwardResult(
        *scalars,
        torch.tensor([2, 3]),
        torch.tensor([0, 0]),
        outer_aux={"accuracy": torch.tensor([0.25, 0.75]), "outer_loss": torch.tensor([9.0, 9.0])},
    )
    values = result.to_dict()
    assert values["accuracy"] == pytest.approx(0.5)
    assert values["outer_loss"] == pytest.approx(1.0)
    assert values["aux.outer_loss"] == pytest.approx(9.0)
