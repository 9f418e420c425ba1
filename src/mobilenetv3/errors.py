"""Exceptions that describe a user's mistake.

The CLI prints a `UserError` as one line (no traceback) and exits with status 2; library callers get
an ordinary exception (it subclasses ValueError) they can catch.
"""


class UserError(ValueError):
    """A problem with the user's input: a bad name, file, option or data."""


class UnknownModelError(UserError, KeyError):
    """An unknown model name (the message lists close matches)."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (libraries' messages often go on for pages), or its type name
    when it has none: what a one-line error quotes as the reason."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
