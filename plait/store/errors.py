"""Errors raised by the store: one type, so callers (CLI, server) can report them in one line."""

from plait.errors import PlaitError


class StoreError(PlaitError):
    """The database cannot be opened or written: bad URL, missing driver, unreachable server."""
