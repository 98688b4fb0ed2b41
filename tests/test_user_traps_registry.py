"""Issue 20, item 8 (part): ``@im.register_inner_solver`` without a name; a run folder to load.

``@im.register_inner_solver`` and ``@im.register_inner_solver()`` register under the function's
name, as timm's ``@register_model`` does; ``load_meta_model`` takes a run folder as
``implicit-meta evaluate --checkpoint`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import implicit_meta as im
from implicit_meta.fewshot import TrainConfig, load_meta_model, train

pytestmark = pytest.mark.filterwarnings("ignore:.*not positive definite")


def _objective(params: dict[str, torch.Tensor]) -> torch.Tensor:
    return 0.5 * ((params["w"] - 3.0) ** 2).sum()


@pytest.fixture
def _cleanup() -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        if name in im.list_inner_solvers():
            im.unregister_inner_solver(name)


def test_bare_decorator_registers_under_the_function_name(_cleanup: list[str]) -> None:
    _cleanup.append("halfway_test_solver")

    @im.register_inner_solver
    def halfway_test_solver(objective, params, *, steps, lr):  # type: ignore[no-untyped-def]
        for _ in range(steps):
            grads = torch.func.grad(objective)(params)
            params = {k: v - lr * grads[k] for k, v in params.items()}
        return params

    # Returned unchanged, still a plain function, and found by name.
    assert halfway_test_solver.__name__ == "halfway_test_solver"
    assert im.get_inner_solver("halfway_test_solver") is halfway_test_solver
    w = halfway_test_solver(_objective, {"w": torch.zeros(2)}, steps=1, lr=0.5)["w"]
    assert torch.equal(w, torch.full((2,), 1.5))

    model = torch.nn.Linear(3, 2)
    meta = im.ImplicitMetaOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.1), inner="halfway_test_solver"
    )
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    meta.meta_backward(im.output_loss(F.cross_entropy), batch, batch)
    assert model.weight.grad is not None


def test_empty_call_registers_under_the_function_name_with_options(
    _cleanup: list[str],
) -> None:
    _cleanup.append("host_sync_test_solver")

    @im.register_inner_solver(vmappable=False, reason="it reads values on the host")
    def host_sync_test_solver(objective, params, *, steps, lr):  # type: ignore[no-untyped-def]
        return params

    assert im.get_inner_solver("host_sync_test_solver") is host_sync_test_solver
    reason = im.solvers.vmap_unsupported_reason(host_sync_test_solver)
    assert reason == "it reads values on the host"

    _cleanup.append("plain_call_test_solver")

    @im.register_inner_solver()
    def plain_call_test_solver(objective, params, *, steps, lr):  # type: ignore[no-untyped-def]
        return params

    assert im.get_inner_solver("plain_call_test_solver") is plain_call_test_solver


def test_named_registration_still_works_and_names_are_still_checked(
    _cleanup: list[str],
) -> None:
    _cleanup.append("named_test_solver")

    @im.register_inner_solver("named_test_solver")
    def some_function(objective, params, *, steps, lr):  # type: ignore[no-untyped-def]
        return params

    assert im.get_inner_solver("named_test_solver") is some_function
    assert "some_function" not in im.list_inner_solvers()
    # The function's own name is taken like any other: sgd is registered already.
    with pytest.raises(ValueError, match="'sgd' is already registered"):

        @im.register_inner_solver
        def sgd(objective, params, *, steps, lr):  # type: ignore[no-untyped-def]
            return params

    with pytest.raises(ValueError, match="non-empty string"):
        im.register_inner_solver("")


def test_a_lambda_needs_a_name() -> None:
    before = im.list_inner_solvers()
    with pytest.raises(ValueError, match=r'no name of its own.*register_inner_solver\("name"\)'):
        im.register_inner_solver(lambda objective, params, *, steps, lr: params)
    assert im.list_inner_solvers() == before


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder without validation (checkpoint.pt only), and a best.pt made beside it."""
    previous = torch.get_num_threads()
    config = TrainConfig(
        backbone="conv4-8", ways=3, shots=1, queries=1, inner_steps=1, meta_batch=1,
        meta_steps=1, eval_episodes=0, val_episodes=0, threads=1, device="cpu",
    )  # fmt: skip
    result = train(config, tmp_path_factory.mktemp("folder") / "run", progress=False)
    torch.set_num_threads(previous)
    return result.out_dir


def _weights(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_load_meta_model_takes_a_run_folder(run_dir: Path, tmp_path: Path) -> None:
    from implicit_meta.fewshot.loading import resolve_checkpoint  # what evaluate uses too

    from_file, config = load_meta_model(run_dir / "checkpoint.pt")
    from_folder, folder_config = load_meta_model(run_dir)  # no best.pt: the last checkpoint
    assert folder_config == config
    assert torch.equal(_weights(from_folder), _weights(from_file))

    # A folder with a best.pt gives it by default, and checkpoint.pt with which="last".
    folder = tmp_path / "with_best"
    folder.mkdir()
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    torch.save(state, folder / "checkpoint.pt")
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, folder / "best.pt")
    best, _ = load_meta_model(folder)
    last, _ = load_meta_model(folder, which="last")
    assert torch.equal(_weights(best), _weights(from_file) + 1)
    assert torch.equal(_weights(last), _weights(from_file))
    assert resolve_checkpoint(folder) == folder / "best.pt"
    assert resolve_checkpoint(folder / "checkpoint.pt", "best") == folder / "checkpoint.pt"


def test_load_meta_model_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"holds no checkpoint\.pt; is it a run folder"):
        load_meta_model(tmp_path)
    with pytest.raises(ValueError, match="which must be one of best, last"):
        load_meta_model(tmp_path, which="first")
