"""The shared registry helper, and the inner-solver and backbone registries built on it.

Both registries follow timm's naming (``@register_*``, ``list_*(pattern)``, a getter,
``unregister_*``) and behave the same way: a decorator that works with and without a name and
returns the function unchanged, refusal of a taken name, errors that name the close matches,
shell-style pattern listing and removal.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import implicit_meta as im
from implicit_meta._registry import Registry, close_matches, did_you_mean, filter_names
from implicit_meta.models import (
    create_backbone,
    list_backbones,
    register_backbone,
    unregister_backbone,
)
from implicit_meta.solvers.resolve import resolve_inner_solver

# ---------------------------------------------------------------------------- the shared helper


@pytest.fixture
def colours() -> Registry[str]:
    registry: Registry[str] = Registry(
        "colour", decorator="register_colour", hint=" (register your own)"
    )
    for name, code in [("red", "#f00"), ("green", "#0f0"), ("grey", "#888")]:
        registry.add(name, code)
    return registry


def test_add_get_and_membership(colours: Registry[str]) -> None:
    assert colours.get("green") == "#0f0"
    assert "red" in colours and "blue" not in colours and 3 not in colours
    assert colours.items() == [("green", "#0f0"), ("grey", "#888"), ("red", "#f00")]


def test_a_taken_name_is_refused_unless_overwrite(colours: Registry[str]) -> None:
    with pytest.raises(ValueError, match="a colour named 'red' is already registered"):
        colours.add("red", "#e00")
    assert colours.get("red") == "#f00"
    colours.add("red", "#f00")  # the same entry again: nothing changes
    colours.add("red", "#e00", overwrite=True)
    assert colours.get("red") == "#e00"


@pytest.mark.parametrize("name", ["", None, 3])
def test_a_name_must_be_a_non_empty_string(colours: Registry[str], name: Any) -> None:
    with pytest.raises(ValueError, match="colour name must be a non-empty string"):
        colours.add(name, "#000")


def test_an_unknown_name_names_the_close_matches_and_every_name(colours: Registry[str]) -> None:
    with pytest.raises(ValueError) as caught:
        colours.get("gren")
    assert str(caught.value) == (
        "unknown colour 'gren' (did you mean 'green' or 'grey'?); registered colours: green, "
        "grey, red (register your own)"
    )
    with pytest.raises(ValueError, match=r"^unknown colour 'blue'; registered colours: green"):
        colours.get("blue")  # nothing close: no suggestion
    with pytest.raises(ValueError, match="unknown colour"):
        colours.get([])  # type: ignore[arg-type]  # unhashable: the same error, no TypeError


def test_unknown_lists_what_the_owner_says_and_its_suggestion_first(
    colours: Registry[str],
) -> None:
    error = colours.unknown("red-9", known=["red", "red-<n>", "any:<name>"], extra="any:red-9")
    assert str(error) == (
        "unknown colour 'red-9' (did you mean 'any:red-9' or 'red'?); registered colours: red, "
        "red-<n>, any:<name> (register your own)"
    )


def test_names_match_a_shell_pattern(colours: Registry[str]) -> None:
    assert colours.names() == ["green", "grey", "red"]
    assert colours.names("gr*") == ["green", "grey"]
    assert colours.names("gre?n") == ["green"]
    assert colours.names("[rg]re*") == ["green", "grey"]
    assert colours.names("G*") == []  # case-sensitive, as on every platform
    assert colours.names("blue*") == []
    with pytest.raises(TypeError, match="pattern must be a string or None"):
        colours.names(["gr*"])  # type: ignore[arg-type]


def test_remove_returns_the_entry_and_unknown_names_raise_key_error(
    colours: Registry[str],
) -> None:
    assert colours.remove("red") == "#f00"
    assert colours.names() == ["green", "grey"]
    with pytest.raises(KeyError, match=r"no colour named 'gren' is registered \(did you mean"):
        colours.remove("gren")
    with pytest.raises(KeyError, match="no colour named 'red'"):
        colours.remove("red")
    colours.add("red", "#e00")  # a removed name is free again


def test_decorator_registers_under_the_given_or_the_function_name() -> None:
    @dataclass(frozen=True)
    class Entry:
        function: Callable[..., Any]
        loud: bool

    registry: Registry[Entry] = Registry("shout", decorator="register_shout")

    def whisper(text: str) -> str:
        return text.lower()

    assert registry.decorator_for("quiet", lambda fn: Entry(fn, False))(whisper) is whisper
    assert registry.decorator_for(None, lambda fn: Entry(fn, False))(whisper) is whisper
    assert registry.names() == ["quiet", "whisper"]
    assert registry.get("whisper") == Entry(whisper, False)
    # The same function with the same options: no change; with other options: refused.
    registry.decorator_for("quiet", lambda fn: Entry(fn, False))(whisper)
    with pytest.raises(ValueError, match="already registered"):
        registry.decorator_for("quiet", lambda fn: Entry(fn, True))(whisper)
    with pytest.raises(ValueError, match=r'no name of its own.*register_shout\("name"\)'):
        registry.decorator_for(None, lambda fn: Entry(fn, False))(lambda text: text)
    with pytest.raises(ValueError, match="non-empty string"):
        registry.decorator_for("", lambda fn: Entry(fn, False))  # at once, before decorating
    with pytest.raises(TypeError, match="must be callable"):
        registry.decorator_for("number", lambda fn: Entry(fn, False))(3)  # type: ignore[type-var]
    assert registry.names() == ["quiet", "whisper"]


def test_close_matches_and_did_you_mean() -> None:
    assert close_matches("bfgs", ["sgd", "adam", "lbfgs"]) == ["lbfgs"]
    assert close_matches("sgd", ["SGD", "Adam"]) == ["SGD"]  # case is ignored
    assert close_matches("xyz", ["sgd"]) == []
    assert did_you_mean([]) == ""
    assert did_you_mean(["a", "b", "c"]) == " (did you mean 'a', 'b' or 'c'?)"
    assert filter_names(["b", "a", "ab"], "a*") == ["a", "ab"]  # order kept
    assert filter_names(["b", "a"], None) == ["b", "a"]


# ----------------------------------------------------- both registries, through their public API


def _solver(objective: Any, params: dict[str, torch.Tensor], *, steps: int, lr: float) -> Any:
    return params


def _backbone(*, num_classes: int, in_channels: int, image_size: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, num_classes))


@dataclass(frozen=True)
class Kind:
    """One registry's public functions, so that one test runs over both."""

    register: Callable[..., Any]
    listing: Callable[..., list[str]]
    get: Callable[[str], Any]
    unregister: Callable[[str], None]
    function: Callable[..., Any]
    builtin: str  # a built-in name
    misspelt: str  # close to the built-in name
    noun: str


