"""Inner solvers: the registry, the built-in solvers and the torch.optim adapter.

Importing this package registers ``"sgd"``, ``"adam"`` (``first_order.py``), ``"lbfgs"``
(``lbfgs.py``), ``"newton_cg"`` (``newton_cg.py``) and ``"newton"`` (``newton.py``, dense, for
heads); ``registry.py`` records them and what they
can do, ``torch_optim.py`` adapts any ``torch.optim`` optimizer, and ``resolve.py`` turns the
meta-optimizer's ``inner=`` into a solver.
"""

from implicit_meta.solvers.first_order import adam, sgd
from implicit_meta.solvers.lbfgs import lbfgs
from implicit_meta.solvers.newton import newton
from implicit_meta.solvers.newton_cg import newton_cg
from implicit_meta.solvers.registry import (
    InnerSolver,
    Objective,
    declare_solver,
    get_inner_solver,
    list_inner_solvers,
    register_inner_solver,
    registered_name,
    unregister_inner_solver,
    vmap_unsupported_reason,
)
from implicit_meta.solvers.torch_optim import torch_optimizer_solver

__all__ = [
    "InnerSolver",
    "Objective",
    "adam",
    "declare_solver",
    "get_inner_solver",
    "lbfgs",
    "list_inner_solvers",
    "newton",
    "newton_cg",
    "register_inner_solver",
    "registered_name",
    "sgd",
    "torch_optimizer_solver",
    "unregister_inner_solver",
    "vmap_unsupported_reason",
]
