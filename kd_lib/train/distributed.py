"""Data-parallel training over several processes: what a rank needs, and how a step starts them.

A step whose ``train.distributed.nproc_per_node`` is above 1 does not train in its own
process: ``launch_step`` starts ``python -m torch.distributed.run`` (torchrun) with that many
ranks, each running ``kd_lib.launch.worker``, waits for them, and returns what rank 0 wrote.
Inside a rank, ``init`` joins the process group and ``current()`` returns the ``Ranks`` that
the training loop (``kd_lib.train.loop._fit``) uses to split every global batch, all-reduce
the epoch's sums and share the teacher-logit cache. Outside torchrun ``current()`` is None
and training is exactly the single-process loop.

Failures are never hangs: each rank records an exception it dies of in a file the launcher
reads (so the step fails with *that* rank's message, not with the collective error the others
then see), torchrun stops the surviving ranks when one exits, and every collective gives up
after ``distributed.timeout_s``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from kd_lib.config import ConfigError, DistributedConfig
from kd_lib.errors import KdflowError

# Where each rank writes the exception it died of (one JSON file per rank); set by the launcher.
ERROR_DIR_ENV = "KDFLOW_DIST_ERROR_DIR"
# The module every rank of a kdflow step runs.
WORKER_MODULE = "kd_lib.launch.worker"
# Seeds the global RNG (dropout) of rank r with seed + r * _RANK_SEED_STRIDE: rank 0 keeps the
# single-process seed, and the other ranks' streams are neither rank 0's nor the
# augmentation generator's (seeded seed + 1).
_RANK_SEED_STRIDE = 1_000_003


class DistributedError(KdflowError, RuntimeError):
    """A rank of a multi-process step failed or timed out; the message is that rank's error."""


@dataclass(frozen=True)
class Ranks:
    """This process's place in the process group, and the collectives training needs.

    Attributes:
        rank: 0 .. world_size - 1; rank 0 alone writes (MLflow, checkpoints, the model).
        world_size: Number of processes over all nodes.
        local_rank: Index on this node (picks the GPU).
        device: Where this rank trains.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed(self, seed: int) -> int:
        """The global-RNG seed of this rank: ``seed`` itself on rank 0."""
        return seed + self.rank * _RANK_SEED_STRIDE

    def bounds(self, n: int) -> tuple[int, int]:
        """``[lo, hi)`` of this rank's contiguous part of ``n`` items; sizes differ by at most one."""
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum each value over the ranks (float64, so integer counts stay exact)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_gather_rows(self, local: Tensor, n: int) -> Tensor:
        """Concatenate every rank's ``bounds(n)`` rows, in rank order: ``[n, *local.shape[1:]]``.

        Args:
            local: ``[hi - lo, ...]`` this rank's rows, on ``device``.
            n: Total rows over all ranks.
        """
        size = -(-n // self.world_size)  # all_gather needs equal shapes: pad every part to the largest
        padded = local.new_zeros((size, *local.shape[1:]))
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        rows = []
        for r, part in enumerate(parts):
            lo, hi = r * n // self.world_size, (r + 1) * n // self.world_size
            rows.append(part[: hi - lo])
        return torch.cat(rows)

    def all_gather_bytes(self, data: Tensor) -> list[Tensor]:
        """Every rank's uint8 tensor of one common length (e.g. RNG states), in rank order."""
        data = data.to(self._comm_device)
        parts = [torch.empty_like(data) for _ in range(self.world_size)]
        dist.all_gather(parts, data)
        return [p.cpu() for p in parts]

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled between our own ranks only)."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self._comm_device)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        # nccl moves only CUDA tensors; gloo takes CPU ones.
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


_current: Ranks | None = None


def current() -> Ranks | None:
    """This process's ``Ranks`` inside a kdflow torchrun worker, else None (single process)."""
    return _current


def should_launch(cfg: DistributedConfig) -> bool:
    """True when a step must start torchrun: several processes wanted and not already a rank."""
    return cfg.nproc_per_node > 1 and _current is None


