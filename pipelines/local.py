"""Run the very same DAG on this machine with KFP's own local runner (kfp.local)."""

from __future__ import annotations

import builtins
import contextlib
import os
import re
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from kd_lib.adapters import tracking
from kd_lib.config import PipelineConfig
from kd_lib.errors import read_reported

LOG_FILE = "kfp-local.log"


@dataclass
class LocalRunResult:
    """What a local run did: its id, whether every task succeeded, and what MLflow recorded."""

    pipeline_run_id: str
    succeeded: bool
    error: str
    pipeline_root: Path
    wall_s: float
    parent_run_id: str | None
    summary: dict[str, Any] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    log_path: Path | None = None
    report_path: Path | None = None
    # The first failed task and its own error, read from its log (see ``task_error``).
    failed_task: str = ""
    failure_cause: str = ""
    failure_fix: str = ""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_START = re.compile(r"Executing task '([^']+)'")
_FINISH = re.compile(r"Task '([^']+)' finished with status (\w+)")
_SKIP = re.compile(r"Skipping (?:conditional )?task (\S+)")
# The plain progress lines of kd_lib.train.progress, as a task prints them into its log.
_EPOCH = re.compile(r"^\s*\S+ epoch (\d+)/(\d+)\s+.*?val_acc (\S+)")
_DONE = re.compile(r"^\s*\S+ done: (.*)$")
_TRACEBACK = "Traceback (most recent call last):"


def task_error(log: list[str]) -> tuple[str, str] | None:
    """The ``(cause, fix)`` of a failed task, from its log.

    The marker lines ``kd_lib.errors.reported`` prints for a kdflow error give both; without
    them (an error no kdflow code raised), the cause is the last traceback's exception line
    (``Type: message``) and the fix is empty.
    """
    if reported := read_reported(log):
        return reported
    starts = [i for i, line in enumerate(log) if line.strip() == _TRACEBACK]
    if not starts:
        return None
    indent = log[starts[-1]].index(_TRACEBACK)
    # The exception line is the first after the frames at the traceback's own indent.
    for line in log[starts[-1] + 1 :]:
        if line.strip() and len(line) - len(line.lstrip()) == indent:
            kind, sep, message = line.strip().partition(": ")
            return f"{kind.rsplit('.', 1)[-1]}{sep}{message}", ""
    return None


