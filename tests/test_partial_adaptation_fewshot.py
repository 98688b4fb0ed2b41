"""Partial adaptation in the few-shot layer: the head solver, timm backbones, the command line."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import implicit_meta as im
from implicit_meta import cli
from implicit_meta.data import EpisodeSampler
from implicit_meta.fewshot import TrainConfig, build_meta_optimizer, build_model, load_meta_model
from implicit_meta.fewshot.losses import cross_entropy, cross_entropy_and_accuracy
from implicit_meta.fewshot.meta_splits import load_splits
from implicit_meta.functional import CGStatus
from implicit_meta.models import create_backbone


@pytest.fixture(scope="module")
def omniglot_batch():
    splits = load_splits("omniglot", None, "paper")
    sampler = EpisodeSampler(splits.train, 5, 1, 15, 0, torch.device("cpu"))
    return sampler.sample(4)


@pytest.mark.parametrize("ways", [5])
def test_the_default_head_solver_reaches_stationarity_in_float32(omniglot_batch, ways):
    config = TrainConfig(ways=ways, shots=1, adapt="head", reg=0.5, cg_steps=20)
    torch.manual_seed(0)
    model = build_model(config, (1, 28, 28))
    meta = build_meta_optimizer(model, config)
    assert meta.problem.solver == "newton" and meta.problem.steps == 8
    batch = omniglot_batch
    result = meta.meta_backward_batch(
        cross_entropy, (batch.xs, batch.ys), (batch.xq, batch.yq), strategy="loop"
    )
    assert model.head.weight.dtype == torch.float32
    assert float(result.relative_stationarity.max()) <= 1e-4
    # The head's system is positive definite: CG converges in a few dozen steps.
    assert float(result.relative_cg_residual.max()) <= 1e-3
    assert not (result.cg_status == int(CGStatus.NONPOSITIVE_CURVATURE)).any()
    # The whole-network default, by contrast, stops far from stationarity.
    whole = build_meta_optimizer(model, TrainConfig(ways=ways, shots=1, adapt="all"))
    far = whole.meta_backward_batch(
        cross_entropy, (batch.xs, batch.ys), (batch.xq, batch.yq), strategy="loop"
    )
    assert float(far.relative_stationarity.min()) > 1e-2


def test_a_timm_backbone_adapts_its_head_with_no_user_code(omniglot_batch):
    model = create_backbone("timm:resnet10t", num_classes=5, in_channels=1, image_size=28)
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.Adam(model.parameters(), 1e-3), adapt="head", reg=0.5, cg_steps=10
    )
    assert meta.adapted == ("fc.weight", "fc.bias")
    batch = omniglot_batch
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: the split holds for timm
        result = meta.meta_backward_batch(
            cross_entropy,
            (batch.xs[:2], batch.ys[:2]),
            (batch.xq[:2], batch.yq[:2]),
            outer_loss_fn=cross_entropy_and_accuracy,
            strategy="loop",
        )
    assert meta._head_split is not None
    assert float(result.relative_stationarity.max()) <= 1e-4
    body = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    assert all(p.grad is not None for p in body)
    assert any(float(p.grad.abs().max()) > 0 for p in body)


TINY = [
    "--backbone", "conv4-8", "--ways", "3", "--shots", "1", "--queries", "2",
    "--meta-batch", "2", "--threads", "1", "--log-every", "1", "--checkpoint-every", "2",
    "--eval-episodes", "4", "--no-progress", "--val-episodes", "0", "--meta-steps", "2",
]  # fmt: skip


def test_train_and_evaluate_adapt_the_head_the_same_way(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert cli.main(["train", *TINY, "--adapt", "head", "--cg-steps", "5", "--out", str(out)]) == 0
    stored = torch.load(out / "checkpoint.pt", weights_only=True)
    assert stored["config"]["adapt"] == "head"
    # The config is the checkpoint's one record of the settings; the solver follows from it.
    assert TrainConfig.from_dict(stored["config"]).inner_problem().solver == "newton"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["relative_stationarity"] <= 1e-4 for r in records)
    trained = json.loads((out / "evaluation.json").read_text())
    capsys.readouterr()
    assert (
        cli.main(["evaluate", "--checkpoint", str(out / "checkpoint.pt"), "--episodes", "4"]) == 0
    )
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["accuracy"] == trained["accuracy"]
    model, config = load_meta_model(out / "checkpoint.pt")
    meta = build_meta_optimizer(model, config)
    assert meta.adapted == ("head.weight", "head.bias")
    # Resuming may not switch what adapts.
    assert cli.main(["train", *TINY, "--adapt", "all", "--out", str(out), "--resume"]) == 2
    assert "adapt" in capsys.readouterr().err