def backend_for(cfg: DistributedConfig, device: torch.device) -> str:
    """``auto`` -> nccl for cuda, gloo for cpu; an explicit choice must fit the device."""
    if cfg.backend == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if cfg.backend == "nccl" and device.type != "cuda":
        raise ConfigError(
            f"train.distributed.backend nccl needs a cuda device, but the device is {device}; use gloo or auto"
        )
    return cfg.backend


def threads_per_process(cfg: DistributedConfig, local_world_size: int) -> int:
    """CPU threads of each rank: the configured count, else this machine's cores shared evenly."""
    if cfg.threads_per_process is not None:
        return cfg.threads_per_process
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


@contextlib.contextmanager
def init(cfg: DistributedConfig, device_name: str) -> Iterator[Ranks]:
    """Join the process group torchrun describes in the environment; leave it on exit.

    Args:
        cfg: The step's ``train.distributed``.
        device_name: The step's ``train.device`` (``cuda`` becomes this rank's GPU).

    Raises:
        DistributedError: not started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK missing).
    """
    global _current
    from kd_lib.train.loop import resolve_device  # training imports this module

    try:
        rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except KeyError as err:
        raise DistributedError(
            f"{err.args[0]} is not set: {WORKER_MODULE} runs under torchrun, not on its own"
        ) from None
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    device = resolve_device(device_name)
    if device.type == "cuda":
        # Every rank on a node would otherwise land on GPU 0.
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    torch.set_num_threads(threads_per_process(cfg, local_world))
    backend = backend_for(cfg, device)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout_s))
    _current = Ranks(rank, world, local_rank, device)
    try:
        yield _current
    except BaseException as err:
        # Record before leaving the group: closing it is what the other ranks see fail next,
        # and the launcher names the rank whose error was written first.
        _write_error(err)
        raise
    finally:
        _current = None
        with contextlib.suppress(Exception):  # the group may already be broken by a failed peer
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Errors: each rank leaves the exception it died of where the launcher looks.
# ---------------------------------------------------------------------------------------------


def _terminate(signum: int, _frame: Any) -> None:
    # torchrun (or the kubelet) stops the surviving ranks with SIGTERM: turn it into an exception
    # so context managers run (rank 0's MLflow run ends as failed instead of staying open).
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def recording_errors() -> Iterator[None]:
    """Run a rank's work; an exception it dies of is written to ``$KDFLOW_DIST_ERROR_DIR`` first."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    except BaseException as err:
        _write_error(err)
        raise


def _write_error(err: BaseException) -> None:
    where = os.environ.get(ERROR_DIR_ENV)
    if not where or getattr(err, "_kdflow_recorded", False) or (isinstance(err, SystemExit) and err.code in (0, None)):
        return
    with contextlib.suppress(AttributeError):
        err._kdflow_recorded = True  # type: ignore[attr-defined]
    rank = os.environ.get("RANK", "?")
    record = {
        "rank": rank,
        "world_size": os.environ.get("WORLD_SIZE", "?"),
        "host": os.uname().nodename,
        "time": time.time(),
        "type": type(err).__name__,
        "message": str(err)[:4000],
        "traceback": "".join(traceback.format_exception(err))[-8000:],
        # Killed by a signal (torchrun stopping it because another rank failed): never the cause.
        "terminated": isinstance(err, SystemExit),
    }
    path = Path(where) / f"rank-{rank}.json"
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record))


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
    message = f"rank {cause['rank']} of {cause['world_size']} (on {cause['host']}) failed: {cause['type']}: {cause['message']}"
    others = [f"rank {r['rank']}: {r['type']}" for r in records[1:]]
    if others:
        message += f"\n  then: {'; '.join(others)}"
    return message + "\n" + _last_frames(cause["traceback"])


def _last_frames(tb: str, lines: int = 6) -> str:
    return "\n".join("  | " + line for line in tb.rstrip().splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------
# The launcher: torchrun as a child process of the step.
# ---------------------------------------------------------------------------------------------


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
