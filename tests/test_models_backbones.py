from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import implicit_meta as im
from implicit_meta.fewshot import TrainConfig, build_model
from implicit_meta.models import (
    Conv4,
    conv4_feature_size,
    create_backbone,
    list_backbones,
    register_backbone,
    unregister_backbone,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models on a shared 2-core machine: a second OpenMP thread only adds barrier waits.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _loss(module: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(module(x), y)


@pytest.mark.parametrize(("image_size", "side"), [(28, 1), (84, 5), (16, 1), (32, 2)])
def test_conv4_feature_size(image_size: int, side: int) -> None:
    assert conv4_feature_size(image_size) == side


def test_conv4_too_small_image_raises() -> None:
    with pytest.raises(ValueError, match="too small"):
        Conv4(5, image_size=15)
    with pytest.raises(ValueError, match="width"):
        Conv4(5, width=0)


def test_conv4_architecture_matches_maml() -> None:
    model = Conv4(num_classes=5, in_channels=3, width=64, image_size=84)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == len(norms) == len(pools) == 4
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert [c.out_channels for c in convs] == [64] * 4 and convs[0].in_channels == 3
    assert model.head.in_features == 64 * 5 * 5 and model.head.out_features == 5
    # The MAML/iMAML Conv4 on 84x84 RGB, 5 ways: 4 conv+BN blocks and a 1600->5 head.
    assert sum(p.numel() for p in model.parameters()) == 121_093
    assert model(torch.zeros(2, 3, 84, 84)).shape == (2, 5)


def test_conv4_batchnorm_uses_batch_statistics_in_eval_mode() -> None:
    model = Conv4(num_classes=3, width=8, image_size=28)
    assert list(model.buffers()) == []
    x = torch.rand(6, 1, 28, 28)
    train_out = model.train()(x)
    eval_out = model.eval()(x)
    torch.testing.assert_close(train_out, eval_out)
    tracked = Conv4(num_classes=3, width=8, image_size=28, track_running_stats=True)
    assert len(list(tracked.buffers())) == 12


def test_create_backbone_specs() -> None:
    assert list_backbones() == ["conv4", "conv4-<width>", "timm:<name>"]
    default = create_backbone("conv4", num_classes=5, in_channels=1, image_size=28)
    narrow = create_backbone("conv4-16", num_classes=5, in_channels=1, image_size=28)
    assert isinstance(default, Conv4) and isinstance(narrow, Conv4)
    assert default.head.in_features == 64 and narrow.head.in_features == 16
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("resnet", num_classes=5, in_channels=1, image_size=28)
    with pytest.raises(ValueError, match="timm has no model"):
        create_backbone("timm:not_a_model_xyz", num_classes=5, in_channels=1, image_size=28)
    with pytest.raises(ValueError, match="timm has no model"):
        create_backbone("timm:", num_classes=5, in_channels=1, image_size=28)


def test_a_registered_backbone_builds_from_its_spec_everywhere() -> None:
    built: list[dict[str, int]] = []

    @register_backbone("mlp_test", takes_width=True)
    def mlp(*, num_classes: int, in_channels: int, image_size: int, width: int = 4) -> nn.Module:
        built.append({"width": width, "image_size": image_size, "in_channels": in_channels})
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * image_size**2, width),
            nn.Linear(width, num_classes),
        )

    @register_backbone("not_a_module_test")
    def broken(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return "oops"  # type: ignore[return-value]

    try:
        assert list_backbones()[2:] == [
            "mlp_test",
            "mlp_test-<width>",
            "not_a_module_test",
            "timm:<name>",
        ]
        model = create_backbone("mlp_test-7", num_classes=3, in_channels=2, image_size=5)
        assert model[1].out_features == 7 and model[2].out_features == 3
        assert (
            create_backbone("mlp_test", num_classes=3, in_channels=1, image_size=4)[1].out_features
            == 4
        )
        # The few-shot pipeline builds it from the config's spec string.
        trained = build_model(TrainConfig(backbone="mlp_test-6", ways=4), (1, 28, 28))
        assert trained[2].out_features == 4 and built[-1] == {
            "width": 6,
            "image_size": 28,
            "in_channels": 1,
        }
        with pytest.raises(ValueError, match="unknown backbone 'not_a_module_test-3'"):
            create_backbone("not_a_module_test-3", num_classes=3, in_channels=1, image_size=4)
        with pytest.raises(TypeError, match=r"returned str, not a torch\.nn\.Module"):
            create_backbone("not_a_module_test", num_classes=3, in_channels=1, image_size=4)
        with pytest.raises(ValueError, match="already registered"):
            register_backbone("mlp_test")(broken)
        assert register_backbone("mlp_test", takes_width=True)(mlp) is mlp  # same function: no-op
    finally:
        unregister_backbone("mlp_test")
        unregister_backbone("not_a_module_test")
    assert list_backbones() == ["conv4", "conv4-<width>", "timm:<name>"]
    with pytest.raises(ValueError, match=r"register your own with implicit_meta\.models"):
        create_backbone("mlp_test", num_classes=3, in_channels=1, image_size=4)
    with pytest.raises(ValueError, match="without ':'"):
        register_backbone("timm:mine")
    with pytest.raises(KeyError, match="no backbone named"):
        unregister_backbone("mlp_test")


def test_timm_backbone_is_built_through_timm() -> None:
    model = create_backbone("timm:resnet10t", num_classes=7, in_channels=1, image_size=28)
    assert type(model).__module__.startswith("timm.")
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 7)


@pytest.mark.parametrize("spec", ["conv4", "timm:resnet10t", "timm:test_efficientnet"])
def test_backbone_contract_one_meta_backward(spec: str, device: torch.device) -> None:
    """Every backbone meta-trains: one 3-way 1-shot 28x28 task through meta_backward."""
    torch.manual_seed(0)
    model = create_backbone(spec, num_classes=3, in_channels=1, image_size=28).to(device)
    buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    meta = im.ImplicitMetaOptimizer(
        model,
        torch.optim.Adam(model.parameters(), lr=1e-3),
        reg=2.0,
        inner_steps=2,
        inner_lr=0.05,
        cg_steps=2,
    )
    labels = torch.arange(3, device=device)
    support = (torch.rand(3, 1, 28, 28, device=device), labels)
    query = (torch.rand(6, 1, 28, 28, device=device), labels.repeat(2))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    meta.zero_grad()
    result = meta.meta_backward(_loss, support, query)
    assert torch.isfinite(result.outer_loss) and torch.isfinite(result.inner_loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values() if g is not None) > 0
    meta.step()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    # BatchNorm running statistics are never written by meta-training.
    for name, value in buffers.items():
        assert torch.equal(model.state_dict()[name], value), name
    adapted = meta.adapt(_loss, support)
    assert adapted(query[0]).shape == (6, 3)
