"""MkDocs hook: paste the live ``implicit-meta --help`` output into the pages that ask for it.

A page writes ``<!-- implicit-meta-help: train -->`` (or ``evaluate``, or nothing after the colon
for the top-level help) on a line of its own; the hook replaces the marker with a ``text`` code
block holding what ``implicit-meta train --help`` prints. The flags in the docs are therefore the
flags of the installed CLI, never a stale copy.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from typing import Any

MARKER = re.compile(r"^<!-- implicit-meta-help:\s*([a-z-]*)\s*-->$", re.MULTILINE)
"""The marker a page uses; the group is the subcommand (empty for the top-level help)."""

HELP_COLUMNS = "100"
"""Terminal width argparse wraps the help text to, fixed so that builds are reproducible."""


def cli_help(command: str) -> str:
    """Return the ``--help`` text of ``implicit-meta [command]``.

    Args:
        command: ``"train"``, ``"evaluate"`` or ``""`` for the top-level help.

    Returns:
        The help text, as argparse prints it.

    Raises:
        RuntimeError: If the parser does not print help and exit 0 (e.g. unknown command).
    """
    from implicit_meta.cli import build_parser

    argv = [command, "--help"] if command else ["--help"]
    out = io.StringIO()
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            build_parser().parse_args(argv)
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    text = out.getvalue()
    if not text.startswith("usage:"):
        raise RuntimeError(f"`implicit-meta {' '.join(argv)}` printed no help")
    return text.rstrip()


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    """Replace every help marker of a page with the corresponding help text.

    Args:
        markdown: The page's Markdown source.
        **kwargs: ``page``, ``config`` and ``files`` (unused).

    Returns:
        The Markdown with the markers expanded.
    """
    return MARKER.sub(lambda m: f"```text\n{cli_help(m.group(1))}\n```", markdown)