def _create(spec: str) -> nn.Module:
    return create_backbone(spec, num_classes=2, in_channels=1, image_size=4)


KINDS = {
    "inner solver": Kind(
        im.register_inner_solver,
        im.list_inner_solvers,
        im.get_inner_solver,
        im.unregister_inner_solver,
        _solver,
        "newton_cg",
        "newton_gc",
        "inner solver",
    ),
    "backbone": Kind(
        register_backbone,
        list_backbones,
        _create,
        unregister_backbone,
        _backbone,
        "conv4",
        "conv5",
        "backbone",
    ),
}


@pytest.fixture(params=list(KINDS))
def kind(request: pytest.FixtureRequest) -> Iterator[Kind]:
    chosen = KINDS[request.param]
    before = set(chosen.listing())
    yield chosen
    for name in set(chosen.listing()) - before:
        if "<" not in name:
            chosen.unregister(name)


def _names(kind: Kind) -> list[str]:
    return [name for name in kind.listing() if "<" not in name]


def test_decorator_with_or_without_a_name_returns_the_function(kind: Kind) -> None:
    assert kind.register("same_test_named")(kind.function) is kind.function
    assert kind.register(kind.function) is kind.function  # bare: the function's own name
    assert kind.register()(kind.function) is kind.function  # empty call: the same, again
    assert {"same_test_named", kind.function.__name__} <= set(_names(kind))
    kind.get("same_test_named")
    kind.get(kind.function.__name__)


