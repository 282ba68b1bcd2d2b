"""Per-epoch progress of a training loop: a bar on a terminal, one plain line per epoch in a log.

A pod's log (and `kdflow run --local`, which reads its tasks' output through a pipe) is not a
terminal: there a bar would print as a mess of carriage returns, so each epoch becomes one
line instead, in a fixed format that `pipelines/local.py` also reads to show live progress.
``KDFLOW_PROGRESS`` (``auto``, ``bar``, ``plain``, ``off``) overrides the choice.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType
from typing import Any, TextIO

MODES = ("auto", "bar", "plain", "off")
ENV_VAR = "KDFLOW_PROGRESS"


def format_epoch(name: str, total: int, row: dict[str, Any]) -> str:
    """The plain line for one epoch, e.g.
    ``train_teacher epoch 3/40  train_loss 0.4123  val_loss 0.3812  val_acc 0.9123  lr 1.0e-03  0.21s``."""
    return (
        f"{name} epoch {row['epoch']}/{total}  train_loss {row['train_loss']:.4f}  val_loss {row['val_loss']:.4f}  "
        f"val_acc {row['val_accuracy']:.4f}  lr {row['lr']:.1e}  {row['seconds']:.2f}s"
    )


def format_done(
    name: str, best_epoch: int, epochs_run: int, best_val_accuracy: float, stopped_early: bool, keep: str = "best"
) -> str:
    """The closing line of a training loop; ``keep`` is the run's ``TrainConfig.keep``."""
    if keep == "last":
        return f"{name} done: kept the last epoch ({best_epoch} of {epochs_run}), val_acc {best_val_accuracy:.4f}"
    early = ", stopped early" if stopped_early else ""
    return f"{name} done: best val_acc {best_val_accuracy:.4f} at epoch {best_epoch} of {epochs_run}{early}"


def resolve_mode(mode: str | None, stream: TextIO) -> str:
    """``auto`` (or None: ``$KDFLOW_PROGRESS``, else auto) -> ``bar`` on a terminal with tqdm, else ``plain``."""
    mode = mode or os.environ.get(ENV_VAR) or "auto"
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r} is not one of {', '.join(MODES)} (check ${ENV_VAR})")
    if mode != "auto":
        return mode
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "plain"


class EpochProgress:
    """Callable per epoch (an ``on_epoch`` callback); a context manager that closes the bar.

    Args:
        name: What is training (``train_teacher``, ``distill``); starts every line.
        total: The configured number of epochs (early stopping may end sooner).
        stream: Where to write; stdout by default, so that a pod's log keeps the lines in
            order with the step's other output.
        mode: ``auto``, ``bar``, ``plain`` or ``off``; None reads ``$KDFLOW_PROGRESS``.
    """

    def __init__(self, name: str, total: int, stream: TextIO | None = None, mode: str | None = None) -> None:
        self.name = name
        self.total = total
        self.stream = stream if stream is not None else sys.stdout
        self.mode = resolve_mode(mode, self.stream)
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=name, unit="epoch", file=self.stream, dynamic_ncols=True, leave=True)

    def __call__(self, row: dict[str, Any]) -> None:
        if self.mode == "plain":
            print(format_epoch(self.name, self.total, row), file=self.stream, flush=True)
        elif self._bar is not None:
            self._bar.set_postfix(
                train_loss=f"{row['train_loss']:.4f}",
                val_loss=f"{row['val_loss']:.4f}",
                val_acc=f"{row['val_accuracy']:.4f}",
                refresh=False,
            )
            self._bar.update(1)

    def done(
        self, best_epoch: int, epochs_run: int, best_val_accuracy: float, stopped_early: bool, keep: str = "best"
    ) -> None:
        """Close the bar and print the closing line (not in ``off`` mode)."""
        self.close()
        if self.mode != "off":
            line = format_done(self.name, best_epoch, epochs_run, best_val_accuracy, stopped_early, keep)
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> EpochProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
