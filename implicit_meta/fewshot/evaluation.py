"""Few-shot evaluation: adapt to each test episode, score its query set, summarise with a 95% CI."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm  # type: ignore[import-untyped,unused-ignore]

from implicit_meta.data import EpisodeSampler
from implicit_meta.fewshot.losses import accuracy, cross_entropy
from implicit_meta.optimizer import ImplicitMetaOptimizer

__all__ = ["EvaluationResult", "confidence_interval", "episode_accuracies", "evaluate_episodes"]


@dataclass(frozen=True)
class EvaluationResult:
    """Mean query accuracy over test episodes and its 95% confidence interval.

    Attributes:
        accuracy: Mean of the per-episode query accuracies, in [0, 1].
        ci95: Half-width of the 95% interval, ``1.96 * std / sqrt(episodes)``.
        std: Standard deviation of the per-episode accuracies (population, ``ddof=0``).
        episodes: Number of episodes.
        ways: Classes per episode.
        shots: Support images per class.

    Example:
        >>> r = EvaluationResult(0.9, 0.01, 0.1, 600, 5, 1)
        >>> r.summary()
        '5-way 1-shot accuracy: 90.00% ± 1.00% (95% CI over 600 episodes)'
    """

    accuracy: float
    ci95: float
    std: float
    episodes: int
    ways: int
    shots: int

    @classmethod
    def from_accuracies(
        cls, accuracies: Sequence[float], ways: int, shots: int
    ) -> EvaluationResult:
        """Summarise per-episode accuracies (e.g. gathered from several ranks).

        Args:
            accuracies: One query accuracy per episode.
            ways: Classes per episode.
            shots: Support images per class.

        Returns:
            Mean, 95% half-width and standard deviation over all the episodes.

        Raises:
            ValueError: If ``accuracies`` is empty.

        Example:
            >>> EvaluationResult.from_accuracies([0.8, 1.0], ways=5, shots=1).accuracy
            0.9
        """
        mean, ci95, std = confidence_interval(accuracies)
        return cls(mean, ci95, std, len(accuracies), ways, shots)

    def summary(self) -> str:
        """A one-line human-readable report, in percent.

        Returns:
            The line.
        """
        return (
            f"{self.ways}-way {self.shots}-shot accuracy: {100 * self.accuracy:.2f}% "
            f"± {100 * self.ci95:.2f}% (95% CI over {self.episodes} episodes)"
        )

    def to_dict(self) -> dict[str, float | int]:
        """The fields as plain numbers, for JSON.

        Returns:
            A dict keyed by field name.
        """
        return asdict(self)


def confidence_interval(accuracies: Sequence[float]) -> tuple[float, float, float]:
    """Mean, 95% half-width and standard deviation of per-episode accuracies.

    The half-width is ``1.96 * std / sqrt(n)`` with the population standard deviation
    (``ddof=0``), the formula of the MAML and iMAML evaluation code.

    Args:
        accuracies: One accuracy per episode.

    Returns:
        ``(mean, ci95, std)``.

    Raises:
        ValueError: If ``accuracies`` is empty.

    Example:
        >>> mean, ci95, std = confidence_interval([0.0, 1.0] * 50)
        >>> mean, round(ci95, 4), std
        (0.5, 0.098, 0.5)
    """
    n = len(accuracies)
    if n == 0:
        raise ValueError("need at least one episode accuracy")
    mean = math.fsum(accuracies) / n
    std = math.sqrt(math.fsum((a - mean) ** 2 for a in accuracies) / n)
    return mean, 1.96 * std / math.sqrt(n), std


def episode_accuracies(
    meta: ImplicitMetaOptimizer,
    sampler: EpisodeSampler,
    episodes: int,
    *,
    progress: bool = False,
) -> list[float]:
    """The query accuracy of the adapted meta-model on each of ``episodes`` test tasks.

    Each task is adapted with :meth:`ImplicitMetaOptimizer.adapt` (the meta-optimizer's inner
    solver and settings, cross-entropy on the support set) and its query set is classified by
    the model at the adapted parameters (no copy of the model is made). The model is kept in
    train mode throughout, so BatchNorm normalises the support and the query set each by its
    own batch statistics, as during meta-training (the transductive MAML/iMAML protocol); the
    meta-model itself is not changed.

    Several ranks each evaluate their share with their own sampler (``rank`` argument) and
    gather the lists; :meth:`EvaluationResult.from_accuracies` then summarises all of them.

    Args:
        meta: Meta-optimizer holding the meta-trained model.
        sampler: Test-episode sampler on the model's device (one task is drawn at a time).
        episodes: Number of test episodes (may be 0).
        progress: Show a tqdm bar on stderr.

    Returns:
        One accuracy in [0, 1] per episode, in sampling order.

    Raises:
        ValueError: If ``episodes`` is negative.

    Example:
        >>> import torch, warnings
        >>> import implicit_meta as im
        >>> from implicit_meta.data import EpisodeSampler, load_omniglot
        >>> from implicit_meta.models import create_backbone
        >>> warnings.simplefilter("ignore")  # curvature warnings of an untrained model
        >>> test_sampler = EpisodeSampler(load_omniglot().test, 3, 1, 2, seed=0)
        >>> model = create_backbone("conv4-8", num_classes=3, in_channels=1, image_size=28)
        >>> meta = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()),
        ...                                 inner_steps=2, cg_steps=1)
        >>> values = episode_accuracies(meta, test_sampler, 4)
        >>> len(values), all(0.0 <= v <= 1.0 for v in values)
        (4, True)
    """
    if episodes < 0:
        raise ValueError(f"episodes must be non-negative, got {episodes}")
    model = meta.model
    was_training = model.training
    model.train()
    scores: list[torch.Tensor] = []
    try:
        for _ in tqdm(range(episodes), desc="evaluate", disable=not progress, leave=False):
            batch = sampler.sample(1)
            adapted = meta.adapt(cross_entropy, batch.support(0))
            with torch.no_grad():
                xq, yq = batch.query(0)
                scores.append(accuracy(adapted(xq), yq))
    finally:
        model.train(was_training)
    if not scores:
        return []
    # One device-to-host transfer for all episodes.
    values: list[float] = torch.stack(scores).to(torch.float64).tolist()
    return values


def evaluate_episodes(
    meta: ImplicitMetaOptimizer,
    sampler: EpisodeSampler,
    episodes: int,
    *,
    progress: bool = False,
) -> EvaluationResult:
    """Adapt the meta-model to ``episodes`` test tasks and score each on its query set.

    The per-episode accuracies are those of :func:`episode_accuracies`, summarised by their
    mean and 95% confidence interval.

    Args:
        meta: Meta-optimizer holding the meta-trained model.
        sampler: Test-episode sampler on the model's device (one task is drawn at a time).
        episodes: Number of test episodes (the papers use 600).
        progress: Show a tqdm bar on stderr.

    Returns:
        The summary.

    Raises:
        ValueError: If ``episodes`` is not positive.

    Example:
        >>> import torch, warnings
        >>> import implicit_meta as im
        >>> from implicit_meta.data import EpisodeSampler, load_omniglot
        >>> from implicit_meta.models import create_backbone
        >>> warnings.simplefilter("ignore")  # curvature warnings of an untrained model
        >>> test_sampler = EpisodeSampler(load_omniglot().test, 3, 1, 2, seed=0)
        >>> model = create_backbone("conv4-8", num_classes=3, in_channels=1, image_size=28)
        >>> meta = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()),
        ...                                 inner_steps=2, cg_steps=1)
        >>> result = evaluate_episodes(meta, test_sampler, 4)
        >>> result.episodes, 0.0 <= result.accuracy <= 1.0
        (4, True)
    """
    if episodes < 1:
        raise ValueError(f"episodes must be positive, got {episodes}")
    values = episode_accuracies(meta, sampler, episodes, progress=progress)
    return EvaluationResult.from_accuracies(values, sampler.ways, sampler.shots)
