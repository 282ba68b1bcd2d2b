"""Per-epoch progress: a tqdm bar on a terminal, one parseable plain line per epoch elsewhere."""

from __future__ import annotations

import io

import pytest

from kd_lib.train.progress import EpochProgress, format_epoch, resolve_mode


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


ROWS = [
    {
        "epoch": e,
        "train_loss": 1.0 / e,
        "val_loss": 0.5 / e,
        "val_accuracy": 0.8 + 0.05 * e,
        "lr": 1e-3,
        "seconds": 0.25,
    }
    for e in (1, 2, 3)
]


def _feed(progress: EpochProgress) -> None:
    with progress:
        for row in ROWS:
            progress(row)
        progress.done(best_epoch=3, epochs_run=3, best_val_accuracy=0.95, stopped_early=True)


def test_plain_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDFLOW_PROGRESS", raising=False)
    out = io.StringIO()
    _feed(EpochProgress("distill", 40, stream=out))
    lines = out.getvalue().splitlines()
    assert lines[:3] == [format_epoch("distill", 40, row) for row in ROWS]
    assert lines[0] == "distill epoch 1/40  train_loss 1.0000  val_loss 0.5000  val_acc 0.8500  lr 1.0e-03  0.25s"
    assert lines[3] == "distill done: best val_acc 0.9500 at epoch 3 of 3, stopped early"
    assert "\r" not in out.getvalue()


def test_the_closing_line_names_the_kept_epoch_under_keep_last(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDFLOW_PROGRESS", raising=False)
    out = io.StringIO()
    with EpochProgress("distill", 3, stream=out) as progress:
        for row in ROWS:
            progress(row)
        progress.done(best_epoch=3, epochs_run=3, best_val_accuracy=0.95, stopped_early=False, keep="last")
    assert out.getvalue().splitlines()[-1] == "distill done: kept the last epoch (3 of 3), val_acc 0.9500"


def test_a_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KDFLOW_PROGRESS", raising=False)
    out = FakeTerminal()
    _feed(EpochProgress("train_teacher", 3, stream=out))
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    assert "train_teacher: 100%" in text and "3/3" in text and "val_acc=0.9500" in text
    assert "epoch 1/3" not in text  # no plain lines
    assert text.rstrip().endswith("train_teacher done: best val_acc 0.9500 at epoch 3 of 3, stopped early")


def test_the_environment_overrides_the_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KDFLOW_PROGRESS", "plain")
    assert resolve_mode(None, FakeTerminal()) == "plain"
    monkeypatch.setenv("KDFLOW_PROGRESS", "off")
    out = io.StringIO()
    _feed(EpochProgress("distill", 3, stream=out))
    assert out.getvalue() == ""
    monkeypatch.setenv("KDFLOW_PROGRESS", "fancy")
    with pytest.raises(ValueError, match="KDFLOW_PROGRESS"):
        resolve_mode(None, io.StringIO())
