"""Start a step's ranks on this machine: torchrun as a child process of the step.

A step whose ``train.distributed.nproc_per_node`` is above 1 does not train in its own
process: ``launch_step`` starts ``python -m torch.distributed.run`` (torchrun) with that many
ranks, each running ``kd_lib.launch.worker`` (which calls the same step function on every
rank), waits for them, and returns what rank 0 wrote. What a rank does inside the group is
``kd_lib.train.ranks``.

Failures are never hangs: each rank records an exception it dies of in a file read here (so
the step fails with *that* rank's message, not with the collective error the others then
see), and torchrun stops the surviving ranks when one exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any

from kd_lib.config import DistributedConfig
from kd_lib.train.ranks import ERROR_DIR_ENV, DistributedError, threads_per_process

__all__ = [
    "ERROR_DIR_ENV",
    "WORKER_MODULE",
    "DistributedError",
    "first_error",
    "launch",
    "launch_step",
    "torchrun_command",
]

# The module every rank of a kdflow step runs.
WORKER_MODULE = "kd_lib.launch.worker"


def first_error(error_dir: str | Path) -> str | None:
    """The message of the rank that failed first (a killed rank only when no other failed), or None.

    When one rank dies, the others then fail too, in a collective ("connection closed by
    peer") or by torchrun's SIGTERM; the earliest real exception is the cause.
    """
    records = []
    for path in sorted(Path(error_dir).glob("rank-*.json")):
        with contextlib.suppress(OSError, ValueError):
            records.append(json.loads(path.read_text()))
    if not records:
        return None
    records.sort(key=lambda r: (bool(r.get("terminated")), float(r.get("time", 0))))
    cause = records[0]
    where = f"rank {cause['rank']} of {cause['world_size']} (on {cause['host']})"
    message = f"{where} failed: {cause['type']}: {cause['message']}"
    others = [f"rank {r['rank']}: {r['type']}" for r in records[1:]]
    if others:
        message += f"\n  then: {'; '.join(others)}"
    return message + "\n" + _last_frames(cause["traceback"])


def _last_frames(tb: str, lines: int = 6) -> str:
    return "\n".join("  | " + line for line in tb.rstrip().splitlines()[-lines:])


def torchrun_command(target: str, args: list[str], nproc_per_node: int) -> list[str]:
    """``python -m torch.distributed.run --standalone ...``: one node, a rendezvous on a free port.

    ``target`` is a module (``kd_lib.launch.worker``) or a script path ending in ``.py``.
    """
    program = [target] if target.endswith(".py") else ["-m", target]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc_per_node}",
        # A failed rank fails the step: restarting the group would only repeat the error (a
        # preempted step is retried by KFP and resumes from its checkpoint instead).
        "--max-restarts=0",
        "--monitor-interval=0.5",
        *program,
        *args,
    ]


def launch(
    target: str,
    args: list[str],
    cfg: DistributedConfig,
    error_dir: str | Path,
    env: dict[str, str] | None = None,
) -> None:
    """Run ``target`` (a module, or a ``.py`` script) on ``cfg.nproc_per_node`` ranks under
    torchrun and wait for all of them.

    Rank output goes straight to this process's stdout (progress lines stay live); torchrun's
    own stderr is echoed and its tail kept for errors no rank could record (an import error,
    a crash in native code).

    Raises:
        DistributedError: a rank failed; the message is the first failing rank's exception.
    """
    threads = threads_per_process(cfg, cfg.nproc_per_node)
    child_env = dict(os.environ) | {ERROR_DIR_ENV: str(error_dir), "OMP_NUM_THREADS": str(threads)} | (env or {})
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(
        torchrun_command(target, args, cfg.nproc_per_node), env=child_env, stderr=subprocess.PIPE, text=True
    )

    def echo() -> None:
        for line in proc.stderr:  # type: ignore[union-attr]
            sys.stderr.write(line)
            tail.append(line.rstrip())

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        code = proc.wait()
    except BaseException:
        proc.terminate()  # this step is being stopped: take the ranks down with it
        proc.wait(timeout=30)
        raise
    reader.join(timeout=5)
    if code != 0:
        cause = first_error(error_dir)
        if cause is None:
            cause = "no rank recorded an error; torchrun's last lines:\n" + "\n".join("  | " + t for t in tail)
        elif "timed out" in cause.lower() or "timeout" in cause.lower():
            cause += (
                f"\n  (a rank waited longer than train.distributed.timeout_s = {cfg.timeout_s:g} s for the others: "
                "one of them hangs or is far slower; its log shows where it was)"
            )
        raise DistributedError(
            f"distributed training with {cfg.nproc_per_node} processes failed (exit code {code}): {cause}"
        )


def launch_step(step: str, request: dict[str, Any], cfg: DistributedConfig) -> dict[str, Any]:
    """Run a kdflow step on ``cfg.nproc_per_node`` ranks and return rank 0's summary.

    Args:
        step: ``train_teacher`` or ``distill``.
        request: The step's arguments as JSON (``config_json``, ``pipeline_run_id``, ``paths``).
        cfg: The step's ``train.distributed``.
    """
    with tempfile.TemporaryDirectory(prefix=f"kdflow-{step}-") as tmp:
        work = Path(tmp)
        summary = work / "summary.json"
        (work / "request.json").write_text(json.dumps(request | {"step": step, "summary_path": str(summary)}))
        launch(WORKER_MODULE, [str(work / "request.json")], cfg, work / "errors")
        return json.loads(summary.read_text())
