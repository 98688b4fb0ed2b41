"""The functional layer: curvature products, conjugate gradient, the adjoint, meta-gradients.

Everything here works on parameter dicts (name -> tensor) and plain functions of them, needs no
``nn.Module`` and no :class:`~implicit_meta.ImplicitMetaOptimizer`, and makes no host sync, so
it composes with ``torch.func.vmap``.
"""

from implicit_meta.functional.adjoint import AdjointSolve, ImplicitAdjoint, solve_adjoint
from implicit_meta.functional.cg import CGResult, CGStatus, conjugate_gradient
from implicit_meta.functional.curvature import (
    CURVATURES,
    ComposedLoss,
    CurvatureFn,
    curvature_products,
    gauss_newton_products,
    resolve_curvature,
)
from implicit_meta.functional.hvp import (
    HVP_MODES,
    HVPMode,
    hvp,
    make_hvp,
    resolve_hvp_mode,
    value_grad_and_hvp,
)
from implicit_meta.functional.implicit import (
    TaskGradient,
    implicit_meta_gradient,
    proximal_objective,
    solve_inner,
    task_meta_gradient,
)
from implicit_meta.functional.partial import partial_task_meta_gradient
from implicit_meta.functional.tree import Params

__all__ = [
    "CURVATURES",
    "HVP_MODES",
    "AdjointSolve",
    "CGResult",
    "CGStatus",
    "ComposedLoss",
    "CurvatureFn",
    "HVPMode",
    "ImplicitAdjoint",
    "Params",
    "TaskGradient",
    "conjugate_gradient",
    "curvature_products",
    "gauss_newton_products",
    "hvp",
    "implicit_meta_gradient",
    "make_hvp",
    "partial_task_meta_gradient",
    "proximal_objective",
    "resolve_curvature",
    "resolve_hvp_mode",
    "solve_adjoint",
    "solve_inner",
    "task_meta_gradient",
    "value_grad_and_hvp",
]
