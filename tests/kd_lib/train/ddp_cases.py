"""The training problems of tests/kd_lib/train/test_distributed.py, and one rank running them.

Imported by the test (single-process reference runs) and started by it under torchrun as
``python -m tests.kd_lib.train.ddp_cases OUT_DIR MODE``, so both sides train exactly the same
problem. Modes: ``train`` (both cases, then the supervised one preempted and resumed),
``fail`` (rank 1 raises while rank 0 waits in a collective), ``hang`` (rank 1 never reaches
the collective rank 0 waits in).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kd_lib.config import AugmentConfig, DistributedConfig, LossTermConfig, TrainConfig
from kd_lib.data import lazy
from kd_lib.data.augment import Augment, make_augment
from kd_lib.models.builders import build_model
from kd_lib.train import loop as training
from kd_lib.train import ranks as distributed
from kd_lib.train.losses import build_objective

# 225 = 7 * 32 + 1: the last global batch holds one sample, so one of two ranks has none.
N_TRAIN, N_VAL, SHAPE, CLASSES = 225, 91, (1, 4, 4), 3
CFG = TrainConfig(epochs=6, batch_size=32, lr=0.01, patience=100, seed=5, scheduler="cosine")
# distill_lazy: the distill case on samples read lazily from record files (what a table's
# manifest is read through), each rank reading its own rows: the same weights as distill.
# tinybert: a transformer student learning a transformer teacher's hidden states and attention
# (hidden_mse with its learned projection, attention_kl) on token ids.
CASES = ("supervised", "distill", "distill_lazy", "tinybert")
BATCHES = -(-N_TRAIN // CFG.batch_size)  # per epoch
RESUME_EPOCH = 3


def data() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + N_VAL, *SHAPE, generator=g)
    y = (x.flatten(1)[:, :CLASSES] + 0.3 * torch.randn(len(x), CLASSES, generator=g)).argmax(1)
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _model(seed: int, width: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("mlp", {"width": width, "depth": 1}, SHAPE, CLASSES)


class Crash(RuntimeError):
    pass


def crash_at(batch: int) -> Callable[[Augment], Augment]:
    """Wrap the augmentation to raise at the given global batch: on every rank at once, outside
    any collective (a preempted job, in effect)."""

    def wrap(augment: Augment) -> Augment:
        calls = [0]

        def crashing(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            calls[0] += 1
            if calls[0] == batch:
                raise Crash(f"crash at batch {batch}")
            return augment(x, generator)

        return crashing

    return wrap


def _read_lazily(x: torch.Tensor, path: Path) -> lazy.LazySamples:
    """``x`` written as float32 records at ``path`` (atomically: the ranks write the same bytes)
    and read back lazily, unnormalized."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(f".{os.getpid()}")
    part.write_bytes(x.numpy().astype(np.float32).tobytes())
    os.replace(part, path)
    records = lazy.RecordFile(path, len(x), x.shape[1:])
    return lazy.TableRows(records, np.arange(len(x)), str(path), {})


def _tinybert(**kw: Any) -> training.TrainResult:
    from tests.helpers import tiny_bert  # lazy: transformers only for this case

    g = torch.Generator().manual_seed(0)
    # Full rows: hidden_mse and attention_kl average over real tokens, so with padding each rank
    # would weigh its own tokens (the usual DDP semantics) and one process could not match it.
    ids = torch.randint(1, 30, (N_TRAIN + N_VAL, 12), generator=g)
    labels = ids[:, 1] % CLASSES
    # No dropout: ranks draw their own dropout masks, which one process cannot reproduce.
    teacher = tiny_bert(2, hidden=16, seed=2, dropout=0.0).eval()
    student = tiny_bert(1, hidden=8, seed=3, dropout=0.0)
    objective = build_objective(
        [
            LossTermConfig(name="kd", weight=0.5, params={"temperature": 2.0}),
            LossTermConfig(name="ce", weight=0.5),
            LossTermConfig(name="hidden_mse", weight=1.0),
            LossTermConfig(name="attention_kl", weight=1.0),
        ]
    )
    x, y, xv, yv = ids[:N_TRAIN], labels[:N_TRAIN], ids[N_TRAIN:], labels[N_TRAIN:]
    return training.distill(student, teacher, objective, x, y, xv, yv, CFG, **kw)


