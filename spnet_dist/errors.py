"""Errors that end a run with one clear message (the CLI prints them as one line and exits with code 2)."""


class SpnetError(RuntimeError):
    """A stop the user can act on: the message names what is wrong and what to do."""
