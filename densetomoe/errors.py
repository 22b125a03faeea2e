"""Exceptions the library raises for the CLI to turn into exit codes."""


class UsageError(ValueError):
    """Bad input that the user can fix; the message says how. The CLI prints it on one line, exit 2."""
