"""The frame every KFP task runs its step in (``components/<step>.py``: ``with task(): ...``).

Two things every task needs and no step should repeat:

- its error, if it is a ``KdflowError``, printed as cause and fix marker lines
  (``kd_lib.errors.reported``), so the local runner and a person reading a pod's log see the
  step's own error, not only KFP's "Inner task failed";
- a quick exit. A task is a fresh Python process; with torch and MLflow loaded, the garbage
  collection at interpreter shutdown took 1.2-2 s per task on 2 cores (bench/overhead.py).
  ``gc.freeze()`` at exit moves every live object out of the collector's reach, so shutdown
  skips that walk. Everything a step writes is closed by then (outputs are written with
  ``write_text``/``with open``, MLflow commits per call), so nothing is lost.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
from collections.abc import Iterator

from kd_lib.errors import reported

_exit_registered = False


@contextlib.contextmanager
def task() -> Iterator[None]:
    """Run a component's body: report a ``KdflowError``'s cause and fix, and exit quickly."""
    global _exit_registered
    if not _exit_registered:
        atexit.register(gc.freeze)
        _exit_registered = True
    with reported():
        yield
