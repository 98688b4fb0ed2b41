"""The documentation site: its code examples run, its API pages cover every public name, it builds.

Conventions (see docs/contributing.md):

* Every ```` ```python ```` fence in ``docs/**/*.md`` is executed. The blocks of one page run in
  order, in one fresh namespace, so a page may build on its earlier blocks; each page starts from
  a clean working directory and a seeded torch.
* A ```` ```py ```` fence is shown but not executed. It is only for examples that need hardware
  or data a test machine may lack (a CUDA GPU, a user's dataset copy), and its first line must be
  a comment that starts with ``# Needs`` and says what it needs.
* Every name in the ``__all__`` of ``implicit_meta`` and of its public submodules must be
  rendered on an API reference page (an element with id ``<module>.<name>`` in the built site).
* ``mkdocs build --strict`` succeeds without a warning and without touching the network.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import implicit_meta
from implicit_meta.models import list_backbones, unregister_backbone

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts)

RUNNABLE = "python"
NOT_RUN = "py"
OPENING = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")

# Runs `mkdocs build` with every socket connection refused: the build must be offline.
OFFLINE_BUILD = textwrap.dedent(
    """
    import runpy, socket, sys

    def refuse(*args, **kwargs):
        raise OSError("the docs build tried to open a network connection")

    socket.socket.connect = refuse
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    sys.argv = ["mkdocs", *sys.argv[1:]]
    runpy.run_module("mkdocs", run_name="__main__", alter_sys=True)
    """
)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page."""

    page: Path
    line: int  # 1-based line of the first code line
    language: str
    code: str

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def fence_language(info: str) -> str:
    """The language of a fence's info string: ``python title="x"`` or ``{ .python .x }``."""
    info = info.strip()
    if info.startswith("{"):
        classes = re.findall(r"\.([\w-]+)", info)
        return classes[0] if classes else ""
    return info.split(maxsplit=1)[0] if info else ""


