"""The one exception type users see.

Every expected failure (bad file, bad flag, missing data, untrusted pickle ...) is raised as a
``CifarkitError`` with a message saying what went wrong and a hint saying what to do. The CLI prints
it as one line and exits non-zero; library users can catch it.
"""
from __future__ import annotations


class CifarkitError(Exception):
    """An error with a human message and an actionable hint.

    ``exit_code`` lets the CLI distinguish usage errors (2) from runtime failures (1).
    """

    def __init__(self, message: str, hint: str | None = None, exit_code: int = 1):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code

    def __str__(self) -> str:  # one line, always
        text = self.message if not self.hint else f"{self.message} -- {self.hint}"
        return " ".join(text.split())


class TrainingInterrupted(CifarkitError):
    """Raised after Ctrl-C once a resumable checkpoint was saved."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint, exit_code=130)


def closest(name: str, choices) -> str:
    """A 'did you mean' fragment for an unknown name, or '' when nothing is close."""
    import difflib

    match = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f"did you mean {', '.join(match)}? " if match else ""
