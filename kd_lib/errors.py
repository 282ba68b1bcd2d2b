"""The one error base of kdflow: every error a user can cause derives from ``KdflowError``.

An error carries its *cause* (what went wrong, naming the field, file, URI or value) and its
*fix* (what to do about it). The CLI prints the two as ``error:`` and ``fix:`` lines; a failed
pipeline task prints them as its last lines. Errors of a kind subclass this base and set
``default_fix`` for the case where the raising code has no more specific advice.

This module is the bottom layer: it imports nothing from kdflow.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar, TextIO


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


# A failed pipeline task prints its error's cause and fix on lines that start with these
# (``reported``); the local runner reads them back from the task's log (``read_reported``) and
# ends the run with them, instead of KFP's "Inner task failed".
CAUSE_MARKER = "kdflow-error: "
FIX_MARKER = "kdflow-fix: "


def report_lines(err: KdflowError) -> list[str]:
    """The marker lines of ``err``: one per non-blank line of its cause, then of its fix."""
    cause = [line for line in str(err.cause).splitlines() if line.strip()] or [type(err).__name__]
    fix = [line for line in err.fix.splitlines() if line.strip()]
    return [CAUSE_MARKER + line for line in cause] + [FIX_MARKER + line for line in fix]


@contextlib.contextmanager
def reported(stream: TextIO | None = None) -> Iterator[None]:
    """Print the cause and fix of a ``KdflowError`` leaving the block as marker lines (to
    ``stream``, default stderr), then let it propagate.

    A KFP component's body runs in this block: its task's log then names the error in a form
    the local runner (``read_reported``) and a person reading a pod's log can find.
    """
    try:
        yield
    except KdflowError as err:
        print("\n".join(report_lines(err)), file=stream or sys.stderr, flush=True)
        raise


def read_reported(lines: Iterable[str]) -> tuple[str, str] | None:
    """The ``(cause, fix)`` of the last error ``reported`` printed among ``lines`` (a task's log;
    its lines may be indented), or None when there is none."""
    blocks: list[tuple[list[str], list[str]]] = []  # (cause lines, fix lines) per report
    in_block = False
    for line in lines:
        text = line.strip()
        for index, marker in enumerate((CAUSE_MARKER, FIX_MARKER)):
            if text.startswith(marker):
                if not in_block:
                    blocks.append(([], []))
                blocks[-1][index].append(text[len(marker) :])
                break
        in_block = text.startswith((CAUSE_MARKER, FIX_MARKER))
    if not blocks or not blocks[-1][0]:
        return None
    cause, fix = blocks[-1]
    return "\n".join(cause), "\n".join(fix)
