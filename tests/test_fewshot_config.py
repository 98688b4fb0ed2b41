from __future__ import annotations

import dataclasses

import pytest
import torch

from implicit_meta.fewshot import TrainConfig
from implicit_meta.fewshot.config import RESUMABLE_FIELDS, check_resumable, meta_lr_at
from implicit_meta.fewshot.device import (
    DeviceUnavailableError,
    available_cpus,
    configure_threads,
    resolve_device,
)


def test_every_field_checks_its_annotated_type() -> None:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RESUMABLE_FIELDS) <= names
    for name in names:
        with pytest.raises(TypeError, match=name):
            TrainConfig(**{name: object()})
    # Optional fields take None; the others refuse it; bools are not ints and ints not bools.
    assert TrainConfig(root=None, cg_steps=None, reg=None, inner=None).cg_steps is None
    for name in ("ways", "meta_lr", "dataset", "compile_inner"):
        with pytest.raises(TypeError, match=name):
            TrainConfig(**{name: None})
    with pytest.raises(TypeError, match="ways"):
        TrainConfig(ways=True)
    with pytest.raises(TypeError, match="compile_inner must be True or False"):
        TrainConfig(compile_inner=1)


def test_round_trip_through_plain_dict() -> None:
    config = TrainConfig(shots=1, inner_lr=1, root="/data", time_budget=0)
    values = config.to_dict()
    assert all(isinstance(v, str | int | float | type(None)) for v in values.values())
    assert isinstance(values["inner_lr"], float)  # ints given for floats are normalised
    assert TrainConfig.from_dict(values) == config


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"ways": 0}, "ways"),
        ({"queries": 0}, "queries"),
        ({"inner_steps": -1}, "inner_steps"),
        ({"reg": 0.0}, "reg"),
        ({"meta_lr": float("nan")}, "meta_lr"),
        ({"time_budget": -1.0}, "time_budget"),
        ({"dataset": "cifar"}, "dataset"),
        ({"protocol": "x"}, "protocol"),
        ({"device": "tpu"}, "device"),
        ({"backbone": ""}, "backbone"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
        ({"task_strategy": "threads"}, "task_strategy"),
    ],
)
def test_invalid_values_raise(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrainConfig(**changes)  # type: ignore[arg-type]


def test_wrong_types_raise() -> None:
    with pytest.raises(TypeError, match="ways"):
        TrainConfig(ways=5.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        TrainConfig(seed=True)
    with pytest.raises(TypeError, match="compile_inner must be True or False"):
        TrainConfig(compile_inner=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown config fields"):
        TrainConfig.from_dict({"wayz": 5})


def test_check_resumable_names_changed_fields() -> None:
    check_resumable(TrainConfig(), TrainConfig(time_budget=30, device="cpu", threads=1))
    with pytest.raises(ValueError, match=r"shots \(checkpoint: 5, requested: 1\)"):
        check_resumable(TrainConfig(), TrainConfig(shots=1))
    with pytest.raises(ValueError, match=r"cosine schedule.*meta_steps=500"):
        check_resumable(TrainConfig(), TrainConfig(meta_steps=10))
    constant = TrainConfig(lr_schedule="constant")
    check_resumable(constant, constant.replace(meta_steps=10))  # a constant rate extends


def test_cosine_schedule_follows_the_step_alone() -> None:
    config = TrainConfig(meta_lr=0.002, meta_steps=200)
    assert meta_lr_at(config, 0) == 0.002
    assert meta_lr_at(config, 50) == pytest.approx(0.001 * (1 + 2**-0.5))  # p = 1/4
    assert meta_lr_at(config, 100) == pytest.approx(0.001)
    assert meta_lr_at(config, 150) == pytest.approx(0.001 * (1 - 2**-0.5))  # p = 3/4
    assert meta_lr_at(config, 200) == 0.0
    assert meta_lr_at(config, 300) == 0.0  # past the end it stays at 0
    # A time budget is a stop, not part of the schedule.
    assert meta_lr_at(config.replace(time_budget=1.0), 100) == meta_lr_at(config, 100)
    assert meta_lr_at(config.replace(lr_schedule="constant"), 150) == 0.002
    assert TrainConfig().lr_schedule == "cosine"  # the default run decays


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_request_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_request_with_cuda() -> None:
    assert resolve_device("cuda").type == "cuda"
    with pytest.raises(DeviceUnavailableError, match="visible"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_configure_threads() -> None:
    previous = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
        assert 1 <= configure_threads(0) <= available_cpus()
        with pytest.raises(ValueError):
            configure_threads(-1)
    finally:
        torch.set_num_threads(previous)
