"""A meta-batch of few-shot episodes as batched tensors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["EpisodeBatch"]

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
