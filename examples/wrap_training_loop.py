"""Turn an ordinary PyTorch training loop into iMAML by changing a few lines.

The task family is the sinusoid regression of the MAML paper: each task is
``y = a * sin(x - b)`` with its own amplitude and phase, observed at 10 points. An ordinary
regression model trained on the mixture of tasks learns their average (close to zero); iMAML
learns an initialisation from which a few gradient steps on 10 points fit a new task.

``ordinary_training`` is a standard loop; ``imaml_training`` is the same loop with the lines
marked ``# iMAML`` changed. Everything else (model, loss, optimizer) is untouched.

Run:
    python examples/wrap_training_loop.py            # 1-2 minutes on a 2-core CPU
    python examples/wrap_training_loop.py --smoke    # a few seconds (CI)
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import implicit_meta as im

Batch = tuple[Tensor, Tensor]


def sample_task(generator: torch.Generator) -> tuple[float, float]:
    """Amplitude in [0.1, 5] and phase in [0, pi], as in MAML."""
    amplitude = 0.1 + 4.9 * torch.rand((), generator=generator).item()
    phase = math.pi * torch.rand((), generator=generator).item()
    return amplitude, phase


def sample_points(task: tuple[float, float], n: int, generator: torch.Generator) -> Batch:
    amplitude, phase = task
    x = torch.empty(n, 1).uniform_(-5.0, 5.0, generator=generator)
    return x, amplitude * torch.sin(x - phase)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1)
    )


def loss_fn(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def ordinary_training(steps: int, seed: int = 0) -> nn.Module:
    """A standard PyTorch loop: one batch per step, backward, step."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(steps):
        batch = sample_points(sample_task(generator), 10, generator)
        optimizer.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    return model


def imaml_training(steps: int, seed: int = 0) -> nn.Module:
    """The same loop as ``ordinary_training``, meta-trained with iMAML."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta = im.ImplicitMetaOptimizer(  # iMAML: wrap the model and its optimizer
        model, optimizer, reg=1.0, inner="sgd", inner_steps=10, inner_lr=0.02, cg_steps=5
    )
    for _ in range(steps):
        task = sample_task(generator)  # iMAML: one task per step ...
        support = sample_points(task, 10, generator)  # iMAML: ... seen through a support set
        query = sample_points(task, 10, generator)  # iMAML: ... and a query set
        meta.zero_grad()  # iMAML: was optimizer.zero_grad()
        meta.meta_backward(loss_fn, support, query)  # iMAML: was loss_fn(...).backward()
        meta.step()  # iMAML: was optimizer.step()
    return model


def adapted_loss(model: nn.Module, tasks: int, seed: int) -> float:
    """Mean query MSE after adapting to 10 support points with the same inner solver."""
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(tasks):
        task = sample_task(generator)
        support = sample_points(task, 10, generator)
        adapted = im.adapt(model, loss_fn, support, reg=1.0, inner_steps=10, inner_lr=0.02)
        with torch.no_grad():
            total += float(loss_fn(adapted, sample_points(task, 100, generator)))
    return total / tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI")
    args = parser.parse_args()
    smoke = args.smoke or os.environ.get("IMPLICIT_META_SMOKE") == "1"
    steps, tasks = (5, 3) if smoke else (args.steps, 100)
    torch.set_num_threads(1)  # a 40-unit MLP: one thread avoids synchronisation overhead
    ordinary = adapted_loss(ordinary_training(steps), tasks, seed=1)
    imaml = adapted_loss(imaml_training(steps), tasks, seed=1)
    print(f"query MSE after 10-shot adaptation, {tasks} new tasks, {steps} training steps:")
    print(f"  ordinary training: {ordinary:.3f}")
    print(f"  iMAML            : {imaml:.3f}")


if __name__ == "__main__":
    main()
