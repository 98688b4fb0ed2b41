"""Meta-gradient error against a converged reference as CG steps grow, ours against torchopt.

    python benchmarks/cg_accuracy.py [--device cpu|cuda] [--steps 1 2 3 5 8 12 20]
                                     [--out benchmarks/results]

A real task: a 20-way 1-shot episode of the embedded Omniglot (background alphabets), Conv4 with
BatchNorm in float64, adapted by 25 SGD steps (lr 0.1, reg 2). The right-hand side is the query
gradient at the adapted parameters; the reference solves ``(I + H/reg) x = b`` with SciPy's
MINRES (A is symmetric but, with BatchNorm, not always positive definite, which plain CG needs;
MINRES only needs symmetry), and its relative residual is printed alongside.
Compared, for each number of CG steps: this project's ``conjugate_gradient`` (plain CG with the
non-positive-curvature stop), torchopt's ``solve_cg`` and torchopt's ``solve_normal_cg``. Prints
one JSON object per line and writes ``cg_accuracy_<device>.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as `python benchmarks/<script>.py` from anywhere: make the repository importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torchopt
from scipy.sparse.linalg import LinearOperator, minres

from benchmarks import _setting as S
from implicit_meta.data import EpisodeSampler, load_omniglot
from implicit_meta.functional import CGStatus, conjugate_gradient, make_hvp
from implicit_meta.functional._tree import tree_axpy, tree_norm, tree_sub
from implicit_meta.functional.implicit import proximal_objective
from implicit_meta.solvers import sgd

ROOT = Path(__file__).resolve().parent.parent


def flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in tree.values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 3, 5, 8, 12, 20])
    parser.add_argument("--reference-steps", type=int, default=600)
    parser.add_argument("--reg", type=float, default=S.REG)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    device = torch.device(args.device)

    splits = load_omniglot(protocol="lake", rotations=False)
    sampler = EpisodeSampler(
        splits.train, S.WAYS, S.SHOTS, S.QUERIES, seed=0, device=device, dtype=torch.float64
    )
    episode = sampler.sample(1)
    model = S.make_model(device).double()
    support = (episode.xs[0], episode.ys[0])
    query = (episode.xq[0], episode.yq[0])
    inner = S.functional_loss(model, support)
    outer = S.functional_loss(model, query)
    theta = {k: v.detach() for k, v in model.named_parameters()}
    phi = sgd(proximal_objective(inner, theta, args.reg), dict(theta), steps=25, lr=S.INNER_LR)
    b = dict(torch.func.grad(outer)(phi))
    _, hvp_fn = make_hvp(inner, phi)

    def matvec(v: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tree_axpy(1.0 / args.reg, hvp_fn(v), v)

    # Reference: MINRES (SciPy), which needs A symmetric but not positive definite.
    names_ref = list(b)
    shapes = [b[k].shape for k in names_ref]
    sizes = [b[k].numel() for k in names_ref]

    def unflat(x: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(x, sizes)
        return {k: p.view(sh) for k, p, sh in zip(names_ref, parts, shapes, strict=True)}

    def np_matvec(x: np.ndarray) -> np.ndarray:
        v = unflat(torch.from_numpy(np.ascontiguousarray(x)).to(device, torch.float64))
        return flat(matvec(v)).cpu().numpy()

    size = sum(sizes)
    operator = LinearOperator((size, size), matvec=np_matvec, dtype=np.float64)
    solution, _ = minres(operator, flat(b).cpu().numpy(), rtol=1e-12, maxiter=args.reference_steps)
    reference = unflat(torch.from_numpy(solution).to(device))
    ref_residual = float(tree_norm(tree_sub(matvec(reference), b)) / tree_norm(b))
    print(json.dumps({"reference_relative_residual": ref_residual}), flush=True)
    ref = flat(reference)

    def rel(x: dict[str, torch.Tensor]) -> float:
        return float((flat(x) - ref).norm() / ref.norm())

    # torchopt's solvers take tuples of tensors and differentiate matvec for A^T (normal CG).
    names = list(b)

    def tuple_matvec(v: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        out = matvec(dict(zip(names, v, strict=True)))
        return tuple(out[k] for k in names)

    b_tuple = tuple(b[k] for k in names)
    rows = []
    for steps in args.steps:
        ours = conjugate_gradient(matvec, b, max_steps=steps, tol=0.0)
        row: dict[str, object] = {
            "cg_steps": steps,
            "ours": rel(ours.solution),
            "ours_status": CGStatus(int(ours.status)).name,
            "torchopt_solve_cg": rel(
                dict(
                    zip(
                        names,
                        torchopt.linear_solve.solve_cg(maxiter=steps, rtol=0.0)(
                            tuple_matvec, b_tuple
                        ),
                        strict=True,
                    )
                )
            ),
        }
        try:
            normal = torchopt.linear_solve.solve_normal_cg(maxiter=steps, rtol=0.0)(
                tuple_matvec, b_tuple
            )
            row["torchopt_solve_normal_cg"] = rel(dict(zip(names, normal, strict=True)))
        except Exception as error:
            row["torchopt_solve_normal_cg"] = f"error: {type(error).__name__}: {error}"[:200]
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "reference_relative_residual": ref_residual,
        "rows": rows,
        "setting": "20-way 1-shot Omniglot (lake background), Conv4-64 float64, 25 SGD steps",
    }
    (args.out / f"cg_accuracy_{device.type}_reg{args.reg:g}.json").write_text(
        json.dumps(result, indent=1)
    )


if __name__ == "__main__":
    main()
