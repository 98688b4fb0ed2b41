"""implicit-meta: implicit-gradient meta-learning (iMAML) for PyTorch as an optimizer plug-in.

Example:
    >>> import implicit_meta as im
    >>> "newton_cg" in im.list_inner_solvers()
    True
"""

from implicit_meta import functional
from implicit_meta.adaptation import AdaptedModel, adapt
from implicit_meta.functional.adjoint import ImplicitAdjoint
from implicit_meta.functional.cg import CGStatus
from implicit_meta.losses import OutputLoss, output_loss
from implicit_meta.optimizer import ImplicitMetaOptimizer
from implicit_meta.problem import InnerProblem
from implicit_meta.result import MetaBackwardResult
from implicit_meta.solvers import (
    get_inner_solver,
    list_inner_solvers,
    register_inner_solver,
    torch_optimizer_solver,
    unregister_inner_solver,
)

__version__ = "0.1.0"
"""The package's version, as in its distribution metadata."""

__all__ = [
    "AdaptedModel",
    "CGStatus",
    "ImplicitAdjoint",
    "ImplicitMetaOptimizer",
    "InnerProblem",
    "MetaBackwardResult",
    "OutputLoss",
    "__version__",
    "adapt",
    "functional",
    "get_inner_solver",
    "list_inner_solvers",
    "output_loss",
    "register_inner_solver",
    "torch_optimizer_solver",
    "unregister_inner_solver",
]
