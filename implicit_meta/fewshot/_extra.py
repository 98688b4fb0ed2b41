"""The packages of the ``fewshot`` extra, checked before anything of the pipelines is imported.

The optimizer plug-in (``import implicit_meta``) needs only torch, torchopt and numpy; the
few-shot pipelines also need timm, Pillow, tqdm and matplotlib, installed by
``python -m pip install 'implicit-meta[fewshot]'``. Without them, importing
:mod:`implicit_meta.fewshot` says so in one line instead of failing deep inside an import.
"""

from __future__ import annotations

import importlib.util

__all__ = ["FEWSHOT_PACKAGES", "missing_packages"]

FEWSHOT_PACKAGES = ("timm", "PIL", "tqdm", "matplotlib")
"""Import names of the packages the ``fewshot`` extra installs."""


def missing_packages() -> list[str]:
    """The packages of :data:`FEWSHOT_PACKAGES` that cannot be imported here.

    Returns:
        Their import names, in the order of :data:`FEWSHOT_PACKAGES`; empty when all are present.

    Example:
        >>> missing_packages()
        []
    """
    return [name for name in FEWSHOT_PACKAGES if importlib.util.find_spec(name) is None]


_missing = missing_packages()
if _missing:
    raise ModuleNotFoundError(
        f"implicit_meta.fewshot needs {', '.join(_missing)}: install the few-shot extra with "
        "python -m pip install 'implicit-meta[fewshot]' (or -e '.[fewshot]' in a checkout)"
    )
