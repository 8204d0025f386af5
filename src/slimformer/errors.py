"""Errors a user can act on.

`UserError` means the input was wrong (path, recipe, value, data): the CLI prints its message
and exits with code 2. Anything else is an internal failure (exit 1).
"""

from __future__ import annotations

import reprlib
from typing import Any


class UserError(ValueError):
    """Bad input: the message says what was expected, what was found, and where."""


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother = 2, 40, 40
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 5


def shown(value: Any, most: int = 160) -> str:
    """repr() of a user-provided value, cut to at most about `most` characters: a message must stay
    readable (and cheap to build) however large or deeply nested the value is."""
    text = _SHOWN.repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."
