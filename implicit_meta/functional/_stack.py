"""Point a warning at the user's line, however deep inside the library (and torch) it is raised.

``warnings.warn(stacklevel=n)`` needs ``n`` to match the call depth, which differs between
call sites and, under ``torch.func.vmap``, includes torch's own frames. Python 3.12's
``skip_file_prefixes`` does this; the project supports 3.10, so the frames are walked here.
"""

from __future__ import annotations

import os
import sys

import torch

_SKIPPED = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (os.path.dirname(os.path.abspath(__file__)), torch.__file__)
)


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function.

    It counts the frames from that caller out to the first one whose file lies outside the
    ``implicit_meta`` package and outside torch, so that the warning names the user's line.

    Returns:
        The stack level (1 when no such frame exists).
    """
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(
        _SKIPPED
    ):
        frame = frame.f_back
        level += 1
    return level
