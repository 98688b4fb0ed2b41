"""What one call of :meth:`ImplicitMetaOptimizer.meta_backward` reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from implicit_meta.functional.cg import CGStatus


def _not_given() -> Tensor:
    return torch.tensor(float("nan"))


@dataclass(frozen=True)
class MetaBackwardResult:
    """Losses and solver diagnostics of one task, as detached tensors (reading them syncs).

    From :meth:`~ImplicitMetaOptimizer.meta_backward_batch` every tensor has a leading task
    dimension ``[T]``; from :meth:`~ImplicitMetaOptimizer.meta_backward` it is 0-dim.

    Attributes:
        outer_loss: Query loss ``L_out(phi*)`` at the adapted parameters.
        inner_loss: Support loss ``L_in(phi*)`` at the adapted parameters (no proximal term).
        stationarity: ``||grad L_in(phi*) + reg (phi* - theta)||``; the implicit gradient is exact
            only when this is near zero, so watch it when choosing inner steps and inner lr.
        cg_residual: ``||b - A x||`` of the returned meta-gradient ``x``, ``A`` the adjoint's
            system (``I + C/reg`` with damping), ``b = grad L_out(phi*)``; ``0`` for the
            first-order adjoint.
        cg_iterations: CG iterations that updated the solution.
        cg_status: A :class:`~implicit_meta.functional.CGStatus` value as an int64 tensor
            (``FIRST_ORDER`` when no system was solved).
        outer_aux: What the outer loss returned beside the loss, ``loss_fn(module, query) ->
            (loss, aux)``, at the adapted parameters (detached); ``{}`` for a bare loss.
        relative_stationarity: ``stationarity / ||grad L_in(theta)||``, the gradient norm of
            the inner objective ``G(phi) = L_in(phi) + reg/2 ||phi - theta||^2`` at the adapted
            parameters relative to its norm where the solve started (at ``theta`` the proximal
            term's gradient vanishes, so that is ``||grad L_in(theta)||``): ``1`` means the
            inner solver made no progress, ``0.01`` that it removed 99% of the gradient, above
            ``1`` that it diverged. ``0`` when both norms are zero, ``inf`` when only the
            start's is. NaN when the result was built without it.
        relative_cg_residual: ``cg_residual / ||b||``, the relative residual of the linear
            solve (``0`` when ``b = 0`` and for the first-order adjoint): CG's ``cg_tol`` is
            measured on this scale. NaN when the result was built without it.

    Example:
        >>> import torch
        >>> r = MetaBackwardResult(*(torch.tensor(0.0),) * 4, torch.tensor(3), torch.tensor(1))
        >>> r.status
        <CGStatus.MAX_STEPS: 1>
    """

    outer_loss: Tensor
    inner_loss: Tensor
    stationarity: Tensor
    cg_residual: Tensor
    cg_iterations: Tensor
    cg_status: Tensor
    outer_aux: Any = field(default_factory=dict)
    relative_stationarity: Tensor = field(default_factory=_not_given)
    relative_cg_residual: Tensor = field(default_factory=_not_given)

    def __post_init__(self) -> None:
        # A result built by hand without the relative diagnostics gets NaN of the right shape.
        for name in ("relative_stationarity", "relative_cg_residual"):
            value = getattr(self, name)
            if value.shape != self.stationarity.shape and value.dim() == 0:
                object.__setattr__(self, name, value.expand(self.stationarity.shape).clone())

    @property
    def status(self) -> CGStatus | list[CGStatus]:
        """CG status as the enum (a list of them for batched results)."""
        if self.cg_status.dim() == 0:
            return CGStatus(int(self.cg_status))
        return [CGStatus(int(s)) for s in self.cg_status.flatten().tolist()]

    def status_share(self) -> dict[str, Tensor]:
        """The share of tasks that ended in each CG status, as 0-dim tensors (no host sync).

        Returns:
            Every :class:`~implicit_meta.functional.CGStatus` name mapped to the fraction of
            tasks with that status (``0.0`` to ``1.0``, summing to 1), including those no task
            has, so that logs keep the same keys at every step.

        Example:
            >>> import torch
            >>> r = MetaBackwardResult(*(torch.zeros(4),) * 5, torch.tensor([0, 0, 0, 2]))
            >>> {k: float(v) for k, v in r.status_share().items() if v > 0}
            {'CONVERGED': 0.75, 'NONPOSITIVE_CURVATURE': 0.25}
        """
        codes = self.cg_status.reshape(-1)
        return {s.name: (codes == int(s)).to(torch.float32).mean() for s in CGStatus}

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain Python numbers for logging, read with one host sync; batched values averaged.

        Returns:
            The tensor attributes by name, task-averaged (``cg_iterations``: the maximum),
            ``relative_stationarity`` and ``relative_cg_residual`` averaged too;
            ``cg_status`` as its name (the sorted names joined by commas when tasks differ);
            ``status_share.<NAME>`` for every :class:`~implicit_meta.functional.CGStatus`, the
            share of tasks that ended in it (see :meth:`status_share`). A dict ``outer_aux``
            contributes its entries (averaged) under their own names, prefixed ``aux.`` where a
            name is taken; other forms of ``outer_aux`` are left out.

        Example:
            >>> import torch
            >>> r = MetaBackwardResult(*(torch.tensor(0.5),) * 4, torch.tensor(2), torch.tensor(0))
            >>> values = r.to_dict()
            >>> values["cg_status"], values["status_share.CONVERGED"]
            ('CONVERGED', 1.0)
        """
        means = {
            "outer_loss": self.outer_loss,
            "inner_loss": self.inner_loss,
            "stationarity": self.stationarity,
            "relative_stationarity": self.relative_stationarity,
            "cg_residual": self.cg_residual,
            "relative_cg_residual": self.relative_cg_residual,
        }
        means.update({f"status_share.{k}": v for k, v in self.status_share().items()})
        taken = {*means, "cg_iterations", "cg_status"}
        if isinstance(self.outer_aux, dict):
            for key, value in self.outer_aux.items():
                if isinstance(value, Tensor):
                    means[f"aux.{key}" if key in taken else str(key)] = value
        device = self.cg_status.device
        numbers = [v.detach().to(device=device, dtype=torch.float32).mean() for v in means.values()]
        codes = self.cg_status.reshape(-1).to(torch.float32)
        iterations = self.cg_iterations.max().to(device=device, dtype=torch.float32)
        # One transfer for every number: averages, the iteration maximum, the per-task codes.
        flat = torch.cat([torch.stack([*numbers, iterations]), codes]).tolist()
        names = sorted({CGStatus(int(c)).name for c in flat[len(numbers) + 1 :]})
        values: dict[str, float | int | str] = dict(zip(means, flat[: len(numbers)], strict=True))
        values["cg_iterations"] = int(flat[len(numbers)])
        values["cg_status"] = ",".join(names)
        return values
