"""Deterministic, vectorised N-way K-shot episode sampling, and the meta-batches it yields."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from implicit_meta.data.dataset import FewShotDataset

__all__ = ["EpisodeBatch", "EpisodeSampler"]

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class EpisodeBatch:
    """``T`` N-way episodes with a leading task dimension.

    Within a task, support and query images are grouped by label: the ``K`` support images of
    label 0 come first, then those of label 1, and so on (likewise for the query set).

    Attributes:
        xs: Support images ``[T, N*K, C, H, W]``.
        ys: Support labels ``[T, N*K]``, int64 in ``0..N-1``.
        xq: Query images ``[T, N*Q, C, H, W]``.
        yq: Query labels ``[T, N*Q]``, int64 in ``0..N-1``.
        classes: ``[T, N]`` int64: ``classes[t, n]`` is the dataset class index shown with label
            ``n`` in task ``t``.

    Example:
        >>> b = EpisodeBatch(torch.zeros(2, 5, 1, 28, 28), torch.zeros(2, 5, dtype=torch.int64),
        ...                  torch.zeros(2, 10, 1, 28, 28), torch.zeros(2, 10, dtype=torch.int64),
        ...                  torch.zeros(2, 5, dtype=torch.int64))
        >>> xs, ys = b.support(1)
        >>> tuple(xs.shape), len(b)
        ((5, 1, 28, 28), 2)
    """

    xs: torch.Tensor
    ys: torch.Tensor
    xq: torch.Tensor
    yq: torch.Tensor
    classes: torch.Tensor

    def __len__(self) -> int:
        """Return the number of tasks ``T``."""
        return int(self.xs.shape[0])

    @property
    def num_tasks(self) -> int:
        """Number of tasks ``T``."""
        return len(self)

    @property
    def device(self) -> torch.device:
        """Device of the images."""
        return self.xs.device

    def to(self, device: torch.device | str, *, non_blocking: bool = False) -> EpisodeBatch:
        """Return the batch with every tensor on ``device``.

        Args:
            device: Target device.
            non_blocking: Passed to :meth:`torch.Tensor.to` (useful from pinned memory).

        Returns:
            The moved batch.

        Example:
            >>> b = EpisodeBatch(*(torch.zeros(1, 1) for _ in range(5)))
            >>> b.to("cpu").device
            device(type='cpu')
        """
        target = torch.device(device)
        return EpisodeBatch(
            *(
                t.to(target, non_blocking=non_blocking)
                for t in (self.xs, self.ys, self.xq, self.yq, self.classes)
            )
        )

    def support(self, t: int) -> Pair:
        """Return task ``t``'s support set ``(xs[t], ys[t])``.

        Args:
            t: Task index.

        Returns:
            Images ``[N*K, C, H, W]`` and labels ``[N*K]``.

        Example:
            >>> b = EpisodeBatch(*(torch.zeros(3, 4) for _ in range(5)))
            >>> b.support(0)[0].shape
            torch.Size([4])
        """
        return self.xs[t], self.ys[t]

    def query(self, t: int) -> Pair:
        """Return task ``t``'s query set ``(xq[t], yq[t])``.

        Args:
            t: Task index.

        Returns:
            Images ``[N*Q, C, H, W]`` and labels ``[N*Q]``.

        Example:
            >>> b = EpisodeBatch(*(torch.zeros(3, 4) for _ in range(5)))
            >>> b.query(2)[1].shape
            torch.Size([4])
        """
        return self.xq[t], self.yq[t]

    def task(self, t: int) -> tuple[Pair, Pair]:
        """Return task ``t`` as ``((xs, ys), (xq, yq))``.

        Args:
            t: Task index.

        Returns:
            Support and query pairs.

        Example:
            >>> b = EpisodeBatch(*(torch.zeros(3, 4) for _ in range(5)))
            >>> (xs, ys), (xq, yq) = b.task(0)
        """
        return self.support(t), self.query(t)

    def __iter__(self) -> Iterator[tuple[Pair, Pair]]:
        """Iterate over tasks as ``((xs, ys), (xq, yq))``."""
        for t in range(len(self)):
            yield self.task(t)


class EpisodeSampler:
    """Draw meta-batches of N-way K-shot Q-query episodes from a :class:`FewShotDataset`.

    The dataset's images are moved to ``device`` once, at construction; each meta-batch is then
    one random draw of indices on the host and one gather on the device, with no disk access and
    no Python loop over images. Classes of a task are distinct, and the K support and Q query
    images of a class are distinct images of it.

    Randomness comes from a private ``numpy.random.Generator`` (PCG64) seeded by
    ``SeedSequence(seed, spawn_key=(rank,))``: the same ``(seed, rank)`` gives the same
    episodes on any device, and different ranks get statistically independent streams (numpy's
    mechanism for parallel streams), so data-parallel workers never draw the same tasks.
    Global numpy / torch random state is neither used nor changed.

    uint8 images are returned as ``dtype`` divided by 255 (values in [0, 1], no mean/std
    normalisation); floating-point images are only cast to ``dtype``.

    Args:
        dataset: Classes to draw from.
        ways: Classes per task, N.
        shots: Support images per class, K.
        queries: Query images per class, Q (may be 0).
        seed: Non-negative seed of the stream.
        device: Where images live and batches are produced; None keeps the dataset's device.
        rank: Index of the data-parallel worker (non-negative); selects an independent stream.
        dtype: Floating-point dtype of the returned images.

    Raises:
        ValueError: If ``ways`` exceeds the number of classes, ``shots + queries`` exceeds the
            images per class, or an argument is out of range.

    Example:
        >>> ds = FewShotDataset(torch.zeros(10, 20, 1, 28, 28, dtype=torch.uint8),
        ...                     tuple(str(i) for i in range(10)))
        >>> sampler = EpisodeSampler(ds, ways=5, shots=1, queries=15, seed=0, device="cpu")
        >>> batch = sampler.sample(tasks=4)
        >>> tuple(batch.xs.shape), tuple(batch.yq.shape), batch.xs.dtype
        ((4, 5, 1, 28, 28), (4, 75), torch.float32)
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        ways: int,
        shots: int,
        queries: int,
        seed: int = 0,
        device: torch.device | str | None = None,
        *,
        rank: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if ways < 1 or shots < 1 or queries < 0:
            raise ValueError(
                f"need ways >= 1, shots >= 1, queries >= 0; got {ways}, {shots}, {queries}"
            )
        if ways > dataset.num_classes:
            raise ValueError(
                f"{ways}-way tasks need {ways} classes, the dataset has {dataset.num_classes}"
            )
        if shots + queries > dataset.images_per_class:
            raise ValueError(
                f"shots + queries = {shots + queries} distinct images per class needed, the "
                f"dataset has {dataset.images_per_class} per class"
            )
        if seed < 0 or rank < 0:
            raise ValueError(f"seed and rank must be non-negative, got {seed} and {rank}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be floating point, got {dtype}")
        self.ways, self.shots, self.queries = ways, shots, queries
        self.seed, self.rank, self.dtype = seed, rank, dtype
        self.device = dataset.device if device is None else torch.device(device)
        self.dataset = dataset.to(self.device)
        self._rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(rank,)))
        )

    def _indices(self, tasks: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """Draw class indices ``[T, N]`` and per-class image indices ``[T, N, K+Q]``."""
        n_cls, per_cls = self.dataset.num_classes, self.dataset.images_per_class
        # argsort of i.i.d. uniforms is a uniform random permutation per row; its first N
        # (resp. K+Q) entries are a uniform draw without replacement, for all tasks at once.
        classes = np.argsort(self._rng.random((tasks, n_cls)), axis=1)[:, : self.ways]
        draws = self._rng.random((tasks, self.ways, per_cls))
        images = np.argsort(draws, axis=2)[:, :, : self.shots + self.queries]
        return classes, images

    def sample(self, tasks: int = 1) -> EpisodeBatch:
        """Draw one meta-batch of ``tasks`` episodes.

        Args:
            tasks: Number of tasks ``T``.

        Returns:
            The batch on ``self.device``: ``xs [T, N*K, C, H, W]``, ``ys [T, N*K]``,
            ``xq [T, N*Q, C, H, W]``, ``yq [T, N*Q]`` (labels int64), ``classes [T, N]``.

        Raises:
            ValueError: If ``tasks`` is not positive.

        Example:
            >>> ds = FewShotDataset(torch.zeros(5, 4, 1, 2, 2, dtype=torch.uint8), tuple("abcde"))
            >>> EpisodeSampler(ds, 3, 1, 1, seed=1).sample(2).ys.tolist()
            [[0, 1, 2], [0, 1, 2]]
        """
        if tasks < 1:
            raise ValueError(f"tasks must be positive, got {tasks}")
        classes_np, images_np = self._indices(tasks)
        classes = torch.from_numpy(classes_np).to(self.device)
        images = torch.from_numpy(images_np).to(self.device)
        # One gather for the whole meta-batch: [T, N, 1] x [T, N, K+Q] -> [T, N, K+Q, C, H, W].
        picked = self.dataset.images[classes[:, :, None], images]
        if picked.dtype == torch.uint8:
            picked = picked.to(self.dtype).div_(255)
        else:
            picked = picked.to(self.dtype)
        shape = self.dataset.image_shape
        n, k, q = self.ways, self.shots, self.queries
        labels = torch.arange(n, dtype=torch.int64, device=self.device)
        return EpisodeBatch(
            xs=picked[:, :, :k].reshape(tasks, n * k, *shape),
            ys=labels.repeat_interleave(k).expand(tasks, n * k).contiguous(),
            xq=picked[:, :, k:].reshape(tasks, n * q, *shape),
            yq=labels.repeat_interleave(q).expand(tasks, n * q).contiguous(),
            classes=classes,
        )

    def batches(self, tasks: int, count: int | None = None) -> Iterator[EpisodeBatch]:
        """Yield ``count`` meta-batches (forever if None).

        Args:
            tasks: Tasks per meta-batch.
            count: Number of meta-batches, or None for an endless stream.

        Yields:
            Successive :meth:`sample` results.

        Example:
            >>> ds = FewShotDataset(torch.zeros(5, 4, 1, 2, 2, dtype=torch.uint8), tuple("abcde"))
            >>> len(list(EpisodeSampler(ds, 2, 1, 1).batches(tasks=3, count=2)))
            2
        """
        produced = 0
        while count is None or produced < count:
            yield self.sample(tasks)
            produced += 1

    def state_dict(self) -> dict[str, Any]:
        """Return the generator state, to resume the exact stream after a restart.

        Returns:
            A picklable dict.

        Example:
            >>> ds = FewShotDataset(torch.zeros(5, 4, 1, 2, 2, dtype=torch.uint8), tuple("abcde"))
            >>> s = EpisodeSampler(ds, 2, 1, 1)
            >>> state = s.state_dict()
            >>> a = s.sample(); s.load_state_dict(state)
            >>> bool((s.sample().classes == a.classes).all())
            True
        """
        return {
            "seed": self.seed,
            "rank": self.rank,
            "bit_generator": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from :meth:`state_dict`.

        Args:
            state: The dict returned by :meth:`state_dict`.

        Raises:
            KeyError: If ``state`` lacks the generator state.

        Example:
            >>> ds = FewShotDataset(torch.zeros(5, 4, 1, 2, 2, dtype=torch.uint8), tuple("abcde"))
            >>> s = EpisodeSampler(ds, 2, 1, 1)
            >>> s.load_state_dict(s.state_dict())
        """
        self._rng.bit_generator.state = state["bit_generator"]
