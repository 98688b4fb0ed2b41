"""What one call of :meth:`ImplicitMetaOptimizer.meta_backward` reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from implicit_meta.functional.cg import CGStatus


@dataclass(frozen=True)
class MetaBackwardResult:
    """Losses and solver diagnostics of one task, as detached tensors (reading them syncs).

    Attributes:
        outer_loss: Query loss ``L_out(phi*)`` at the adapted parameters.
        inner_loss: Support loss ``L_in(phi*)`` at the adapted parameters (no proximal term).
        stationarity: ``||grad L_in(phi*) + reg (phi* - theta)||``; the implicit gradient is exact
            only when this is near zero, so watch it when choosing inner steps and inner lr.
        cg_residual: ``||b - A x||`` of the returned meta-gradient ``x``, ``A`` the adjoint's
            system (``I + C/reg`` with damping); ``0`` for the first-order adjoint.
        cg_iterations: CG iterations that updated the solution.
        cg_status: A :class:`~implicit_meta.functional.CGStatus` value as an int64 tensor
            (``FIRST_ORDER`` when no system was solved).
        outer_aux: What the outer loss returned beside the loss, ``loss_fn(module, query) ->
            (loss, aux)``, at the adapted parameters (detached); ``{}`` for a bare loss.

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

    @property
    def status(self) -> CGStatus | list[CGStatus]:
        """CG status as the enum (a list of them for batched results)."""
        if self.cg_status.dim() == 0:
            return CGStatus(int(self.cg_status))
        return [CGStatus(int(s)) for s in self.cg_status.flatten().tolist()]

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain Python numbers for logging; batched values are averaged.

        Returns:
            The attributes but ``outer_aux`` by name, the status as its name; a dict
            ``outer_aux`` contributes its entries (averaged) under their own names, prefixed
            ``aux.`` where a name is taken, and other forms of ``outer_aux`` are left out.

        Example:
            >>> import torch
            >>> r = MetaBackwardResult(*(torch.tensor(0.5),) * 4, torch.tensor(2), torch.tensor(0))
            >>> r.to_dict()["cg_status"]
            'CONVERGED'
        """
        status = self.status
        names = [s.name for s in status] if isinstance(status, list) else [status.name]
        values: dict[str, float | int | str] = {
            "outer_loss": float(self.outer_loss.float().mean()),
            "inner_loss": float(self.inner_loss.float().mean()),
            "stationarity": float(self.stationarity.float().mean()),
            "cg_residual": float(self.cg_residual.float().mean()),
            "cg_iterations": int(self.cg_iterations.max()),
            "cg_status": names[0] if len(set(names)) == 1 else ",".join(sorted(set(names))),
        }
        if isinstance(self.outer_aux, dict):
            for key, value in self.outer_aux.items():
                if isinstance(value, Tensor):
                    name = f"aux.{key}" if key in values else str(key)
                    values[name] = float(value.float().mean())
        return values
