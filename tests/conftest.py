"""Shared fixtures: devices to run on (CUDA too when present) and dense references."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(0)
    yield


def flatten(params: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in params.values()])


def unflatten(flat: Tensor, like: dict[str, Tensor]) -> dict[str, Tensor]:
    out, offset = {}, 0
    for k, v in like.items():
        out[k] = flat[offset : offset + v.numel()].view_as(v)
        offset += v.numel()
    return out


def dense_hessian(fn: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor]) -> Tensor:
    """Dense Hessian of fn at params, one row at a time with plain autograd.

    Deliberately not torch.func.hessian: that vmaps over rows, and with BatchNorm in training
    mode (torch 2.14) the vmapped rows come out wrong (an asymmetric "Hessian" 18% off finite
    differences), while row-by-row double backward agrees with finite differences.
    """
    flat = flatten(params).detach()
    return torch.autograd.functional.hessian(
        lambda x: fn(unflatten(x, params)), flat, vectorize=False
    )


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())
