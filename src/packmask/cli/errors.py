"""The CLI's exit statuses and its one error type.

Every error a user can act on is printed as one line, ``error: <problem> (fix: <fix>)``:

    >>> str(CLIError("docs.jsonl, line 3: field 'text' is missing or null", "add the text, or pass --skip-invalid"))
    "docs.jsonl, line 3: field 'text' is missing or null (fix: add the text, or pass --skip-invalid)"
"""
from __future__ import annotations

__all__ = ["CLIError", "Terminated", "EXIT_USAGE", "EXIT_FAILED", "EXIT_SIGINT", "EXIT_SIGTERM", "STOPS",
           "raise_if_stopped"]

EXIT_USAGE = 2      # the user can fix it: bad path, column, option, record
EXIT_FAILED = 1     # the command ran and found a problem (verify failed, a benchmark check failed) or crashed
EXIT_SIGINT = 130   # 128 + SIGINT, as shells report it
EXIT_SIGTERM = 143  # 128 + SIGTERM


class CLIError(Exception):
    """A problem the user can fix; printed as one line ``error: <problem> (fix: <fix>)``."""

    def __init__(self, problem: str, fix: str | None = None, exit_code: int = EXIT_USAGE):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.problem} (fix: {self.fix})" if self.fix else self.problem


class Terminated(KeyboardInterrupt):
    """Raised by the CLI's SIGTERM handler, so a ``kill`` unwinds like Ctrl-C: every ``finally``
    runs and a half-written temporary file is removed (a ``KeyboardInterrupt`` subclass, so no
    library's ``except Exception`` swallows it)."""


#: the signals the CLI's handlers received (SIGINT / SIGTERM numbers). Their exception can land where Python
#: swallows it (a ``__del__`` run by the garbage collector: "Exception ignored in ..."), so this record counts
STOPS: list[int] = []

_SIGTERM = 15


def raise_if_stopped() -> None:
    """:class:`Terminated` (SIGTERM) or :class:`KeyboardInterrupt` (Ctrl-C) if one arrived, even one whose
    exception was swallowed: checked before outputs are committed and after a command returns, so a stop
    never ends in a committed write.

    >>> def stopped_with(signals):   # (a KeyboardInterrupt escaping a doctest would stop the test runner)
    ...     STOPS[:] = signals
    ...     try:
    ...         raise_if_stopped()
    ...     except KeyboardInterrupt as stop:
    ...         return type(stop).__name__
    ...     finally:
    ...         STOPS.clear()
    >>> stopped_with([]), stopped_with([15]), stopped_with([2])
    (None, 'Terminated', 'KeyboardInterrupt')
    """
    if STOPS:
        raise Terminated() if _SIGTERM in STOPS else KeyboardInterrupt()
