"""MkDocs hook: ship MathJax with the site, so that formulas render without a network.

The renderer comes from an installed Python package, ``django-static-mathjax`` (in the ``dev``
extra; a copy of MathJax 3 packaged as static files, with no dependencies), and is copied into
the built site under :data:`SITE_DIR` after every build. ``mkdocs.yml`` loads
:data:`RENDERER` from there, so a site read on a cluster node without internet access typesets
its formulas like any other, and nothing is vendored in the repository.

What is copied is the ``es5`` tree that ``tex-mml-chtml.js`` needs: the component itself and
what it loads on demand (TeX extensions, the CHTML fonts, the menu, the accessibility tools),
without MathJax's other combined builds and its SVG output.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from mkdocs.exceptions import PluginError

SITE_DIR = "assets/mathjax"
"""Where MathJax lies in the built site."""

COMPONENT = "tex-mml-chtml.js"
"""The combined MathJax component the pages load (TeX in, HTML-CSS out)."""

RENDERER = f"{SITE_DIR}/{COMPONENT}"
"""The script ``mkdocs.yml`` lists in ``extra_javascript``."""

_SKIPPED_OUTPUTS = ("svg", "svg.js")


def mathjax_source() -> Path:
    """The ``es5`` folder of the installed MathJax.

    Returns:
        The folder holding ``tex-mml-chtml.js``.

    Raises:
        PluginError: If the package is not installed (the message names the install command).
    """
    try:
        import mathjax  # django-static-mathjax's top-level package
    except ImportError:
        raise PluginError(
            "the docs ship MathJax from the django-static-mathjax package, which is not "
            'installed: python -m pip install -e ".[dev]"'
        ) from None
    source = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (source / COMPONENT).is_file():
        raise PluginError(f"the installed MathJax has no {COMPONENT} in {source}")
    return source


def _ignore(folder: str, names: list[str]) -> list[str]:
    """What :func:`shutil.copytree` leaves out: other combined builds and the SVG output."""
    where = Path(folder)
    if (where / COMPONENT).is_file():  # the es5 root: keep one combined build, every folder
        return [n for n in names if n.endswith(".js") and n != COMPONENT]
    if where.name == "output":
        return [n for n in names if n in _SKIPPED_OUTPUTS]
    return []


def on_config(config: Any) -> Any:
    """Fail early, before any page is built, if MathJax is missing or not referenced."""
    mathjax_source()
    scripts = [str(getattr(s, "path", s)) for s in config["extra_javascript"]]
    if RENDERER not in scripts:
        raise PluginError(f"mkdocs.yml's extra_javascript must list {RENDERER}")
    return config


def on_post_build(config: Any) -> None:
    """Copy MathJax into the built site."""
    target = Path(config["site_dir"]) / SITE_DIR
    shutil.copytree(mathjax_source(), target, ignore=_ignore, dirs_exist_ok=True)
