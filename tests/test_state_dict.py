"""state_dict / load_state_dict round-trip the outer optimizer and the settings."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im


def ce(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(module(batch[0]), batch[1])


def _trained(inner: object = "adam") -> tuple[nn.Module, im.ImplicitMetaOptimizer]:
    model = nn.Linear(4, 3)
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-2),
        reg=0.5,
        inner=inner,
        inner_steps=4,
        inner_lr=0.05,
        inner_options={"betas": (0.8, 0.99)},
        cg_steps=3,
        cg_tol=1e-8,
        hvp="forward_over_reverse",
    )
    batch = (torch.randn(6, 4), torch.arange(6) % 3)
    for _ in range(3):
        meta.zero_grad()
        meta.meta_backward(ce, batch, batch)
        meta.step()
    return model, meta


def test_round_trip_through_torch_save_weights_only() -> None:
    model, meta = _trained()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "meta": meta.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    fresh_model = nn.Linear(4, 3)
    fresh_model.load_state_dict(loaded["model"])
    fresh = im.ImplicitMetaOptimizer(fresh_model, torch.optim.Adam(fresh_model.parameters()))
    fresh.load_state_dict(loaded["meta"])
    assert fresh.settings() == meta.settings()
    assert fresh.settings()["inner"] == "adam"
    assert fresh.outer_optimizer.param_groups[0]["lr"] == 1e-2

    # Continuing from the loaded state gives exactly the same next step.
    batch = (torch.randn(6, 4), torch.arange(6) % 3)
    for opt in (meta, fresh):
        opt.zero_grad()
        opt.meta_backward(ce, batch, batch)
        opt.step()
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_torch_optim_class_solver_round_trips_by_name() -> None:
    _, meta = _trained(inner=torch.optim.Adam)
    assert meta.settings()["inner"] == "torch.optim.Adam"
    model = nn.Linear(4, 3)
    other = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()))
    state = meta.state_dict()
    state["settings"]["inner_options"] = {}
    other.load_state_dict(state)
    assert other.settings()["inner"] == "torch.optim.Adam"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["settings"]["adjoint"].update(reg=-1.0), "reg must be positive"),
        (lambda s: s["settings"]["adjoint"].update(curvature="newton"), "unknown curvature"),
        (lambda s: s["settings"].update(inner="sgd", inner_lr=25.0), "diverges"),
        (lambda s: s["settings"].update(inner="nope"), "unknown inner solver"),
        (lambda s: s["settings"].pop("inner_steps"), "lack"),
        (lambda s: s.pop("settings"), "must hold"),
        (
            lambda s: s["outer_optimizer"]["param_groups"].append({"params": [99]}),
            "different number of parameter groups",
        ),
    ],
)
def test_bad_state_dict_changes_nothing(change, message: str) -> None:
    _, meta = _trained()
    model = nn.Linear(4, 3)
    target = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters(), lr=3e-3))
    batch = (torch.randn(6, 4), torch.arange(6) % 3)
    target.meta_backward(ce, batch, batch)
    target.step()
    settings_before = target.settings()
    optimizer_before = copy.deepcopy(target.outer_optimizer.state_dict())
    state = copy.deepcopy(meta.state_dict())
    change(state)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert target.settings() == settings_before
    after = target.outer_optimizer.state_dict()
    assert after["param_groups"] == optimizer_before["param_groups"]
    for key, value in optimizer_before["state"].items():
        for name, tensor in value.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(after["state"][key][name]))
