"""``ImplicitAdjoint``: everything about the linear solve behind the implicit meta-gradient.

For a task, the meta-gradient is ``x = A^-1 grad L_out(phi*)`` with

    A = I + (s * C + delta * I) / reg,

``C`` the curvature of the inner loss at ``phi*`` (the Hessian, the Gauss-Newton matrix or a
user's product), ``s`` a curvature scale (1 unless reproducing another code's system),
``delta >= 0`` a damping and ``reg`` the proximal strength of the inner problem. ``C = H``,
``s = 1``, ``delta = 0`` is the exact implicit gradient of iMAML at a stationary inner solution;
``cg_steps = 0`` is the first-order approximation ``A = I``.

The object is frozen and validated at construction, like a lineax solver: a meta-optimizer
holds one, and its settings round-trip through :meth:`ImplicitAdjoint.to_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from implicit_meta.functional._checks import check_int, check_real
from implicit_meta.functional.cg import CGResult, CGStatus, conjugate_gradient
from implicit_meta.functional.curvature import (
    CURVATURES,
    CurvatureFn,
    curvature_products,
    resolve_curvature,
)
from implicit_meta.functional.grad import grad_and_value
from implicit_meta.functional.hvp import ScalarFn, resolve_hvp_mode
from implicit_meta.functional.tree import Params, tree_axpy, tree_norm, tree_scale, tree_sub

_UNSET: Any = None

DEFAULT_REG = 1.0
"""``reg`` of an adjoint, and of a whole-model inner problem, when none is given.

