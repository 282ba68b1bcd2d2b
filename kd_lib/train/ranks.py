"""What a training process knows of its place among the ranks of a multi-process step.

Inside a rank (started by ``kd_lib.launch.torchrun`` or by a PyTorchJob's pods), ``init``
joins the process group torchrun describes in the environment and ``current()`` returns the
``Ranks`` the training loop (``kd_lib.train.loop._fit``, ``kd_lib.train.ddp``) uses to split
every global batch, all-reduce the epoch's sums and share the teacher-logit cache. Outside
torchrun ``current()`` is None and training is exactly the single-process loop.

Failures are never hangs: each rank records the exception it dies of in a file the launcher
reads (``recording_errors``; ``kd_lib.launch.torchrun.first_error`` names the rank that failed
first), and every collective gives up after ``distributed.timeout_s``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import time
import traceback
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


def is_main() -> bool:
    """Whether this process writes: a single process, or rank 0 of a multi-process step."""
    return _current is None or _current.is_main


def should_launch(cfg: DistributedConfig) -> bool:
    """True when a step must start torchrun: several processes wanted and not already a rank."""
    return cfg.nproc_per_node > 1 and _current is None


def resolve_device(name: str) -> torch.device:
    """Turn a config device name into a torch.device.

    Args:
        name: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``), or ``"auto"`` (cuda when available).

    Raises:
        ConfigError: cuda was requested on a machine without it, or the name is not a device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device; use 'cpu', 'cuda' or 'auto'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} was requested but CUDA is not available on this machine; use 'cpu' or 'auto'"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use 'cpu', 'cuda' or 'auto'")
    return device


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
    try:
        rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except KeyError as err:
        raise DistributedError(f"{err.args[0]} is not set: a kdflow rank runs under torchrun, not on its own") from None
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
