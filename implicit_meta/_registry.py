"""One small registry of named entries, shared by the inner solvers and the backbones.

As in timm's model registry, a decorator records a function by name and returns it unchanged;
names are listed (filtered by an optional shell-style pattern), looked up with an error that
names the close matches, and removed. What a registry records beside each function, and any
spec syntax beyond plain names (``"torch.optim.<Name>"``, ``"timm:<name>"``,
``"conv4-<width>"``), belongs to the module that owns the registry:
:mod:`implicit_meta.solvers.registry` and :mod:`implicit_meta.models.registry`.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

EntryT = TypeVar("EntryT")
FunctionT = TypeVar("FunctionT", bound=Callable[..., Any])


def close_matches(name: str, candidates: Iterable[str]) -> list[str]:
    """The (at most three) candidates that look most like ``name``, best first.

    Case is ignored, so that ``"torch.optim.sgd"`` finds ``"SGD"``.

    Args:
        name: A name that was not found.
        candidates: The names that exist.

    Returns:
        The close matches, as :func:`difflib.get_close_matches` finds them.

    Example:
        >>> close_matches("bfgs", ["sgd", "adam", "lbfgs"])
        ['lbfgs']
        >>> close_matches("sgd", ["SGD", "Adam"])
        ['SGD']
    """
    by_folded: dict[str, str] = {}
    for candidate in candidates:
        by_folded.setdefault(candidate.casefold(), candidate)
    found = difflib.get_close_matches(name.casefold(), list(by_folded), n=3, cutoff=0.6)
    return [by_folded[match] for match in found]


def did_you_mean(matches: Sequence[str]) -> str:
    """``" (did you mean 'a', 'b' or 'c'?)"`` for an error message, or ``""`` without any.

    Args:
        matches: Close matches, best first (see :func:`close_matches`).

    Returns:
        The clause, with a leading space, or an empty string.

    Example:
        >>> did_you_mean(["lbfgs"])
        " (did you mean 'lbfgs'?)"
        >>> did_you_mean(["AdamW", "Adam", "RAdam"])
        " (did you mean 'AdamW', 'Adam' or 'RAdam'?)"
        >>> did_you_mean([])
        ''
    """
    if not matches:
        return ""
    quoted = [repr(match) for match in matches]
    options = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    return f" (did you mean {options}?)"


class Registry(Generic[EntryT]):
    """Named entries: register (by decorator or call), look up, list by pattern, unregister.

    An entry is whatever the owning module records for a name: the function itself, or a frozen
    dataclass holding the function beside what the registry knows of it. A name is taken once:
    registering a different entry under it raises unless ``overwrite=True``, and registering an
    equal entry again (the same function with the same options) changes nothing.

    Args:
        kind: What the entries are, for messages (``"inner solver"``, ``"backbone"``).
        decorator: The public decorator's name, for messages (``"register_backbone"``).
        hint: Appended to the message of an unknown name (how to register one, say).

    Example:
        >>> colours: Registry[str] = Registry("colour", decorator="register_colour")
        >>> colours.add("red", "#f00")
        >>> colours.add("green", "#0f0")
        >>> colours.names("r*"), colours.get("red")
        (['red'], '#f00')
        >>> colours.get("rde")
        Traceback (most recent call last):
        ...
        ValueError: unknown colour 'rde' (did you mean 'red'?); registered colours: green, red
        >>> colours.remove("red")
        '#f00'
    """

    def __init__(self, kind: str, *, decorator: str, hint: str = "") -> None:
        self.kind = kind
        self.decorator = decorator
        self.hint = hint
        self._entries: dict[str, EntryT] = {}

    def check_name(self, name: object) -> str:
        """Return ``name`` if it is a non-empty string, else raise.

        Args:
            name: A candidate name.

        Returns:
            ``name``.

        Raises:
            ValueError: If ``name`` is not a non-empty string.

        Example:
            >>> Registry("colour", decorator="register_colour").check_name("red")
            'red'
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} name must be a non-empty string, got {name!r}")
        return name

    def add(self, name: str, entry: EntryT, *, overwrite: bool = False) -> None:
        """Record ``entry`` under ``name``.

        Args:
            name: A non-empty string.
            entry: What to record.
            overwrite: Replace a different entry already recorded under ``name``.

        Raises:
            ValueError: If ``name`` is empty, or taken by a different entry and ``overwrite``
                is false.

        Example:
            >>> colours: Registry[str] = Registry("colour", decorator="register_colour")
            >>> colours.add("red", "#f00")
            >>> colours.add("red", "#f00")  # the same entry again: nothing changes
            >>> colours.add("red", "#e00")
            Traceback (most recent call last):
            ...
            ValueError: a colour named 'red' is already registered; pass overwrite=True ...
        """
        self.check_name(name)
        known = self._entries.get(name)
        if known is not None and not overwrite and not (known is entry or known == entry):
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered; pass overwrite=True to "
                "replace it, or choose another name"
            )
        self._entries[name] = entry

    def decorator_for(
        self,
        name: str | None,
        make_entry: Callable[[FunctionT], EntryT],
        *,
        overwrite: bool = False,
    ) -> Callable[[FunctionT], FunctionT]:
        """A decorator that registers a function, by default under its own name, unchanged.

        Args:
            name: The name to register under; ``None`` for the function's ``__name__``.
            make_entry: Builds the entry recorded for the decorated function.
            overwrite: Passed to :meth:`add`.

        Returns:
            The decorator; it returns the function it is given, as it was.

        Raises:
            ValueError: At once, if ``name`` is given but is not a non-empty string; when the
                decorator is applied, if the function has no name of its own (a lambda) and
                none is given, or the name is taken (see :meth:`add`).

        Example:
            >>> shouts: Registry[Callable[[str], str]] = Registry("shout", decorator="shout")
            >>> @shouts.decorator_for(None, lambda fn: fn)
            ... def loud(text):
            ...     return text.upper()
            >>> shouts.get("loud") is loud, loud("hi")
            (True, 'HI')
        """
        if name is not None:
            self.check_name(name)

        def register(function: FunctionT) -> FunctionT:
            if not callable(function):
                raise TypeError(
                    f"{self.kind} {name!r} must be callable, got {type(function).__name__}"
                )
            key = name if name is not None else self._function_name(function)
            self.add(key, make_entry(function), overwrite=overwrite)
            return function

        return register

    def _function_name(self, function: Callable[..., Any]) -> str:
        """The name a decorator without a name registers ``function`` under."""
        found = getattr(function, "__name__", None)
        if not isinstance(found, str) or not found.isidentifier():
            raise ValueError(
                f"the {self.kind} {function!r} has no name of its own (a lambda or a callable "
                f'object); register it with a name: {self.decorator}("name")(function)'
            )
        return found

    def get(self, name: str) -> EntryT:
        """The entry registered under ``name``.

        Args:
            name: A registered name.

        Returns:
            Its entry.

        Raises:
            ValueError: If nothing is registered under ``name`` (see :meth:`unknown`).

        Example:
            >>> colours: Registry[str] = Registry("colour", decorator="register_colour")
            >>> colours.add("red", "#f00")
            >>> colours.get("red")
            '#f00'
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise self.unknown(name) from None

    def unknown(
        self, name: object, *, known: Sequence[str] | None = None, extra: str = ""
    ) -> ValueError:
        """The error for a name that is not registered: the close matches, then every name.

        Args:
            name: The name that was not found.
            known: What to list as valid (default :meth:`names`); close matches are sought
                among those without a ``"<"`` placeholder, such as ``"timm:<name>"``.
            extra: A suggestion of the owner's own, put before the close matches.

        Returns:
            The ``ValueError`` to raise.

        Example:
            >>> colours: Registry[str] = Registry("colour", decorator="register_colour",
            ...                                   hint=" (register your own)")
            >>> print(colours.unknown("red"))
            unknown colour 'red'; registered colours: none (register your own)
        """
        listed = self.names() if known is None else list(known)
        matches = (
            close_matches(name, [n for n in listed if "<" not in n])
            if isinstance(name, str)
            else []
        )
        suggestions = ([extra] if extra else []) + [m for m in matches if m != extra]
        return ValueError(
            f"unknown {self.kind} {name!r}{did_you_mean(suggestions)}; registered "
            f"{self.kind}s: {', '.join(listed) or 'none'}{self.hint}"
        )

    def remove(self, name: str) -> EntryT:
        """Unregister ``name`` and return its entry.

        Args:
            name: A registered name.

        Returns:
            The entry it had.

        Raises:
            KeyError: If nothing is registered under ``name`` (the message names the close
                matches).

        Example:
            >>> colours: Registry[str] = Registry("colour", decorator="register_colour")
            >>> colours.add("red", "#f00")
            >>> colours.remove("red"), colours.names()
            ('#f00', [])
        """
        if name not in self._entries:
            matches = close_matches(name, self._entries) if isinstance(name, str) else []
            raise KeyError(f"no {self.kind} named {name!r} is registered{did_you_mean(matches)}")
        return self._entries.pop(name)

    def names(self, pattern: str | None = None) -> list[str]:
        """The registered names, sorted; only those matching ``pattern`` if it is given.

        Args:
            pattern: A shell-style pattern (:func:`fnmatch.fnmatchcase`: ``*``, ``?``,
                ``[seq]``), as in timm's ``list_models("resnet*")``; case-sensitive.

        Returns:
            The sorted names.

        Example:
            >>> colours: Registry[str] = Registry("colour", decorator="register_colour")
            >>> for name in ("red", "green", "grey"):
            ...     colours.add(name, name)
            >>> colours.names(), colours.names("gr*")
            (['green', 'grey', 'red'], ['green', 'grey'])
        """
        return filter_names(sorted(self._entries), pattern)

    def items(self) -> list[tuple[str, EntryT]]:
        """The ``(name, entry)`` pairs, sorted by name.

        Returns:
            The pairs.

        Example:
            >>> colours: Registry[str] = Registry("colour", decorator="register_colour")
            >>> colours.add("red", "#f00")
            >>> colours.items()
            [('red', '#f00')]
        """
        return sorted(self._entries.items(), key=lambda item: item[0])

    def __contains__(self, name: object) -> bool:
        """Whether ``name`` is registered."""
        return isinstance(name, str) and name in self._entries


def filter_names(names: Iterable[str], pattern: str | None) -> list[str]:
    """The names that match a shell-style ``pattern`` (all of them for ``None``), in order.

    Args:
        names: Names, or specs such as ``"conv4-<width>"``.
        pattern: A :func:`fnmatch.fnmatchcase` pattern, or ``None``.

    Returns:
        The matching names.

    Raises:
        TypeError: If ``pattern`` is neither a string nor ``None``.

    Example:
        >>> filter_names(["conv4", "conv4-<width>", "timm:<name>"], "timm:*")
        ['timm:<name>']
    """
    if pattern is None:
        return list(names)
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a string or None, got {type(pattern).__name__}")
    return [name for name in names if fnmatch.fnmatchcase(name, pattern)]