A meta-optimizer sets its adjoint's ``reg`` to that of its inner problem (see
:data:`~implicit_meta.problem.WHOLE_MODEL_DEFAULTS`); an adjoint built without ``reg`` leaves it
to the problem, one built with ``reg`` states it.
"""

IMPLICIT_CG_STEPS = 5
"""CG steps an adjoint takes when a system is chosen but ``cg_steps`` is not."""

SYSTEM_FIELDS = ("curvature", "damping", "curvature_scale")
"""The fields that name the linear system: naming one turns the solve on, and they are refused
beside ``cg_steps=0``. ``cg_tol`` and ``hvp`` say how a system is solved, not which: they never
turn the solve on, and with ``cg_steps=0`` they are accepted and have no effect."""

_CURVATURE_SYMBOLS = {"hessian": "H", "gauss_newton": "G"}


@dataclass(frozen=True)
class ImplicitAdjoint:
    """How the implicit meta-gradient's linear system is built and solved.

    Attributes:
        reg: Proximal regularisation strength ``lambda > 0``: the inner problem is
            ``argmin L_in(phi) + reg/2 ||phi - theta||^2``, and the system is scaled by it.
            Not given, it is :data:`DEFAULT_REG`, and a meta-optimizer sets it to its inner
            problem's ``reg``.
        curvature: ``"auto"`` (Gauss-Newton when the inner loss is stated with
            :func:`~implicit_meta.output_loss`, the Hessian otherwise), ``"hessian"``,
            ``"gauss_newton"``, or a :class:`~implicit_meta.functional.CurvatureFn`.
        damping: ``delta >= 0`` added to the curvature's diagonal (Levenberg-Marquardt).
        curvature_scale: ``s > 0`` multiplying the curvature; the official iMAML code's
            ``H / (lam + lam_damping)`` is ``s = lam / (lam + lam_damping)`` (see
            :meth:`official_imaml`).
        cg_steps: Conjugate-gradient iterations; ``0`` is the first-order meta-gradient
            ``grad L_out(phi*)`` (no curvature products at all). ``None`` (the default)
            resolves at construction: to ``0`` unless a curvature, damping or curvature scale
            names a system, then to ``5`` (``ImplicitAdjoint(curvature="gauss_newton")`` is
            Gauss-Newton CG 5). The first-order default is the one the adjoint study on the
            Benchmarks page found never below the implicit systems beyond the noise on ReLU
            networks; ``cg_steps=0`` together with a curvature, damping or scale is refused,
            since they would have no effect.
        cg_tol: CG's relative residual tolerance. How the system is solved, not which: it
            does not turn the solve on, and has no effect on the first-order meta-gradient.
        hvp: Hessian-vector product strategy for ``curvature="hessian"`` (see
            :func:`~implicit_meta.functional.make_hvp`). Like ``cg_tol``, it never turns the
            solve on, and has no effect on the first-order meta-gradient.

    Raises:
        ValueError: If a value is out of range or a name is unknown.
        TypeError: If a value has the wrong type.

    Example:
        >>> adjoint = ImplicitAdjoint(reg=2.0, curvature="gauss_newton", cg_steps=10)
        >>> ImplicitAdjoint.from_dict(adjoint.to_dict()) == adjoint
        True
        >>> ImplicitAdjoint().first_order
        True
        >>> ImplicitAdjoint(curvature="gauss_newton").cg_steps
        5
        >>> ImplicitAdjoint(hvp="forward_over_reverse").first_order  # how, not what
        True
    """

    reg: float = _UNSET
    curvature: str | CurvatureFn = "auto"
    damping: float = 0.0
    curvature_scale: float = 1.0
    cg_steps: int | None = None
    cg_tol: float = 1e-10
    hvp: str = "auto"

    def __post_init__(self) -> None:
        """Validate every field (and store numbers as plain ``float``/``int``)."""
        # Remembered like cg_steps: a reg that was not given is the inner problem's to set.
        object.__setattr__(self, "_reg_derived", self.reg is None)
        reg = DEFAULT_REG if self.reg is None else self.reg
        object.__setattr__(self, "reg", check_real(reg, "reg", positive=True))
        object.__setattr__(self, "damping", check_real(self.damping, "damping", positive=False))
        scale = check_real(self.curvature_scale, "curvature_scale", positive=True)
        object.__setattr__(self, "curvature_scale", scale)
        object.__setattr__(self, "cg_tol", check_real(self.cg_tol, "cg_tol", positive=False))
        if isinstance(self.curvature, str):
            if self.curvature not in CURVATURES:
                raise ValueError(
                    f"unknown curvature {self.curvature!r}; expected one of "
                    f"{', '.join(CURVATURES)} or a function (inner_loss, phi) -> (v -> C v)"
                )
        elif not callable(self.curvature):
            raise TypeError(
                "curvature must be a name or a function (inner_loss, phi) -> (v -> C v), "
                f"got {type(self.curvature).__name__}"
            )
        if not isinstance(self.hvp, str):
            raise TypeError(f"hvp must be a string, got {self.hvp!r}")
        resolve_hvp_mode(self.hvp)  # raises ValueError naming the known modes
        # Remembered so that replace() resolves cg_steps again rather than keep a derived 0.
        object.__setattr__(self, "_cg_steps_derived", self.cg_steps is None)
        object.__setattr__(self, "cg_steps", self._resolved_cg_steps())

    def _resolved_cg_steps(self) -> int:
        """``cg_steps`` as an int: ``None`` becomes 0 or 5; 0 beside a set system is refused."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        chosen = [name for name in SYSTEM_FIELDS if getattr(self, name) != defaults[name]]
        if self.cg_steps is None:
            return IMPLICIT_CG_STEPS if chosen else 0
        steps = check_int(self.cg_steps, "cg_steps", 0)
        if steps == 0 and chosen:
            raise ValueError(
                f"{', '.join(chosen)} given with cg_steps=0, the first-order meta-gradient, "
                "which solves no system: give cg_steps >= 1 (for example 5) for the implicit "
                "meta-gradient, or leave them at their defaults"
            )
        return steps

    @property
    def first_order(self) -> bool:
        """Whether this is the first-order meta-gradient (``cg_steps == 0``)."""
        return not self.cg_steps

    @classmethod
    def official_imaml(
        cls,
        reg: float = 2.0,
        *,
        lam_damping: float = 10.0,
        regu_coef: float = 1.0,
        cg_steps: int = 5,
    ) -> ImplicitAdjoint:
        """The official iMAML code's system, ``(1 + regu_coef) v + H v / (reg + lam_damping)``.

        That code's ``matrix_evaluator`` solves this system with plain CG from zero, where
        ``reg`` is its ``lam``; at its Omniglot settings (``lam = 2``, ``lam_damping = 10``,
        ``regu_coef = 1``) it is ``2 (I + H/24)``. It equals ``I + (s H + delta I)/reg`` with
        ``delta = regu_coef * reg`` and ``s = reg / (reg + lam_damping)``, exactly.

        Args:
            reg: The proximal strength ``lam``.
            lam_damping: The code's ``lam_damping``.
            regu_coef: The code's ``regu_coef``.
            cg_steps: CG iterations.

        Returns:
            The adjoint, with the Hessian as curvature.

        Example:
            >>> adjoint = ImplicitAdjoint.official_imaml(2.0)
            >>> adjoint.damping, adjoint.curvature_scale
            (2.0, 0.16666666666666666)
        """
        return cls(
            reg=reg,
            curvature="hessian",
            damping=regu_coef * reg,
            curvature_scale=reg / (reg + lam_damping),
            cg_steps=cg_steps,
        )

    def replace(self, **changes: Any) -> ImplicitAdjoint:
        """A copy with some fields changed (validated again).

        A ``cg_steps`` that was derived (not given) is derived again for the copy, so
        ``ImplicitAdjoint().replace(curvature="hessian")`` takes 5 CG steps.

        Args:
            **changes: Field names to new values.

        Returns:
            The new adjoint.

        Example:
            >>> ImplicitAdjoint(reg=2.0, curvature="hessian").replace(cg_steps=10).describe()
            'I + H/2, CG 10'
        """
        if "reg" not in changes and getattr(self, "_reg_derived", False):
            changes["reg"] = None
        if "cg_steps" not in changes and getattr(self, "_cg_steps_derived", False):
            changes["cg_steps"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain Python values (a custom curvature function becomes ``None``).

        Returns:
            One entry per field.

        Example:
            >>> ImplicitAdjoint().to_dict()["cg_steps"]
            0
        """
        values = dataclasses.asdict(self)
        if not isinstance(self.curvature, str):
            values["curvature"] = None
        return values

    @classmethod
    def from_dict(
        cls, values: Mapping[str, Any], *, curvature: str | CurvatureFn | None = None
    ) -> ImplicitAdjoint:
        """Rebuild an adjoint from :meth:`to_dict` output.

        Args:
            values: Field names to values; missing fields take their defaults.
            curvature: The curvature to use where ``values`` stores ``None`` (a custom
                function, which cannot be stored).

        Returns:
            The validated adjoint.

        Raises:
            ValueError: For an unknown field, an invalid value, or a stored custom curvature
                without ``curvature``.

        Example:
            >>> ImplicitAdjoint.from_dict({"reg": 1.0}).reg
            1.0
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown adjoint settings: {sorted(unknown)}")
        fields = dict(values)
        if "curvature" in fields and fields["curvature"] is None:
            if curvature is None:
                raise ValueError(
                    "these settings were saved with a custom curvature function, which cannot be "
                    "stored: pass it again"
                )
            fields["curvature"] = curvature
        return cls(**fields)

    def describe(self) -> str:
        """The system in words, for logs.

        ``H`` is the Hessian, ``G`` the Gauss-Newton matrix and ``C`` a custom curvature
        function. ``"auto"`` is resolved only where the inner loss is known, so its ``C`` is
        said to be one or the other; a meta-optimizer's messages name the one it used.

        Returns:
            For example ``"I + (H + 1 I)/2, CG 5"`` or ``"first-order"``.

        Example:
            >>> ImplicitAdjoint(reg=2.0, curvature="gauss_newton").describe()
            'I + G/2, CG 5'
            >>> ImplicitAdjoint(reg=2.0, cg_steps=5).describe()
            'I + C/2, CG 5, C the Gauss-Newton matrix for an output_loss, else the Hessian'
        """
        if self.first_order:
            return "first-order"
        name = self.curvature if isinstance(self.curvature, str) else ""
        symbol = _CURVATURE_SYMBOLS.get(name, "C")
        term = symbol if self.curvature_scale == 1.0 else f"{self.curvature_scale:g} {symbol}"
        if self.damping:
            term = f"({term} + {self.damping:g} I)"
        text = f"I + {term}/{self.reg:g}, CG {self.cg_steps}"
        if name == "auto":
            text += ", C the Gauss-Newton matrix for an output_loss, else the Hessian"
        elif not name:
            text += ", C the custom curvature"
        return text


class AdjointSolve(NamedTuple):
    """The adjoint solve of one task.

    Attributes:
        inner_loss: ``L_in(phi)`` (detached).
        inner_grad: ``grad L_in(phi)`` (detached).
        cg: The solve: ``solution`` is the meta-gradient; for the first-order adjoint it is the
            right-hand side with status :attr:`CGStatus.FIRST_ORDER` and no iterations.
    """

    inner_loss: Tensor
    inner_grad: Params
    cg: CGResult


def solve_adjoint(
    adjoint: ImplicitAdjoint, inner_loss: ScalarFn, phi: Params, outer_grad: Params
) -> AdjointSolve:
    """Solve ``A x = outer_grad`` at ``phi`` for the system ``adjoint`` describes.

    Args:
        adjoint: The system and its solver.
        inner_loss: ``L_in`` (a :class:`~implicit_meta.functional.ComposedLoss` for Gauss-Newton).
        phi: The adapted parameters.
        outer_grad: ``grad L_out(phi)``.

    Returns:
        The inner loss and gradient at ``phi`` (from the products' own forward pass) and the
        CG result.

    Raises:
        ValueError: If the curvature does not fit the loss (see
            :func:`~implicit_meta.functional.resolve_curvature`).

    Example:
        >>> import torch
        >>> L = lambda p: 0.5 * (3.0 * p["w"] ** 2).sum()  # H = 3 I
        >>> out = solve_adjoint(ImplicitAdjoint(reg=1.0, curvature="hessian", damping=1.0),
        ...                     L, {"w": torch.zeros(2)}, {"w": torch.ones(2)})
        >>> out.cg.solution["w"]  # 1 / (1 + (3 + 1)/1)
        tensor([0.2000, 0.2000])
    """
    steps = adjoint.cg_steps
    if not steps:
        gradient, value = grad_and_value(inner_loss, phi)
        reference = next(iter(outer_grad.values()))
        zero = torch.zeros((), dtype=reference.dtype, device=reference.device)
        cg = CGResult(
            solution=dict(outer_grad),
            residual_norm=zero,
            iterations=torch.zeros((), dtype=torch.int64, device=reference.device),
            status=torch.full(
                (), int(CGStatus.FIRST_ORDER), dtype=torch.int64, device=reference.device
            ),
        )
        return AdjointSolve(value, gradient, cg)
    curvature = resolve_curvature(adjoint.curvature, inner_loss)
    value, gradient, product = curvature_products(curvature, inner_loss, phi, hvp_mode=adjoint.hvp)
    identity = 1.0 + adjoint.damping / adjoint.reg
    weight = adjoint.curvature_scale / adjoint.reg

    def matvec(v: Params) -> Params:
        return tree_axpy(weight, product(v), tree_scale(identity, v))

    cg = conjugate_gradient(matvec, dict(outer_grad), max_steps=steps, tol=adjoint.cg_tol)
    return AdjointSolve(value, gradient, cg)


def stationarity(inner_grad: Params, phi: Params, theta: Params, reg: float) -> Tensor:
    """``||grad L_in(phi) + reg (phi - theta)||``, zero at the exact inner optimum.

    Args:
        inner_grad: ``grad L_in(phi)``.
        phi: The adapted parameters.
        theta: The meta-parameters.
        reg: The proximal strength.

    Returns:
        A detached 0-dim tensor.

    Example:
        >>> import torch
        >>> stationarity({"w": torch.ones(2)}, {"w": torch.zeros(2)}, {"w": torch.ones(2)}, 1.0)
        tensor(0.)
    """
    return tree_norm(tree_axpy(reg, tree_sub(phi, theta), inner_grad)).detach()
