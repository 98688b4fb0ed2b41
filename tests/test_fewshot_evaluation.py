from __future__ import annotations

import math
import statistics
from collections.abc import Iterator

import pytest
import torch

import implicit_meta as im
from implicit_meta.data import EpisodeBatch, EpisodeSampler, FewShotDataset
from implicit_meta.fewshot import (
    EvaluationResult,
    MetaBatchStats,
    confidence_interval,
    cross_entropy,
    cross_entropy_and_accuracy,
    evaluate_episodes,
    meta_train_step,
)
from implicit_meta.fewshot.meta_batch import meta_backward_episodes
from implicit_meta.models import Conv4

pytestmark = pytest.mark.filterwarnings("ignore:I \\+ H/reg is not positive definite")


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _meta(device: torch.device | str = "cpu", ways: int = 3) -> im.ImplicitMetaOptimizer:
    model = Conv4(ways, width=4, image_size=16).to(device)
    return im.ImplicitMetaOptimizer(
        model, torch.optim.Adam(model.parameters(), 1e-2), reg=2.0, inner_steps=3, cg_steps=2
    )


def _dataset(classes: int = 6, per_class: int = 5) -> FewShotDataset:
    images = torch.randint(0, 256, (classes, per_class, 1, 16, 16), dtype=torch.uint8)
    return FewShotDataset(images, tuple(f"c{i}" for i in range(classes)))


@pytest.mark.parametrize(
    "accuracies",
    [[0.0, 1.0] * 300, [0.8] * 600, [0.2, 0.4, 0.9, 1.0, 0.55], [0.6]],
)
def test_confidence_interval_closed_form(accuracies: list[float]) -> None:
    mean, ci95, std = confidence_interval(accuracies)
    n = len(accuracies)
    assert mean == pytest.approx(sum(accuracies) / n)
    assert std == pytest.approx(statistics.pstdev(accuracies))
    assert ci95 == pytest.approx(1.96 * statistics.pstdev(accuracies) / math.sqrt(n))


def test_confidence_interval_known_values() -> None:
    mean, ci95, std = confidence_interval([0.0, 1.0] * 300)
    assert (mean, std) == (0.5, 0.5)
    assert ci95 == pytest.approx(0.98 / math.sqrt(600))  # 1.96 * 0.5 / sqrt(600) = 0.0400...
    assert confidence_interval([0.7] * 10)[1] == 0.0
    with pytest.raises(ValueError):
        confidence_interval([])


def test_evaluation_result_summary_and_dict() -> None:
    result = EvaluationResult(0.9713, 0.0045, 0.055, 600, 5, 5)
    assert result.summary() == "5-way 5-shot accuracy: 97.13% ± 0.45% (95% CI over 600 episodes)"
    assert result.to_dict()["episodes"] == 600


def test_evaluate_episodes_matches_manual_adaptation(device: torch.device) -> None:
    meta = _meta(device)
    meta.model.eval()  # evaluation switches to train mode and restores the mode afterwards
    dataset = _dataset()
    result = evaluate_episodes(meta, EpisodeSampler(dataset, 3, 1, 2, seed=5, device=device), 4)
    assert not meta.model.training
    manual = []
    sampler = EpisodeSampler(dataset, 3, 1, 2, seed=5, device=device)
    meta.model.train()
    for _ in range(4):
        batch = sampler.sample(1)
        adapted = meta.adapt(cross_entropy, batch.support(0))
        xq, yq = batch.query(0)
        manual.append(float((adapted(xq).argmax(-1) == yq).float().mean()))
    assert result.accuracy == pytest.approx(sum(manual) / 4)
    assert result.ci95 == pytest.approx(1.96 * statistics.pstdev(manual) / 2)
    assert (result.episodes, result.ways, result.shots) == (4, 3, 1)
    with pytest.raises(ValueError):
        evaluate_episodes(meta, sampler, 0)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_meta_batch_gradient_is_the_task_mean(device: torch.device, strategy: str) -> None:
    torch.manual_seed(0)
    meta = _meta(device)
    batch = EpisodeSampler(_dataset(), 3, 2, 2, seed=1, device=device).sample(3)
    meta.zero_grad()
    stats = meta_backward_episodes(meta, batch, strategy)
    batched = {n: p.grad.clone() for n, p in meta.model.named_parameters() if p.grad is not None}
    meta.zero_grad()
    losses = []
    for t in range(3):
        result = meta.meta_backward(cross_entropy, batch.support(t), batch.query(t))
        losses.append(float(result.outer_loss))
    mean = {n: p.grad / 3 for n, p in meta.model.named_parameters() if p.grad is not None}
    assert mean.keys() == batched.keys()
    flat_batched = torch.cat([batched[n].flatten() for n in mean])
    flat_mean = torch.cat([mean[n].flatten() for n in mean])
    # Scaling the outer loss by 1/T scales CG's solution by 1/T up to float32 rounding.
    assert float((flat_batched - flat_mean).norm() / flat_mean.norm()) < 1e-4
    assert float(stats.outer_loss) == pytest.approx(sum(losses) / 3, rel=1e-5)


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
def test_recorded_query_accuracy_is_at_the_adapted_parameters(strategy: str) -> None:
    torch.manual_seed(0)
    meta = _meta()
    batch = EpisodeSampler(_dataset(per_class=8), 3, 2, 6, seed=2).sample(2)
    expected = []
    for t in range(2):
        adapted = meta.adapt(cross_entropy, batch.support(t))
        xq, yq = batch.query(t)
        expected.append(float((adapted(xq).argmax(-1) == yq).float().mean()))
    stats = meta_train_step(meta, batch, strategy)
    assert float(stats.query_accuracy) == pytest.approx(sum(expected) / 2)
    assert stats.stacked().shape == (len(MetaBatchStats.names()),) == (12,)


def test_cross_entropy_and_accuracy_returns_the_loss_and_the_accuracy() -> None:
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    loss, aux = cross_entropy_and_accuracy(torch.nn.Identity(), (logits, torch.tensor([0, 0, 0])))
    full = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 0, 0]))
    torch.testing.assert_close(loss, full)
    assert float(aux["accuracy"]) == pytest.approx(2 / 3)


def test_episode_batch_shapes_used_by_the_trainer() -> None:
    x = torch.rand(2, 3, 1, 16, 16)
    y = torch.tensor([[0, 1, 2]] * 2)
    stats = meta_backward_episodes(_meta(), EpisodeBatch(x, y, x, y, y))
    assert all(t.dim() == 0 for t in (stats.outer_loss, stats.query_accuracy))
