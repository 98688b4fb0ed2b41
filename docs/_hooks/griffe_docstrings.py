"""Griffe extension: render the package's docstrings as they are meant to read.

The docstrings are Google style, with two habits that mkdocstrings does not understand as such:

* **Sphinx cross-reference roles** such as ``:func:`make_hvp``` or
  ``:class:`~implicit_meta.data.EpisodeSampler```. Markdown has no such syntax, so the API pages
  would show the role markup verbatim. Each role becomes an *optional* autorefs cross-reference:
  its target is resolved in the docstring's own scope (as Sphinx does), rendered as a link when
  the object is on an API page, and as plain code otherwise (``torch.Tensor.to``), never as a
  build warning.
* **An ``Example:`` section.** Google style allows the singular, but griffe only parses
  ``Examples:`` into highlighted doctest blocks (the singular becomes an admonition in which each
  ``>>>`` reads as a nested quote). The heading is renamed; the text is unchanged.

The docstrings in the source are not modified. Loaded by mkdocstrings through ``extensions:`` in
``mkdocs.yml``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|exc|obj|const):`(~?)([^`<>]+)`")
"""A Sphinx role: ``:role:`target``` or ``:role:`~target``` (last component shown)."""

EXAMPLE_HEADING = re.compile(r"^([ \t]*)Example:[ \t]*$", re.MULTILINE)
"""A Google-style ``Example:`` section heading on a line of its own."""


def resolve_target(obj: griffe.Object, target: str) -> str:
    """Resolve a role's target the way Sphinx would, from the scope of ``obj``.

    Args:
        obj: The object whose docstring holds the role.
        target: The dotted target, possibly relative (``make_hvp``, ``.omniglot_meta``).

    Returns:
        The full dotted path, or ``target`` unchanged when it is not a name in scope (an
        absolute path such as ``implicit_meta.data.EpisodeSampler`` or ``torch.Tensor.to``).
    """
    if target.startswith("."):
        module = obj.module
        package: griffe.Module | None = module if module.is_package else module.parent
        stripped = target.lstrip(".")
        for _ in range(len(target) - len(stripped) - 1):
            if package is not None and package.parent is not None:
                package = package.parent
        return f"{package.path}.{stripped}" if package is not None else stripped
    head, _, rest = target.partition(".")
    try:
        base = obj.resolve(head)
    except griffe.NameResolutionError:
        return target
    return f"{base}.{rest}" if rest else base


def rewrite(obj: griffe.Object, text: str) -> str:
    """Rewrite the Sphinx roles and the ``Example:`` heading of one docstring.

    Args:
        obj: The object the docstring belongs to (its scope resolves relative names).
        text: The docstring.

    Returns:
        The docstring with ``<autoref identifier="..." optional>`name`</autoref>`` in place of
        each role and ``Examples:`` in place of an ``Example:`` heading.
    """

    def replace(match: re.Match[str]) -> str:
        short, target = match.group(1), match.group(2).strip()
        shown = target.lstrip(".").rsplit(".", 1)[-1] if short else target
        identifier = resolve_target(obj, target)
        return f'<autoref identifier="{identifier}" optional>`{shown}`</autoref>'

    return EXAMPLE_HEADING.sub(r"\1Examples:", ROLE.sub(replace, text))


class DocstringCompat(griffe.Extension):
    """Rewrite every docstring of a package once the package is fully loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Walk the package and rewrite the docstrings of all its (non-alias) objects.

        Args:
            pkg: The loaded package.
            loader: The loader in use (unused).
            **kwargs: For forward compatibility.
        """
        seen: set[str] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.path in seen:
                continue
            seen.add(obj.path)
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj, obj.docstring.value)
            stack.extend(
                member
                for member in obj.members.values()
                if not member.is_alias and isinstance(member, griffe.Object)
            )
