"""Inner solvers: the registry, the built-in solvers and the torch.optim adapter.

Importing this package registers ``"sgd"``, ``"adam"``, ``"lbfgs"`` and ``"newton_cg"``.
"""

from implicit_meta.solvers.first_order import adam, sgd
from implicit_meta.solvers.newton_cg import newton_cg
from implicit_meta.solvers.registry import (
    InnerSolver,
    Objective,
    get_inner_solver,
    inner_solver,
    list_inner_solvers,
    registered_name,
    unregister_inner_solver,
)
from implicit_meta.solvers.torch_optim import lbfgs, torch_optimizer_solver

__all__ = [
    "InnerSolver",
    "Objective",
    "adam",
    "get_inner_solver",
    "inner_solver",
    "lbfgs",
    "list_inner_solvers",
    "newton_cg",
    "registered_name",
    "sgd",
    "torch_optimizer_solver",
    "unregister_inner_solver",
]
