"""Errors a user can act on.

`UserError` means the input was wrong (path, recipe, value, data): the CLI prints its message
and exits with code 2. Anything else is an internal failure (exit 1).
"""


class UserError(ValueError):
    """Bad input: the message says what was expected, what was found, and where."""
