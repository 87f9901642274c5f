"""The base of every error a user can cause (bad file, bad option, bad data): stages print its one line
and exit instead of showing a traceback. Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input; the message names the file, key or option."""
