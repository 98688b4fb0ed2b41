"""Issue 20, item 3: attention models (timm ViTs) with second-order meta-gradients and the CLI.

A ViT calls ``F.scaled_dot_product_attention``, whose fused kernels have no derivative of their
backward. The products must still work, and give the numbers of the same ViT with attention
written out (``fused_attn = False``: softmax(q k^T) v in plain operators), which is the
independent reference here. Through the CLI, a ``timm:`` ViT must train on 28x28 Omniglot
(``img_size`` passed), and a backbone that cannot take the images must fail with one line,
exit status 2, and no run folder.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im
from implicit_meta import cli
from implicit_meta.functional import ComposedLoss, gauss_newton_products, make_hvp
from implicit_meta.models import register_backbone, unregister_backbone

timm = pytest.importorskip("timm")


def _vit() -> nn.Module:
    """A tiny timm ViT (one block of two heads on 16x16 images), in float64 for tight checks."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=16,
        patch_size=8,
        num_classes=3,
        depth=1,
        embed_dim=16,
        num_heads=2,
    )
    return model.double().train()


def _fused(model: nn.Module) -> list[bool]:
    return [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]


def _unfused(model: nn.Module) -> nn.Module:
    """The same ViT, attention computed by timm's plain-operator path instead of SDPA."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    assert _fused(copied) == [False]
    return copied


def _batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(6, 3, 16, 16, generator=generator, dtype=torch.float64)
    return images, torch.arange(6) % 3


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.named_parameters()}


def _direction(params: dict[str, Tensor]) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(2)
    return {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}


def _close(a: dict[str, Tensor], b: dict[str, Tensor], rtol: float = 1e-9) -> None:
    assert a.keys() == b.keys()
    flat_a = torch.cat([a[k].reshape(-1) for k in a])
    flat_b = torch.cat([b[k].reshape(-1) for k in a])
    error = float((flat_a - flat_b).norm() / flat_b.norm())
    assert error < rtol, error


def test_the_fixture_vit_uses_scaled_dot_product_attention() -> None:
    # Otherwise the tests below would compare the plain path with itself.
    assert _fused(_vit()) == [True]


@pytest.mark.parametrize("mode", ["reverse_over_reverse", "forward_over_reverse"])
def test_hessian_vector_product_through_sdpa(mode: str) -> None:
    model = _vit()
    reference_model = _unfused(model)
    images, labels = _batch()

    def loss(module: nn.Module) -> Callable[[dict[str, Tensor]], Tensor]:
        return lambda p: F.cross_entropy(torch.func.functional_call(module, p, (images,)), labels)

    params = _params(model)
    vector = _direction(params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to reverse mode either
        gradient, hvp_fn = make_hvp(loss(model), params, mode=mode)
        product = hvp_fn(vector)
    reference_gradient, reference_hvp = make_hvp(loss(reference_model), params)
    _close(gradient, reference_gradient)
    _close(product, reference_hvp(vector))

    # And against central differences of the reference gradient, to be sure of the reference.
    eps = 1e-6  # the direction has norm ~80: a step of ~1e-4
    plus = {k: v + eps * vector[k] for k, v in params.items()}
    minus = {k: v - eps * vector[k] for k, v in params.items()}
    grad_plus, _ = make_hvp(loss(reference_model), plus)
    grad_minus, _ = make_hvp(loss(reference_model), minus)
    finite = {k: (grad_plus[k] - grad_minus[k]) / (2 * eps) for k in params}
    _close(product, finite, rtol=1e-6)


def test_gauss_newton_product_through_sdpa() -> None:
    model = _vit()
    reference_model = _unfused(model)
    images, labels = _batch()

    def composed(module: nn.Module) -> ComposedLoss:
        return ComposedLoss(
            lambda p: torch.func.functional_call(module, p, (images,)),
            lambda out: F.cross_entropy(out, labels),
        )

    params = _params(model)
    vector = _direction(params)
    value, gradient, product = gauss_newton_products(composed(model), params)
    ref_value, ref_gradient, ref_product = gauss_newton_products(composed(reference_model), params)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=0)
    _close(gradient, ref_gradient)
    _close(product(vector), ref_product(vector))


@pytest.fixture
def _quiet() -> Iterator[None]:
    # An untrained ViT's exact Hessian is indefinite: that warning is not what is tested here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not positive definite.*")
        yield


@pytest.mark.usefixtures("_quiet")
@pytest.mark.parametrize(
    ("inner", "loss_kind"),
    [("sgd", "output_loss"), ("sgd", "plain"), ("newton_cg", "output_loss")],
)
def test_meta_backward_with_cg_on_a_timm_vit(inner: str, loss_kind: str) -> None:
    images, labels = _batch()
    support, query = (images[:3], labels[:3]), (images[3:], labels[3:])
    if loss_kind == "output_loss":
        loss_fn = im.output_loss(F.cross_entropy)
    else:

        def loss_fn(module: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
            return F.cross_entropy(module(batch[0]), batch[1])

    grads = []
    model = _vit()
    for candidate in (model, _unfused(model)):
        meta = im.ImplicitMetaOptimizer(
            candidate,
            torch.optim.SGD(candidate.parameters(), lr=0.1),
            reg=2.0,
            inner=inner,
            inner_steps=2,
            inner_lr=0.1,
            cg_steps=3,
        )
        result = meta.meta_backward(loss_fn, support, query)
        assert int(result.cg_iterations) >= 1
        grads.append({k: p.grad for k, p in candidate.named_parameters()})
    fused, reference = grads
    assert all(g is not None for g in fused.values())
    _close(fused, reference, rtol=1e-8)


@pytest.mark.usefixtures("_quiet")
def test_meta_backward_batch_vmapped_with_cg_on_a_timm_vit() -> None:
    images, labels = _batch()
    tasks = (torch.stack([images, images.flip(0)]), torch.stack([labels, labels.flip(0)]))
    grads = []
    model = _vit()
    for candidate in (model, _unfused(model)):
        meta = im.ImplicitMetaOptimizer(
            candidate,
            torch.optim.SGD(candidate.parameters(), lr=0.1),
            reg=2.0,
            inner_steps=2,
            inner_lr=0.1,
            cg_steps=3,
        )
        with warnings.catch_warnings():
            # torch has no vmap rule for the fused kernel of the (first-order) inner loop.
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            warnings.filterwarnings("error", message=".*falls back.*|.*falling back.*")
            meta.meta_backward_batch(im.output_loss(F.cross_entropy), tasks, tasks, strategy="vmap")
        grads.append({k: p.grad for k, p in candidate.named_parameters()})
    _close(*grads, rtol=1e-8)


# The CLI on the embedded Omniglot (28x28, one channel), with tiny settings.
TINY = [
    "--ways", "2", "--shots", "1", "--queries", "1", "--meta-batch", "1", "--meta-steps", "1",
    "--inner-steps", "1", "--eval-episodes", "0", "--val-episodes", "0", "--threads", "1",
    "--no-progress",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


def test_cli_trains_a_timm_vit_on_28x28_omniglot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["train", *TINY, "--backbone", "timm:vit_tiny_patch16_224", "--cg-steps", "2"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not positive definite.*")
        code = cli.main([*args, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "Traceback" not in err
    assert (out / "checkpoint.pt").is_file()
    # The checkpoint loads back: the ViT is rebuilt for the same 28x28 images.
    model, config = im.fewshot.load_meta_model(out)
    assert config.backbone == "timm:vit_tiny_patch16_224"
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 2)


def test_cli_backbone_that_cannot_take_the_images_exits_2_without_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    @register_backbone("needs_32x32_test")
    def needs_32x32(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        # Ignores image_size: its head is sized for 32x32 images only.
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 32 * 32, num_classes))

    out = tmp_path / "run"
    try:
        code = cli.main(["train", *TINY, "--backbone", "needs_32x32_test", "--out", str(out)])
    finally:
        unregister_backbone("needs_32x32_test")
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("implicit-meta: error")]
    assert len(errors) == 1, err
    assert "needs_32x32_test" in errors[0] and "1x28x28" in errors[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_train_checks_the_output_shape_before_creating_the_folder(tmp_path: Path) -> None:
    @register_backbone("wrong_ways_test")
    def wrong_ways(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes + 1))

    config = im.fewshot.TrainConfig(
        backbone="wrong_ways_test", ways=2, shots=1, queries=1, meta_batch=1, meta_steps=1,
        inner_steps=1, eval_episodes=0, val_episodes=0, threads=1, device="cpu",
    )  # fmt: skip
    out = tmp_path / "run"
    try:
        with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 2\) logits"):
            im.fewshot.train(config, out, progress=False)
    finally:
        unregister_backbone("wrong_ways_test")
    assert not out.exists()
