"""`kdflow run --local` shows one line per task: fed kfp.local's own log format (built with
kfp's own formatting helpers, colours included) it keeps the step lines and drops the rest."""

from __future__ import annotations

import io
import json

from kfp.local import logging_utils
from kfp.local.status import Status

from kd_lib.train.progress import format_done, format_epoch
from pipelines.local import StepDisplay


def _task_lines(task: str, status: Status, body: list[str]) -> list[str]:
    """What kfp.local prints for one task: its start, the task's own output indented, its end."""
    name = logging_utils.format_task_name(task)
    executor_input = json.dumps({"inputs": {"parameterValues": {"config_json": "{...}"}}}, indent=4)
    return [
        f"01:13:32.815 - INFO - Executing task {name}",
        "01:13:32.815 - INFO - Streamed logs:",
        "",
        "    [KFP Executor 2026-11-24 01:13:32,907 INFO]: Got executor_input:",
        *("    " + line for line in executor_input.splitlines()),
        *("    " + line for line in body),
        f"01:13:51.946 - INFO - Task {name} finished with status {logging_utils.format_status(status)}",
        "-" * 80,
    ]


ROW = {"epoch": 2, "train_loss": 0.5, "val_loss": 0.4, "val_accuracy": 0.91, "lr": 1e-3, "seconds": 0.2}


class Utf8Out(io.StringIO):
    encoding = "utf-8"  # a terminal's; StringIO has none, and the display then draws ASCII marks


def _run(lines: list[str], live: bool) -> tuple[StepDisplay, str, str, str]:
    out, err, log = Utf8Out(), io.StringIO(), io.StringIO()
    display = StepDisplay(out, err, log, live=live)
    for line in lines:  # kfp prints line by line, sometimes in pieces
        display.write(line[:10])
        display.write(line[10:] + "\n")
    display.close_partial()
    return display, out.getvalue(), err.getvalue(), log.getvalue()


def test_one_line_per_task_with_time_and_result() -> None:
    body = [format_epoch("train_teacher", 40, ROW), format_done("train_teacher", 2, 2, 0.91, False)]
    lines = _task_lines("prepare-data", Status.SUCCESS, ["loading digits"])
    lines += _task_lines("train-teacher", Status.SUCCESS, body)
    lines.append("01:14:16.232 - INFO - Skipping conditional task condition-1 (condition evaluated to False)")
    display, out, err, log = _run(lines, live=False)
    shown = out.splitlines()
    assert [line.split()[:2] for line in shown] == [
        ["▸", "prepare-data"],
        ["✓", "prepare-data"],
        ["▸", "train-teacher"],
        ["✓", "train-teacher"],
        ["–", "condition-1"],
    ]
    assert shown[3].endswith("s  best val_acc 0.9100 at epoch 2 of 2")
    assert "skipped" in shown[4]
    assert [(s["task"], s["status"]) for s in display.steps] == [
        ("prepare-data", "SUCCESS"),
        ("train-teacher", "SUCCESS"),
    ]
    assert err == ""
    assert "Got executor_input" in log and "\x1b[" not in log  # everything kept, colours stripped


def test_a_failed_task_shows_its_own_log_without_the_executor_input() -> None:
    body = [
        "Traceback (most recent call last):",
        '  File "x.py", line 1',
        "kd_lib.data.dataset.DataError: nope.npz: no such file",
    ]
    lines = _task_lines("prepare-data", Status.FAILURE, body)
    display, out, err, _ = _run(lines, live=False)
    assert out.splitlines()[-1].split()[:2] == ["✗", "prepare-data"] and out.rstrip().endswith("FAILED")
    assert "log of the failed task prepare-data" in err
    assert "DataError: nope.npz: no such file" in err
    assert "config_json" not in err and "parameterValues" not in err
    assert display.steps[0]["status"] == "FAILURE"


def test_live_progress_on_a_terminal_redraws_one_line() -> None:
    lines = _task_lines("distill", Status.SUCCESS, [format_epoch("distill", 60, ROW)])
    _, out, _, _ = _run(lines, live=True)
    assert "\r\x1b[K  ▸ distill" in out and "epoch 2/60  val_acc 0.9100" in out
    assert out.endswith("\n") and out.count("\n") == 1  # the finished line replaced the live one
