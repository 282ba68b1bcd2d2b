"""A failed task's own error ends a local run: the cause and fix it printed (kd_lib.errors.reported),
read back from kfp.local's log format, and the CLI's last two lines made of them."""

from __future__ import annotations

import io
import traceback
from pathlib import Path

import pytest
from kfp.local.status import Status

from kd_lib.errors import KdflowError, read_reported, report_lines, reported
from pipelines import cli
from pipelines.local import LocalRunResult, StepDisplay, task_error
from tests.pipelines.test_local_display import _run, _task_lines


class NopeError(KdflowError):
    default_fix = "point data.source at an existing file"


def _traceback_of(err: BaseException) -> list[str]:
    """The lines Python prints for ``err`` leaving a task (what its log then ends with)."""
    try:
        raise err
    except BaseException as raised:  # noqa: BLE001 - any error: its printed form is the point
        return "".join(traceback.format_exception(raised)).splitlines()


def _failed(body: list[str], task: str = "prepare-data") -> StepDisplay:
    display, *_ = _run(_task_lines(task, Status.FAILURE, body), live=False)
    return display


def test_reported_prints_cause_and_fix_and_reraises() -> None:
    stream = io.StringIO()
    with pytest.raises(NopeError), reported(stream):
        raise NopeError("nope.npz: no such file\nsecond line", "use digits")
    assert stream.getvalue().splitlines() == [
        "kdflow-error: nope.npz: no such file",
        "kdflow-error: second line",
        "kdflow-fix: use digits",
    ]
    assert read_reported(stream.getvalue().splitlines()) == ("nope.npz: no such file\nsecond line", "use digits")


def test_reported_leaves_other_errors_alone() -> None:
    stream = io.StringIO()
    with pytest.raises(ZeroDivisionError), reported(stream):
        _ = 1 / 0
    assert stream.getvalue() == ""
    assert read_reported(["nothing", "  to see"]) is None


def test_the_default_fix_is_reported_and_the_last_report_wins() -> None:
    first, second = report_lines(NopeError("first")), report_lines(NopeError("second", "do this"))
    assert first == ["kdflow-error: first", "kdflow-fix: point data.source at an existing file"]
    assert read_reported(["    " + line for line in [*first, "other output", *second]]) == ("second", "do this")


def test_a_failed_task_gives_the_cause_and_fix_it_reported() -> None:
    err = NopeError("/data/nope.npz: no such file", "set data.source to an existing .npz file")
    body = ["loading /data/nope.npz", *report_lines(err), *_traceback_of(err)]
    display = _failed(body)
    assert [task for task, _ in display.failures] == ["prepare-data"]
    assert task_error(display.failures[0][1]) == (
        "/data/nope.npz: no such file",
        "set data.source to an existing .npz file",
    )


def test_without_a_report_the_cause_is_the_exception_line_of_the_traceback() -> None:
    try:
        try:
            int("x")
        except ValueError as inner:
            raise RuntimeError("torch exploded") from inner
    except RuntimeError as err:
        lines = "".join(traceback.format_exception(err)).splitlines()
    display = _failed(["step output", *lines], task="distill")
    assert task_error(display.failures[0][1]) == ("RuntimeError: torch exploded", "")
    assert task_error(["no traceback here"]) is None


def _result(tmp_path: Path, **failure: str) -> LocalRunResult:
    return LocalRunResult(
        pipeline_run_id="kdflow-x",
        succeeded=False,
        error="Pipeline 'kdflow-x' finished with status FAILURE. Inner task failed: 'prepare-data'.",
        pipeline_root=tmp_path,
        wall_s=1.0,
        parent_run_id=None,
        log_path=tmp_path / "kfp-local.log",
        **failure,  # type: ignore[arg-type]
    )


def test_kdflow_run_ends_with_the_failed_tasks_cause_and_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    failure = {"failed_task": "prepare-data", "failure_cause": "nope.npz: no such file", "failure_fix": "use digits"}
    monkeypatch.setattr("pipelines.local.run_local", lambda cfg, root, verbose: _result(tmp_path, **failure))
    code = cli.main(["run", "--local", str(Path(__file__).parents[2] / "configs" / "demo.yaml")])
    last = capsys.readouterr().err.splitlines()[-2:]
    assert code == 1
    assert last == ["error: task prepare-data failed: nope.npz: no such file", "fix: use digits"]


def test_kdflow_run_without_the_tasks_error_points_at_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("pipelines.local.run_local", lambda cfg, root, verbose: _result(tmp_path))
    cli.main(["run", "--local", str(Path(__file__).parents[2] / "configs" / "demo.yaml")])
    last = capsys.readouterr().err.splitlines()[-2:]
    assert last[0] == "error: Pipeline 'kdflow-x' finished with status FAILURE. Inner task failed: 'prepare-data'."
    assert last[1].startswith("fix: read the failed task's log above (full log: ")


def test_kdflow_run_warns_about_a_too_short_distillation_before_the_run_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before_run: list[str] = []

    def fake_run(cfg: object, root: object, verbose: object) -> object:
        before_run.append(capsys.readouterr().err)  # what stderr held when the run began
        return _result(tmp_path)

    monkeypatch.setattr("pipelines.local.run_local", fake_run)
    demo = str(Path(__file__).parents[2] / "configs" / "demo.yaml")
    cli.main(["run", "--local", demo, "--set", "distill.train.epochs=8"])
    (err,) = before_run
    assert "warning: distill.train.epochs is 8" in err and "  fix: set distill.train.epochs to at least 30" in err
    before_run.clear()
    capsys.readouterr()  # the fake run's failure, printed after it
    cli.main(["run", "--local", demo])
    assert before_run == [""]  # the demo's own schedule is long enough: no warning
