"""Exceptions shared by several modules (kept here so that no two modules import each other)."""


class DataError(ValueError):
    """Bad or unreadable data: the CLI turns it into exit code 2 with this message."""
