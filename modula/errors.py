"""The one base of every error modula raises for a user to read.

``modula`` prints a :class:`ModulaError` as one line (``error: <message>``) and exits with its
``exit_code``; any other exception is a bug and keeps its traceback (docs/architecture.md,
"Errors"). Subclasses that replace a built-in exception also derive from it (a missing file
is still a ``FileNotFoundError``), so code that caught the built-in one still does.
"""

from __future__ import annotations

__all__ = ["ModulaError", "UnknownName", "UsageError"]


class ModulaError(Exception):
    """A problem the user can fix; the message says what and, where it can, how."""

    exit_code = 1

    def __str__(self) -> str:
        # one plain line, also for the subclasses that are KeyErrors (which would quote it)
        return str(self.args[0]) if len(self.args) == 1 else super().__str__()


class UsageError(ModulaError):
    """A command-line value outside the values it allows."""

    exit_code = 2


class UnknownName(ModulaError, KeyError):
    """A name (domain, stage, variant) that is not among the ones known; the message lists them."""
