"""Errors the user can fix: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit code 2."""
