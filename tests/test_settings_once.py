"""Each setting has one home: one set of defaults, and command-line flags made from the config.

The meta-optimizer, :func:`implicit_meta.adapt`, :class:`TrainConfig` and the ``train``
command once had defaults of their own (``reg`` 2 and 16 inner steps beside ``reg`` 1 and 5),
and the command line spelled each of its flags by hand. These tests hold every entry point to
:class:`~implicit_meta.InnerProblem`'s and :class:`~implicit_meta.ImplicitAdjoint`'s defaults,
and every config field to exactly one flag that parses into it.
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import implicit_meta as im
from implicit_meta import cli
from implicit_meta.fewshot.config import TrainConfig, field_choices, field_type
from implicit_meta.functional.adjoint import ImplicitAdjoint
from implicit_meta.problem import PARTIAL_DEFAULTS, SHORTHANDS, WHOLE_MODEL_DEFAULTS


def _linear_meta(**kwargs: object) -> im.ImplicitMetaOptimizer:
    model = torch.nn.Linear(3, 2)
    return im.ImplicitMetaOptimizer(model, torch.optim.SGD(model.parameters(), 0.1), **kwargs)


def _problem_values(problem: im.InnerProblem) -> tuple[object, ...]:
    return (problem.adapt, problem.reg, problem.solver_name, problem.steps, problem.lr)


@pytest.mark.parametrize("adapt", ["all", "head"])
def test_optimizer_and_config_share_one_set_of_defaults(adapt: str) -> None:
    config = TrainConfig(adapt=adapt, backbone="conv4-4")
    model = im.models.Conv4(5, width=4)
    meta = im.ImplicitMetaOptimizer(model, torch.optim.Adam(model.parameters()), adapt=adapt)
    assert _problem_values(meta.problem) == _problem_values(config.inner_problem())
    assert meta.adjoint == config.adjoint()
    expected = WHOLE_MODEL_DEFAULTS if adapt == "all" else PARTIAL_DEFAULTS
    assert _problem_values(meta.problem)[1:] == (
        expected["reg"],
        expected["solver"],
        expected["steps"],
        expected["lr"],
    )


def test_whole_model_defaults_are_the_measured_ones() -> None:
    # The adjoint study's best whole-network setting: a few SGD steps at reg 1, first-order.
    meta = _linear_meta()
    assert _problem_values(meta.problem) == ("all", 1.0, "sgd", 5, 0.1)
    assert meta.adjoint.first_order


def test_command_line_defaults_are_the_config_defaults() -> None:
    args = cli.build_parser().parse_args(["train"])
    assert cli._train_config(args, out=__import__("pathlib").Path()) == TrainConfig()


def test_adapt_without_settings_equals_sgd_with_the_default_values() -> None:
    # im.adapt's defaults, spelled out by hand: 5 proximal SGD steps at lr 0.1 and reg 1.
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1] * 3)

    def loss_fn(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(module(batch[0]), batch[1])

    adapted = im.adapt(model, loss_fn, (x, y))
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    phi = {n: t.clone() for n, t in theta.items()}
    for _ in range(5):
        phi = {n: t.requires_grad_() for n, t in phi.items()}
        logits = F.linear(x, phi["weight"], phi["bias"])
        grads = torch.autograd.grad(F.cross_entropy(logits, y), list(phi.values()))
        phi = {
            n: (t - 0.1 * (g + 1.0 * (t - theta[n]))).detach()
            for (n, t), g in zip(phi.items(), grads, strict=True)
        }
    for name, value in phi.items():
        torch.testing.assert_close(adapted.params[name], value, rtol=0, atol=1e-14)


def test_config_adjoint_fields_are_the_adjoints() -> None:
    # The run's adjoint fields carry ImplicitAdjoint's names and defaults, so neither can drift.
    config_fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    for field in dataclasses.fields(ImplicitAdjoint):
        assert field.name in config_fields
        if field.name != "reg":  # the run's reg is the inner problem's (None: its default)
            assert config_fields[field.name] == field.default, field.name
    # And every shorthand the config holds names an InnerProblem field.
    problem_fields = {f.name for f in dataclasses.fields(im.InnerProblem)}
    for name, target in SHORTHANDS.items():
        assert target in problem_fields
        if name != "inner_options":  # a dict of solver options has no flag
            assert name in config_fields


def _flag_actions() -> dict[str, argparse.Action]:
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = subparsers.choices["train"]
    return {a.dest: a for a in train._actions if a.option_strings}


def _sample_value(name: str) -> tuple[str, object]:
    if name in field_choices():
        value = field_choices()[name][-1]
        return value, value
    kind, _ = field_type(name)
    samples: dict[type, tuple[str, object]] = {int: ("3", 3), float: ("0.25", 0.25)}
    return samples.get(kind, ("some-text", "some-text"))


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainConfig)])
def test_every_config_field_has_one_flag_that_parses_into_it(field: str) -> None:
    actions = _flag_actions()
    assert field in actions, f"TrainConfig.{field} has no command-line flag"
    flag = actions[field].option_strings[0]
    assert flag == "--" + field.replace("_", "-")
    kind, _ = field_type(field)
    if kind is bool:
        args = cli.build_parser().parse_args(["train", flag])
        assert getattr(args, field) is True
        return
    text, value = _sample_value(field)
    args = cli.build_parser().parse_args(["train", flag, text])
    assert getattr(args, field) == value
    assert (actions[field].help or "").startswith(cli._field_docs(TrainConfig)[field])


def test_flags_take_their_help_from_the_field_docstring() -> None:
    docs = cli._field_docs(TrainConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert docs["ways"] == "Classes per task, N."
    assert "first-order" in docs["cg_steps"] and ":" not in docs["cg_steps"].split(" ")[0]
    assert _flag_actions()["ways"].help == "Classes per task, N. (default: 5)"


def test_a_new_field_needs_only_its_line_and_docstring() -> None:
    # A config with one more field, documented: the flag follows without touching the CLI.
    @dataclasses.dataclass(frozen=True)
    class Extended:
        """Settings.

        Attributes:
            warmup: Meta-steps of linear warm-up
                before the schedule.
        """

        warmup: int = 0

    assert cli._field_docs(Extended) == {
        "warmup": "Meta-steps of linear warm-up before the schedule."
    }
