"""The one error base of kdflow: every error a user can cause derives from ``KdflowError``.

An error carries its *cause* (what went wrong, naming the field, file, URI or value) and its
*fix* (what to do about it). The CLI prints the two as ``error:`` and ``fix:`` lines; a failed
pipeline task prints them as its last lines. Errors of a kind subclass this base and set
``default_fix`` for the case where the raising code has no more specific advice.

This module is the bottom layer: it imports nothing from kdflow.
"""

from __future__ import annotations

from typing import Any, ClassVar


class KdflowError(Exception):
    """An error the user can act on: ``cause`` says what went wrong, ``fix`` what to do.

    Args:
        cause: What went wrong, naming the field, file, URI or value at fault. It may already
            end in a remedy ("...; use X"): many messages were written that way.
        fix: What to do about it. Empty means the class's ``default_fix``; an explicit fix is
            also appended to ``str(err)`` (``"cause; fix"``) so plain tracebacks show it.
    """

    default_fix: ClassVar[str] = "re-run with --debug for the full traceback"

    def __init__(self, cause: str, fix: str = "") -> None:
        super().__init__(f"{cause}; {fix}" if fix else cause)
        self.cause = cause
        self.fix = fix or self.default_fix
        self._explicit_fix = fix

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep cause and fix apart across processes (torchrun ranks, multiprocessing).
        return (self.__class__, (self.cause, self._explicit_fix))
