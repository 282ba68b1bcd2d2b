"""kd_lib.steps.task: the frame a component body runs in."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kd_lib.config import ConfigError
from kd_lib.errors import read_reported
from kd_lib.steps.task import task


def test_a_kdflow_error_leaves_with_its_cause_and_fix_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError), task():
        raise ConfigError("data.source: 'nope.npz' does not exist")
    err = capsys.readouterr().err
    assert read_reported(err.splitlines()) == ("data.source: 'nope.npz' does not exist", ConfigError.default_fix)


def test_other_errors_pass_through_unreported(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(KeyError), task():
        raise KeyError("x")
    assert read_reported(capsys.readouterr().err.splitlines()) is None


def test_the_task_process_freezes_the_heap_at_exit() -> None:
    # Nothing is frozen while the task runs; the exit hook freezes the heap so that
    # interpreter shutdown skips the collector's walk.
    code = (
        "import atexit, gc\n"
        "from kd_lib.steps.task import task\n"
        "with task(): pass\n"
        "print('during', gc.get_freeze_count() > 0)\n"
        "atexit._run_exitfuncs()\n"
        "print('after', gc.get_freeze_count() > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["during", "False", "after", "True"]
