"""The install layers: the optimizer plug-in needs torch, torchopt and numpy only."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import requires
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _requirements() -> dict[str, set[str]]:
    """The installed distribution's requirements by extra ("" for the core)."""
    found: dict[str, set[str]] = {}
    for line in requires("implicit-meta") or []:
        name = re.match(r"[A-Za-z0-9_.-]+(\[[^\]]*\])?", line)
        assert name is not None, line
        extra = re.search(r"extra\s*==\s*[\"']([^\"']+)[\"']", line)
        found.setdefault(extra.group(1) if extra else "", set()).add(name.group(0).lower())
    return found


def test_core_requirements_are_torch_torchopt_numpy_and_the_pipelines_are_an_extra() -> None:
    found = _requirements()
    assert found[""] == {"torch", "torchopt", "numpy"}
    assert found["fewshot"] == {"timm", "pillow", "tqdm", "matplotlib"}
    assert "implicit-meta[fewshot]" in found["dev"]  # the tests need the pipelines
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'python -m pip install -e ".[fewshot]" && implicit-meta train' in readme


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_optimizer_plug_in_imports_none_of_the_pipeline_packages() -> None:
    done = _run(
        "import sys, implicit_meta\n"
        "print(sorted(m for m in ('timm', 'matplotlib', 'PIL', 'torchvision') if m in sys.modules))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_pipelines_name_the_missing_extra() -> None:
    done = _run("import sys; sys.modules['timm'] = None; import implicit_meta.fewshot")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: implicit_meta.fewshot needs timm")
    assert "implicit-meta[fewshot]" in last