class StepDisplay:
    """Turns kfp.local's verbose output into one line per task (file-like: it is what
    ``sys.stdout`` is while the pipeline runs).

    kfp.local prints each task's full executor input, every log line and every output
    artifact. This keeps all of it in a log file, and shows the person at the terminal only
    which task is running (with its epoch progress, live, on a terminal), how long each took,
    and, when one fails, that task's own log.

    A sweep's ParallelFor runs tasks side by side (kfp.local: 2 threads writing here at
    once): writes are serialized, each finish is matched to the earliest running task of
    that name, and while tasks overlap their output cannot be told apart, so no live
    progress is drawn and a failed task's log may hold lines of its neighbour.
    """

    def __init__(self, out: TextIO, err: TextIO, log: TextIO, live: bool | None = None) -> None:
        self.out, self.err, self.log = out, err, log
        self.live = out.isatty() if live is None else live
        utf = (getattr(out, "encoding", "") or "").lower().startswith("utf")
        self.marks = {
            "run": "▸" if utf else ">",
            "ok": "✓" if utf else "ok",
            "fail": "✗" if utf else "FAILED",
            "skip": "–" if utf else "-",
        }
        self.steps: list[dict[str, Any]] = []
        self._partial = ""
        self._task: str | None = None
        self._started = 0.0
        self._task_log: list[str] = []
        self._detail = ""
        self._in_executor_input: str | None = None
        self._running: list[list[Any]] = []  # [task, start, overlapped], in start order
        self._lock = threading.Lock()
        self.failures: list[tuple[str, list[str]]] = []  # (task, its log lines), in finish order

    # file-like interface
    def write(self, text: str) -> int:
        with self._lock:
            self._partial += text
            *lines, self._partial = self._partial.split("\n")
            for line in lines:
                self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.log.flush()

    def isatty(self) -> bool:
        return False

    def close_partial(self) -> None:
        if self._partial:
            self._line(_ANSI.sub("", self._partial))
            self._partial = ""

    # parsing
    def _line(self, line: str) -> None:
        self.log.write(line + "\n")
        if m := _START.search(line):
            self._begin(m.group(1))
        elif m := _FINISH.search(line):
            self._end(m.group(1), m.group(2))
        elif m := _SKIP.search(line):
            self._show(f"  {self.marks['skip']} {m.group(1):<16} skipped (its condition was false)\n")
        elif self._task is not None:
            self._task_line(line)

    def _task_line(self, line: str) -> None:
        # The executor input is a JSON dump of every parameter (the config included): noise in
        # a failed task's log. It opens with a "{" line after this marker and closes at that indent.
        if self._in_executor_input is not None:
            if line.rstrip() == self._in_executor_input + "}":
                self._in_executor_input = None
            elif line.strip() == "{" and self._in_executor_input == "":
                self._in_executor_input = line[: len(line) - len(line.lstrip())]
            return
        if "Got executor_input:" in line:
            self._in_executor_input = ""
            return
        self._task_log.append(line)
        if m := _EPOCH.match(line):
            self._detail = f"epoch {m.group(1)}/{m.group(2)}  val_acc {m.group(3)}"
            if self.live and len(self._running) == 1 and not self._running[0][2]:
                elapsed = time.monotonic() - self._started
                self._show(f"\r\x1b[K  {self.marks['run']} {self._task:<16} {elapsed:6.1f} s  {self._detail}")
        elif m := _DONE.match(line):
            self._detail = m.group(1)

    def _begin(self, task: str) -> None:
        overlapped = bool(self._running)
        for entry in self._running:
            entry[2] = True
        self._running.append([task, time.monotonic(), overlapped])
        self._task, self._started = task, time.monotonic()
        if not overlapped:
            self._task_log, self._detail = [], ""
            self._in_executor_input = None
        # A live line cannot be redrawn for two tasks at once: plain lines while they overlap.
        live = self.live and not overlapped
        prefix = "\n" if self.live and overlapped and len(self._running) == 2 else ""
        self._show(f"{prefix}  {self.marks['run']} {task:<16} running" + ("" if live else "\n"))

    def _end(self, task: str, status: str) -> None:
        entry = next((e for e in self._running if e[0] == task), None)
        if entry is None:  # a finish without a start: time it from the last start
            entry = [task, self._started, bool(self._running)]
        else:
            self._running.remove(entry)
        seconds = time.monotonic() - entry[1]
        ok = status == "SUCCESS"
        self.steps.append({"task": task, "status": status, "seconds": seconds})
        mark = self.marks["ok" if ok else "fail"]
        # The last progress line is this task's only if nothing ran beside it.
        detail = f"  {self._detail}" if ok and self._detail and not entry[2] else ""
        prefix = "\r\x1b[K" if self.live and not entry[2] else ""
        self._show(f"{prefix}  {mark} {task:<16} {seconds:6.1f} s{detail}" + ("" if ok else "  FAILED") + "\n")
        if not ok:
            self.failures.append((task, list(self._task_log)))
            tail = [line for line in self._task_log if line.strip()][-60:]
            mixed = " (interleaved with the tasks that ran beside it)" if entry[2] else ""
            self.err.write(f"--- log of the failed task {task} (last {len(tail)} lines){mixed} ---\n")
            self.err.write("\n".join(tail) + "\n---\n")
            self.err.flush()
        self._task = self._running[-1][0] if self._running else None

    def _show(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


class _Tee:
    """File-like: writes go to ``out`` unchanged and to ``display`` (which only reads them)."""

    def __init__(self, out: TextIO, display: StepDisplay) -> None:
        self.out, self.display = out, display

    def write(self, text: str) -> int:
        self.display.write(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()


def _report_path(client: Any, parent_run_id: str) -> Path | None:
    """The final report's file when the parent run's artifacts are on this disk."""
    uri = client.get_run(parent_run_id).info.artifact_uri
    parsed = urlparse(uri)
    if parsed.scheme not in ("", "file"):
        return None
    path = Path(parsed.path if parsed.scheme else uri) / "report.html"
    return path if path.is_file() else None


def run_local(cfg: PipelineConfig, root: str | Path = ".kdflow/runs", verbose: bool = False) -> LocalRunResult:
    """Run the pipeline with ``kfp.local.SubprocessRunner(use_venv=False)``.

    Each task is a subprocess of this Python; they inherit the environment, so the tracking
    URI is resolved (and made absolute) here once and exported for them.

    Args:
        cfg: The pipeline config.
        root: Where each invocation's task artifacts go (one fresh directory per call).
        verbose: Pass kfp.local's own output through untouched; by default it goes to
            ``<pipeline root>/kfp-local.log`` and the terminal shows one line per task.
    """
    from kfp import local

    # lazy: kfp and the components load only for the commands that build a pipeline
    from pipelines.build import build_pipeline

    uri = tracking.absolute_tracking_uri(tracking.resolve_tracking_uri(cfg))
    tracking.check_reachable(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.tracking_uri = None  # the environment carries it: no server address in the params

    # One fresh pipeline root per invocation: the single job directory kfp.local creates in
    # it tells us the job name, which is the pipeline run id the steps tagged MLflow with.
    invocation = Path(root).resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    invocation.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(invocation), raise_on_error=True)
    start = time.perf_counter()
    error = ""
    log_path = invocation / LOG_FILE
    with contextlib.ExitStack() as stack:
        if verbose:
            # kfp.local's output passes through untouched; a display that shows nothing reads
            # it too, for the failed task's own error.
            quiet = stack.enter_context(open(os.devnull, "w"))
            display = StepDisplay(quiet, quiet, quiet, live=False)
            stack.enter_context(contextlib.redirect_stdout(_Tee(sys.stdout, display)))
        else:
            log = stack.enter_context(log_path.open("w"))
            display = StepDisplay(sys.stdout, sys.stderr, log)
            stack.enter_context(contextlib.redirect_stdout(display))
            stack.enter_context(contextlib.redirect_stderr(display))
            stack.enter_context(warnings.catch_warnings())
            # kfp.local warns per task that our image is not a Python image: it is, with kd_lib.
            warnings.filterwarnings("ignore", message=".*non-Python base image.*", category=RuntimeWarning)
        # kfp.local indents task output by swapping builtins.print per task; two ParallelFor
        # tasks swapping at once can leave its wrapper installed after the run. Put it back.
        original_print = builtins.print
        try:
            build_pipeline(cfg, for_cluster=False)(config_json=cfg.to_json())
        except RuntimeError as err:  # kfp.local raises RuntimeError naming the failed task
            error = _ANSI.sub("", str(err))
        finally:
            builtins.print = original_print
            display.close_partial()
    wall = time.perf_counter() - start
    jobs = [p.name for p in invocation.iterdir() if p.is_dir()]
    run_id = jobs[0] if len(jobs) == 1 else ""
    client = tracking.client_for(cfg)
    parent = tracking.find_parent_run(client, cfg.tracking.experiment, run_id) if run_id else None
    summary = tracking.pipeline_summary(cfg, parent) if parent else {}
    # The first task that failed caused the run's failure (the exit handler may fail after it).
    failed_task, failed_log = display.failures[0] if display.failures else ("", [])
    cause, fix = task_error(failed_log) or ("", "")
    return LocalRunResult(
        pipeline_run_id=run_id,
        succeeded=not error,
        error=error,
        pipeline_root=invocation / run_id,
        wall_s=wall,
        parent_run_id=parent,
        summary=summary,
        steps=[] if verbose else display.steps,
        log_path=None if verbose else log_path,
        report_path=_report_path(client, parent) if parent else None,
        failed_task=failed_task,
        failure_cause=cause,
        failure_fix=fix,
    )
