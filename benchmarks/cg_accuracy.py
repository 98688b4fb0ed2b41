"""Meta-gradient error against a converged reference as CG steps grow, ours against torchopt.

    python benchmarks/cg_accuracy.py [--device cpu|cuda] [--steps 1 2 3 5 8 12 20]
                                     [--reg 2] [--checkpoint RUN_DIR_OR_PT] [--threads N]
                                     [--out benchmarks/results]

A real task: a 20-way 1-shot episode of the embedded Omniglot (background alphabets), Conv4 with
BatchNorm in float64, adapted by 25 SGD steps (lr 0.1, reg 2). The Conv4 is randomly initialised
(seed 0), or, with ``--checkpoint``, the meta-parameters and BatchNorm buffers of a run written
by ``implicit-meta train`` (a 20-way ``conv4`` run), cast to float64. The right-hand side is the
query gradient at the adapted parameters; the reference solves ``(I + H/reg) x = b`` with SciPy's
MINRES (A is symmetric but, with BatchNorm, not always positive definite, which plain CG needs;
MINRES only needs symmetry), and its relative residual is printed alongside.
Compared, for each number of CG steps: this project's ``conjugate_gradient`` (plain CG with the
non-positive-curvature stop), torchopt's ``solve_cg`` and torchopt's ``solve_normal_cg``. Prints
one JSON object per line and writes ``cg_accuracy_<device>_reg<reg>.json``, or
``cg_accuracy_<device>_trained_reg<reg>.json`` with ``--checkpoint``.

``solve_normal_cg`` differentiates the matvec (``torch.func.vjp``) to get ``A^T``, so it is given
a matvec built from ``torch.func`` (forward-over-reverse HVP). The project's default HVP is plain
autograd, which ``torch.func.vjp`` cannot see through: ``A^T`` then silently comes out as the
identity and normal CG degenerates into plain CG. The script checks ``A^T b == A b`` (A is
symmetric) before using it.
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
from scipy.sparse.linalg import LinearOperator, minres  # type: ignore[import-untyped]

from benchmarks import _setting as S
from implicit_meta.data import EpisodeSampler, load_omniglot
from implicit_meta.functional import CGStatus, conjugate_gradient, make_hvp
from implicit_meta.functional.implicit import proximal_objective
from implicit_meta.functional.tree import tree_axpy, tree_norm, tree_sub
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
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="run folder or checkpoint.pt of `implicit-meta train` (default: random init)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    splits = load_omniglot(protocol="lake", rotations=False)
    sampler = EpisodeSampler(
        splits.train, S.WAYS, S.SHOTS, S.QUERIES, seed=0, device=device, dtype=torch.float64
    )
    episode = sampler.sample(1)
    if args.checkpoint is None:
        model = S.make_model(device).double()
        network = "randomly initialised (seed 0)"
    else:
        from implicit_meta.fewshot import load_meta_model

        path = args.checkpoint
        if path.is_dir():
            path = path / "checkpoint.pt"
        model, config = load_meta_model(path, device)
        if config.ways != S.WAYS or not config.backbone.startswith("conv4"):
            raise SystemExit(f"{path}: need a {S.WAYS}-way conv4 run, got {config.to_dict()}")
        model = model.double()  # meta-parameters and BatchNorm buffers
        network = f"meta-trained ({path}: {json.dumps(config.to_dict())})"
    print(json.dumps({"network": network}), flush=True)
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
    iterations = [0]

    def count(_: np.ndarray) -> None:
        iterations[0] += 1

    solution, _ = minres(
        operator,
        flat(b).cpu().numpy(),
        rtol=1e-12,
        maxiter=args.reference_steps,
        callback=count,
    )
    reference = unflat(torch.from_numpy(solution).to(device))
    ref_residual = float(tree_norm(tree_sub(matvec(reference), b)) / tree_norm(b))
    reference_info = {
        "reference_relative_residual": ref_residual,
        "reference_iterations": iterations[0],
    }
    print(json.dumps(reference_info), flush=True)
    ref = flat(reference)

    def rel(x: dict[str, torch.Tensor]) -> float:
        return float((flat(x) - ref).norm() / ref.norm())

    # torchopt's solvers take tuples of tensors. solve_normal_cg differentiates the matvec with
    # torch.func.vjp for A^T; the autograd HVP above is opaque to it (A^T would come out as I and
    # normal CG would be plain CG), so normal CG gets a torch.func (forward-over-reverse) HVP.
    names = list(b)
    grad_inner = torch.func.grad(inner)

    def tuple_matvec(v: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        out = matvec(dict(zip(names, v, strict=True)))
        return tuple(out[k] for k in names)

    def func_matvec(v: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        vector = dict(zip(names, v, strict=True))
        _, hv = torch.func.jvp(grad_inner, (phi,), (vector,))  # type: ignore[misc]
        return tuple(vector[k] + hv[k] / args.reg for k in names)

    b_tuple = tuple(b[k] for k in names)
    _, rmatvec = torch.func.vjp(func_matvec, b_tuple)  # type: ignore[misc]
    a_b = torch.cat([t.reshape(-1) for t in tuple_matvec(b_tuple)])
    at_b = torch.cat([t.reshape(-1) for t in rmatvec(b_tuple)[0]])
    symmetry = float((at_b - a_b).norm() / a_b.norm())
    print(json.dumps({"normal_cg_transpose_check": symmetry}), flush=True)
    if symmetry > 1e-6:
        raise SystemExit(f"A^T b != A b (relative difference {symmetry:.2e}): the vjp is wrong")
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
                func_matvec, b_tuple
            )
            row["torchopt_solve_normal_cg"] = rel(dict(zip(names, normal, strict=True)))
        except Exception as error:
            row["torchopt_solve_normal_cg"] = f"error: {type(error).__name__}: {error}"[:200]
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "network": network,
        "normal_cg_transpose_check": symmetry,
        **reference_info,
        "reference_steps": args.reference_steps,
        "rows": rows,
        "setting": "20-way 1-shot Omniglot (lake background), Conv4-64 float64, 25 SGD steps",
    }
    tag = "" if args.checkpoint is None else "trained_"
    (args.out / f"cg_accuracy_{device.type}_{tag}reg{args.reg:g}.json").write_text(
        json.dumps(result, indent=1)
    )


if __name__ == "__main__":
    main()