def run_case(
    case: str,
    wrap_augment: Callable[[Augment], Augment] | None = None,
    scratch: Path | None = None,
    **kw: Any,
) -> training.TrainResult:
    """Train one case; ``kw`` goes to the training function (on_epoch, checkpoint_dir);
    ``scratch`` holds distill_lazy's record files (a temporary directory without it)."""
    if case == "tinybert":
        return _tinybert(**kw)
    x: Any
    xv: Any
    x, y, xv, yv = data()
    if case == "distill_lazy":
        where = scratch if scratch is not None else Path(tempfile.mkdtemp(prefix="ddp-lazy-"))
        x, xv = _read_lazily(x, where / "train.f32"), _read_lazily(xv, where / "val.f32")
    if case == "supervised":
        # Noise augmentation: the ranks must reproduce one process's augmentation stream.
        augment = make_augment(AugmentConfig(noise_std=0.2), SHAPE)
        assert augment is not None  # noise is on, so there is a transform
        augment = wrap_augment(augment) if wrap_augment is not None else augment
        return training.train_supervised(_model(1, 24), x, y, xv, yv, CFG, augment=augment, **kw)
    teacher = _model(2, 64)  # any fixed function will do as the teacher
    objective = build_objective(
        [LossTermConfig(name="kd", weight=0.7, params={"temperature": 4.0}), LossTermConfig(name="ce", weight=0.3)]
    )
    return training.distill(_model(3, 16), teacher, objective, x, y, xv, yv, CFG, **kw)


def distributed_config(mode: str) -> DistributedConfig:
    """What the launcher and the ranks both read: 2 processes, a short timeout to test it."""
    return DistributedConfig(nproc_per_node=2, timeout_s=4.0 if mode == "hang" else 60.0, threads_per_process=1)


def main(out: Path, mode: str) -> None:
    with distributed.recording_errors(), distributed.init(distributed_config(mode), "cpu") as ranks:
        if mode == "fail":
            if ranks.rank == 1:
                raise ValueError("rank 1 cannot read its shard")
            ranks.all_reduce_sum([1.0])  # rank 0 waits for a peer that is gone
        if mode == "hang":
            if ranks.rank == 1:
                time.sleep(120)
            ranks.all_reduce_sum([1.0])
        # What each rank writes: checkpoints (counted by wrapping the loop's writer) and epochs reported.
        written = {"checkpoints": 0, "epochs": 0}
        save = training.save_checkpoint

        def counting_save(path: Path, state: dict) -> None:
            written["checkpoints"] += 1
            save(path, state)

        training.save_checkpoint = counting_save
        for case in CASES:
            history: list[dict] = []

            def on_epoch(row: dict, history: list = history) -> None:
                written["epochs"] += 1
                history.append(row)

            result = run_case(
                case, on_epoch=on_epoch, checkpoint_dir=out / f"{case}-checkpoint", scratch=out / "records"
            )
            if ranks.is_main:
                torch.save(result.model.state_dict(), out / f"{case}.pt")
                (out / f"{case}-history.json").write_text(json.dumps(history))
        # Preempted after RESUME_EPOCH epochs, then restarted: rank 0 reads its checkpoint and
        # every rank resumes from it.
        try:
            run_case(
                "supervised",
                wrap_augment=crash_at(RESUME_EPOCH * BATCHES + 1),
                checkpoint_dir=out / "resume-checkpoint",
            )
        except Crash:
            pass
        resumed = run_case("supervised", checkpoint_dir=out / "resume-checkpoint")
        if ranks.is_main:
            torch.save(resumed.model.state_dict(), out / "resumed.pt")
        (out / f"rank-{ranks.rank}.json").write_text(json.dumps(written))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
