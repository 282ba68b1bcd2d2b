"""Per-epoch checkpoints: a run killed mid-training and restarted ends with the same weights.

The SIGKILL case runs the training in a real child process and kills it; the in-process
cases interrupt with an exception (a crash) for both loops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kd_lib.config import AugmentConfig, LossTermConfig, TrainConfig
from kd_lib.data.augment import make_augment
from kd_lib.models.builders import build_model
from kd_lib.train import loop as training
from kd_lib.train.losses import build_objective

CFG = TrainConfig(epochs=8, batch_size=32, lr=0.01, patience=100, seed=3, scheduler="cosine")


def _data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(240, 1, 4, 4, generator=g)
    y = (x.flatten(1)[:, :3].argmax(1)).long()
    return x[:180], y[:180], x[180:], y[180:]


def _model() -> torch.nn.Module:
    torch.manual_seed(7)
    return build_model("mlp", {"width": 16, "depth": 1, "dropout": 0.2}, (1, 4, 4), 3)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Crash(RuntimeError):
    pass


def _crash_at(epoch: int):
    def on_epoch(row: dict) -> None:
        if row["epoch"] == epoch:
            raise Crash(f"simulated preemption in epoch {epoch}")

    return on_epoch


def test_supervised_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    x, y, xv, yv = _data()
    full = training.train_supervised(_model(), x, y, xv, yv, CFG)
    with pytest.raises(Crash):
        training.train_supervised(_model(), x, y, xv, yv, CFG, on_epoch=_crash_at(5), checkpoint_dir=tmp_path)
    assert (tmp_path / training.CHECKPOINT_FILE).is_file()
    resumed = training.train_supervised(_model(), x, y, xv, yv, CFG, checkpoint_dir=tmp_path)
    assert _same(full.model.state_dict(), resumed.model.state_dict())
    assert [h["epoch"] for h in resumed.history] == list(range(1, 9))
    assert resumed.best_epoch == full.best_epoch


def test_keep_last_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    cfg = TrainConfig(**(CFG.model_dump() | {"keep": "last", "patience": TrainConfig().patience}))
    x, y, xv, yv = _data()
    full = training.train_supervised(_model(), x, y, xv, yv, cfg)
    with pytest.raises(Crash):
        training.train_supervised(_model(), x, y, xv, yv, cfg, on_epoch=_crash_at(5), checkpoint_dir=tmp_path)
    resumed = training.train_supervised(_model(), x, y, xv, yv, cfg, checkpoint_dir=tmp_path)
    assert _same(full.model.state_dict(), resumed.model.state_dict())
    assert resumed.best_epoch == full.best_epoch == cfg.epochs
    # A run resumed from the final epoch's checkpoint (nothing left to train) returns those weights.
    again = training.train_supervised(_model(), x, y, xv, yv, cfg, checkpoint_dir=tmp_path)
    assert _same(full.model.state_dict(), again.model.state_dict())


def test_distill_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    x, y, xv, yv = _data()
    torch.manual_seed(11)
    teacher = build_model("mlp", {"width": 32, "depth": 1}, (1, 4, 4), 3)  # any fixed function will do
    terms = [LossTermConfig(name="kd", weight=0.7, params={"temperature": 3.0}), LossTermConfig(name="ce", weight=0.3)]
    # Noise augmentation: the resumed run must continue the augmentation stream too.
    augment = make_augment(AugmentConfig(noise_std=0.1), tuple(x.shape[1:]))

    def run(**kw: Any) -> training.TrainResult:
        return training.distill(_model(), teacher, build_objective(terms), x, y, xv, yv, CFG, augment=augment, **kw)

    full = run()
    with pytest.raises(Crash):
        run(on_epoch=_crash_at(2), checkpoint_dir=tmp_path)
    resumed = run(checkpoint_dir=tmp_path)
    assert _same(full.model.state_dict(), resumed.model.state_dict())


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / training.CHECKPOINT_FILE).write_bytes(b"garbage")
    x, y, xv, yv = _data()
    with pytest.raises(ValueError, match="unreadable training checkpoint"):
        training.train_supervised(_model(), x, y, xv, yv, CFG, checkpoint_dir=tmp_path)


CHILD = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from tests.kd_lib.train.test_checkpoint import CFG, _data, _model
    from kd_lib.train import loop as training

    ckpt, marker_dir, out = sys.argv[1:4]
    def on_epoch(row):
        Path(marker_dir, f"epoch-{row['epoch']}").touch()
        time.sleep(0.4)  # a longer epoch, so the kill lands mid-run
    x, y, xv, yv = _data()
    result = training.train_supervised(_model(), x, y, xv, yv, CFG, on_epoch=on_epoch, checkpoint_dir=ckpt)
    torch.save(result.model.state_dict(), out)
    """
)


def test_sigkill_mid_training_then_restart_gives_the_same_weights(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[3]
    ckpt, markers, out = tmp_path / "ckpt", tmp_path / "markers", tmp_path / "final.pt"
    markers.mkdir()
    cmd = [sys.executable, "-c", CHILD, str(ckpt), str(markers), str(out)]
    child = subprocess.Popen(cmd, cwd=repo, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    assert child.stderr is not None  # stderr=PIPE above
    while not (markers / "epoch-4").exists():
        assert child.poll() is None, child.stderr.read()
        assert time.monotonic() < deadline, "training never reached epoch 4"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    assert not out.exists() and (ckpt / training.CHECKPOINT_FILE).is_file()
    killed_at = max(int(p.name.split("-")[1]) for p in markers.iterdir())

    for p in markers.iterdir():
        p.unlink()
    restarted = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=180)
    assert restarted.returncode == 0, restarted.stderr
    redone = sorted(int(p.name.split("-")[1]) for p in markers.iterdir())
    assert redone[0] > 1, "the restart must resume from the checkpoint, not from epoch 1"
    assert redone[0] <= killed_at

    x, y, xv, yv = _data()
    uninterrupted = training.train_supervised(_model(), x, y, xv, yv, CFG)
    assert _same(torch.load(out, weights_only=True), uninterrupted.model.state_dict())
