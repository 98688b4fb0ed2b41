"""Doctests leave nothing behind: caches and temporary folders go to pytest's temporary folder.

The examples in the docstrings show ordinary use (``load_omniglot()`` with its default cache,
``tempfile.mkdtemp()`` for an output folder). Run by pytest, they must not write into the
user's ``~/.cache`` or leave folders in ``/tmp``. So every doctest gets a data cache shared by
the session (in pytest's cache folder where there is one, so the embedded Omniglot is
preprocessed once, not per example or per run) and its own temporary folder under pytest's
base temporary folder, which pytest prunes itself.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from implicit_meta.data._cache import CACHE_ENV


@pytest.fixture(scope="session")
def _doctest_cache(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    # pytest's own cache folder, when it has one, so the preprocessing survives between runs.
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("implicit-meta-docs-data-cache"))
    return tmp_path_factory.mktemp("implicit_meta_cache")


@pytest.fixture(autouse=True)
def _doctests_write_under_tmp_path(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not isinstance(request.node, pytest.DoctestItem):
        return
    monkeypatch.setenv(CACHE_ENV, str(request.getfixturevalue("_doctest_cache")))
    tmp_path: Path = request.getfixturevalue("tmp_path")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