def test_a_taken_name_is_refused_the_same_way(kind: Kind) -> None:
    with pytest.raises(ValueError, match=f"a {kind.noun} named '{kind.builtin}' is already"):
        kind.register(kind.builtin)(kind.function)
    with pytest.raises(ValueError, match=f"{kind.noun} name must be a non-empty string"):
        kind.register("")
    with pytest.raises(ValueError, match="no name of its own"):
        kind.register(lambda **options: None)
    kind.register("overwrite_test")(kind.function)

    def other(**options: Any) -> None:
        return None

    assert kind.register("overwrite_test", overwrite=True)(other) is other


def test_an_unknown_name_names_the_close_match_the_same_way(kind: Kind) -> None:
    pattern = (
        rf"^unknown {kind.noun} '{kind.misspelt}' \(did you mean '{kind.builtin}'.*\); "
        rf"registered {kind.noun}s: .*{kind.builtin}.* \(register your own with implicit_meta"
    )
    with pytest.raises(ValueError, match=pattern):
        kind.get(kind.misspelt)
    with pytest.raises(KeyError, match=rf"no {kind.noun} named '{kind.misspelt}' is registered"):
        kind.unregister(kind.misspelt)


def test_listing_by_pattern_and_unregistering_the_same_way(kind: Kind) -> None:
    kind.register("pattern_test_a")(kind.function)
    kind.register("pattern_test_b")(kind.function)
    assert kind.listing("pattern_test_*") == ["pattern_test_a", "pattern_test_b"]
    assert kind.listing("pattern_test_[b]") == ["pattern_test_b"]
    assert kind.listing("no_such_*") == []
    assert kind.builtin in kind.listing()
    kind.unregister("pattern_test_a")
    assert kind.listing("pattern_test_*") == ["pattern_test_b"]
    with pytest.raises(ValueError, match=f"unknown {kind.noun} 'pattern_test_a'"):
        kind.get("pattern_test_a")


# ------------------------------------------------------------- what each registry adds on top


def test_backbone_listing_by_pattern_covers_the_spec_forms() -> None:
    assert list_backbones("conv4*") == ["conv4", "conv4-<width>"]
    assert list_backbones("timm:*") == ["timm:<name>"]


def test_backbone_names_refuse_the_external_prefix_and_options_reach_the_builder() -> None:
    with pytest.raises(ValueError, match="without ':'"):
        register_backbone("timm:mine")
    model = create_backbone("conv4", num_classes=3, in_channels=1, image_size=28, width=8)
    assert model.head.in_features == 8  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="sets width already"):
        create_backbone("conv4-16", num_classes=3, in_channels=1, image_size=28, width=8)


def test_a_timm_name_without_its_prefix_is_suggested() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet10t' \(did you mean "):
        _create("resnet10t")
    with pytest.raises(ValueError, match=r"'timm:resnet10t'"):
        _create("resnet10t")
    with pytest.raises(ValueError, match=r"timm has no model 'resnet10x' \(did you mean"):
        _create("timm:resnet10x")


def test_a_misspelt_torch_optim_name_names_the_close_matches() -> None:
    with pytest.raises(
        ValueError, match=r"torch\.optim has no optimizer 'sgd' \(did you mean 'SGD'"
    ):
        resolve_inner_solver("torch.optim.sgd")
    assert resolve_inner_solver("torch.optim.SGD")[1] == "torch.optim.SGD"
    # A registered name that looks like a torch.optim spec still wins over the error.
    im.register_inner_solver("torch.optim.Mine")(_solver)
    try:
        assert resolve_inner_solver("torch.optim.Mine") == (_solver, "torch.optim.Mine")
    finally:
        im.unregister_inner_solver("torch.optim.Mine")


def test_a_solver_re_registered_with_other_capabilities_is_refused() -> None:
    im.register_inner_solver("capability_test")(_solver)
    try:
        with pytest.raises(ValueError, match="already registered"):
            im.register_inner_solver("capability_test", vmappable=False, reason="host")(_solver)
        assert im.solvers.vmap_unsupported_reason(_solver) is None
        im.register_inner_solver("capability_test", vmappable=False, reason="host", overwrite=True)(
            _solver
        )
        assert im.solvers.vmap_unsupported_reason(_solver) == "host"
    finally:
        im.unregister_inner_solver("capability_test")
    assert im.solvers.vmap_unsupported_reason(_solver) is None