def code_blocks(page: Path) -> list[Block]:
    """Every fenced code block of ``page``, dedented to its fence's indentation."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = OPENING.match(lines[i])
        if match is None:
            i += 1
            continue
        indent, fence = match["indent"], match["fence"]
        closing = re.compile(rf"^{re.escape(indent)}{re.escape(fence[0])}{{{len(fence)},}}[ \t]*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not closing.match(lines[j]):
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise AssertionError(f"{page.relative_to(ROOT)}:{i + 1}: unclosed code fence")
        blocks.append(Block(page, i + 2, fence_language(match["info"]), "\n".join(body)))
        i = j + 1
    return blocks


def page_source(page: Path) -> str:
    """The runnable blocks of a page as one script, each at its line number in the page."""
    script = [""] * len(page.read_text(encoding="utf-8").splitlines())
    for block in code_blocks(page):
        if block.language == RUNNABLE:
            for offset, text in enumerate(block.code.splitlines()):
                script[block.line - 1 + offset] = text
    return "\n".join(script) + "\n"


RUNNABLE_PAGES = [p for p in PAGES if any(b.language == RUNNABLE for b in code_blocks(p))]


def test_docs_have_runnable_examples() -> None:
    assert len(RUNNABLE_PAGES) >= 8, [str(p) for p in RUNNABLE_PAGES]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_not_run_blocks_say_why(page: Path) -> None:
    for block in code_blocks(page):
        if block.language == NOT_RUN:
            first = block.code.lstrip().splitlines()[0] if block.code.strip() else ""
            assert first.startswith("# Needs"), (
                f"{block.where()}: a ```py block is not executed; start it with a comment "
                "'# Needs ...' saying what it needs (a GPU, a local dataset), or make it a "
                "```python block that runs"
            )


@pytest.fixture(scope="session")
def docs_cache(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data cache for the examples that survives between runs, but never the user's."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("implicit-meta-docs-data-cache"))
    return tmp_path_factory.mktemp("implicit-meta-docs-data-cache")


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_examples_run(
    page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docs_cache: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # mkdtemp() in an example
    monkeypatch.setenv("IMPLICIT_META_CACHE", str(docs_cache))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch.manual_seed(0)
    solvers_before = set(implicit_meta.list_inner_solvers())
    backbones_before = set(list_backbones())
    threads = torch.get_num_threads()
    namespace: dict[str, object] = {"__name__": "__main__"}
    try:
        with warnings.catch_warnings():  # examples may change the filters
            exec(compile(page_source(page), str(page), "exec"), namespace)
    finally:
        # Examples may register inner solvers or set torch's thread count (process-wide).
        for name in set(implicit_meta.list_inner_solvers()) - solvers_before:
            implicit_meta.unregister_inner_solver(name)
        for spec in set(list_backbones()) - backbones_before:
            if not spec.endswith("-<width>"):
                unregister_backbone(spec)
        torch.set_num_threads(threads)


def public_modules() -> list[str]:
    """``implicit_meta`` and each public submodule that declares ``__all__``."""
    names = ["implicit_meta"]
    for info in pkgutil.iter_modules(implicit_meta.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"implicit_meta.{info.name}")
        if hasattr(module, "__all__"):
            names.append(module.__name__)
    return names


def test_public_modules_found() -> None:
    expected = {"implicit_meta", "implicit_meta.functional", "implicit_meta.solvers"}
    expected |= {"implicit_meta.data", "implicit_meta.models"}
    assert expected <= set(public_modules())


@pytest.fixture(scope="session")
def built_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the site once, strictly and offline; fail (never skip) if mkdocs is missing."""
    site = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-c", OFFLINE_BUILD, "build", "--strict", "--site-dir", str(site)]
    command += ["--config-file", str(ROOT / "mkdocs.yml")]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    warned = [line for line in output.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert not warned, "\n".join(warned)
    return site


def test_mkdocs_build_strict(built_site: Path) -> None:
    assert (built_site / "index.html").is_file()
    assert (built_site / "reference" / "implicit_meta" / "index.html").is_file()


def test_api_reference_covers_public_names(built_site: Path) -> None:
    anchors: set[str] = set()
    for html in (built_site / "reference").rglob("*.html"):
        anchors |= set(re.findall(r'\bid="([^"]+)"', html.read_text(encoding="utf-8")))
    missing = []
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if f"{module_name}.{name}" not in anchors:
                missing.append(f"{module_name}.{name}")
    assert not missing, (
        "public names not rendered on an API reference page (add them to a ::: directive "
        f"in docs/reference/): {missing}"
    )


def test_math_renders_offline(built_site: Path) -> None:
    concepts = (built_site / "concepts" / "index.html").read_text(encoding="utf-8")
    assert 'class="arithmatex"' in concepts
    assert (built_site / "javascripts" / "mathjax.js").is_file()


SCRIPT_SRC = re.compile(r"<script\b[^>]*?\bsrc=\"([^\"]+)\"")
STYLESHEET_HREF = re.compile(r"<link\b[^>]*?\brel=\"stylesheet\"[^>]*?\bhref=\"([^\"]+)\"")


def test_math_renderer_ships_with_the_site(built_site: Path) -> None:
    """Offline (a cluster node), every page's scripts and styles come from the site itself."""
    pages = sorted(built_site.rglob("*.html"))
    assert len(pages) > 10
    renderers: set[Path] = set()
    for page in pages:
        html = page.read_text(encoding="utf-8")
        for reference in SCRIPT_SRC.findall(html) + STYLESHEET_HREF.findall(html):
            where = f"{page.relative_to(built_site)}: {reference}"
            assert not re.match(r"(?i)([a-z][a-z0-9+.-]*:|//)", reference), f"remote: {where}"
            path = reference.split("?")[0]
            # Site-absolute paths only on 404.html, which only a web server shows.
            base = built_site if path.startswith("/") else page.parent
            target = (base / path.lstrip("/")).resolve()
            assert target.is_file(), f"missing from the site: {where}"
            if target.name == "tex-mml-chtml.js":
                renderers.add(target)
    # Every page with math loads one MathJax, from the site, with the fonts it loads beside it.
    (renderer,) = renderers
    assert renderer.stat().st_size > 500_000  # the MathJax component, not a stub
    assert "MathJax" in renderer.read_text(encoding="utf-8", errors="replace")[:100_000]
    fonts = renderer.parent / "output" / "chtml" / "fonts" / "woff-v2"
    assert any(fonts.glob("MathJax_Main-Regular.woff")), fonts
    assert (renderer.parent / "input" / "tex" / "extensions").is_dir()  # autoloaded packages
    concepts = (built_site / "concepts" / "index.html").read_text(encoding="utf-8")
    assert "tex-mml-chtml.js" in concepts and 'class="arithmatex"' in concepts


def test_readme_python_blocks_run() -> None:
    """Every ```python block of README.md runs as written, in one namespace, in order."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README.md has no python block"
    namespace: dict[str, object] = {"__name__": "readme"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for index, block in enumerate(blocks):
            exec(compile(block, f"README.md block {index}", "exec"), namespace)
