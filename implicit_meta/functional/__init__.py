"""The functional layer: Hessian-vector products, conjugate gradient, implicit meta-gradients.

Everything here works on parameter dicts (name -> tensor) and plain functions of them, needs no
``nn.Module`` and no :class:`~implicit_meta.ImplicitMetaOptimizer`, and makes no host sync, so
it composes with ``torch.func.vmap``.
"""

from implicit_meta.functional._tree import Params
from implicit_meta.functional.cg import CGResult, CGStatus, conjugate_gradient
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

__all__ = [
    "HVP_MODES",
    "CGResult",
    "CGStatus",
    "HVPMode",
    "Params",
    "TaskGradient",
    "conjugate_gradient",
    "hvp",
    "implicit_meta_gradient",
    "make_hvp",
    "proximal_objective",
    "resolve_hvp_mode",
    "solve_inner",
    "task_meta_gradient",
    "value_grad_and_hvp",
]
