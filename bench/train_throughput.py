"""Distillation throughput: kdflow's loop against a minimal plain PyTorch KD loop.

Same teacher and student, same data, batch size, optimizer, epochs and torch thread count.
Measured side by side, alternating, ``--repeats`` times each (the median is reported):

* ``plain``: the textbook loop written below: shuffle, teacher forward under no_grad,
  student forward, ``0.9 * T^2 * KL + 0.1 * CE``, step; one validation pass per epoch (kdflow
  validates every epoch for early stopping, so the plain loop does the same work).
* ``plain (no val)``: the same loop without the validation pass, for reference.
* ``kdflow live``: ``kd_lib.train.loop.distill`` with ``cache_teacher_logits=False`` (the
  teacher runs on every batch, as in the plain loop).
* ``kdflow cached``: ``kd_lib.train.loop.distill`` with the teacher-logit cache (teacher run
  once over the training set, its cost included in the time).
* ``kdflow fm``: consistent teaching ("function matching"): random crop (2 px) and mixup
  (alpha 1) on every batch, teacher and student on the same view, KD at T=1 alone; the teacher
  runs live, so this is what consistent teaching costs against the cache.

Reported: samples/s over the whole call (epochs x N / wall seconds, the cache's one-off
teacher pass included) and the median epoch time (an epoch = training pass + validation;
the cache is built before epoch 1). Prints a table, writes JSON. Not part of ``make test``.

    python bench/train_throughput.py --data ../shared/datasets/mnist5k.npz --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_lib.config import AugmentConfig, DataConfig, LossTermConfig, TrainConfig  # noqa: E402
from kd_lib.data import dataset as data_lib  # noqa: E402
from kd_lib.data.augment import make_augment  # noqa: E402
from kd_lib.models.builders import build_model, count_parameters  # noqa: E402
from kd_lib.train import loop as training  # noqa: E402
from kd_lib.train.losses import build_objective  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist5k.npz"
TEACHER = ("cnn", {"channels": 32, "depth": 3, "hidden": 128})
STUDENTS: dict[str, tuple[str, dict[str, Any]]] = {
    "cnn": ("cnn", {"channels": 4, "depth": 2, "hidden": 24}),
    "mlp": ("mlp", {"width": 64, "depth": 1}),
}
TEMPERATURE, ALPHA = 4.0, 0.9


def plain_kd_loop(
    student: nn.Module,
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    epochs: int,
    batch_size: int,
    lr: float,
    validate: bool,
) -> list[float]:
    """The minimal loop a PyTorch user writes for Hinton KD (Adam, no schedule); returns epoch seconds."""
    optimizer = torch.optim.Adam(student.parameters(), lr=lr)
    teacher.eval()
    generator = torch.Generator().manual_seed(0)
    epoch_seconds = []
    for _ in range(epochs):
        start = time.perf_counter()
        student.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = order[i : i + batch_size]
            xb, yb = x[idx], y[idx]
            with torch.no_grad():
                t_logits = teacher(xb)
            s_logits = student(xb)
            soft = (
                F.kl_div(
                    F.log_softmax(s_logits / TEMPERATURE, -1),
                    F.log_softmax(t_logits / TEMPERATURE, -1),
                    reduction="batchmean",
                    log_target=True,
                )
                * TEMPERATURE**2
            )
            loss = ALPHA * soft + (1 - ALPHA) * F.cross_entropy(s_logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if validate:
            student.eval()
            with torch.no_grad():
                (student(x_val).argmax(1) == y_val).float().mean().item()
        epoch_seconds.append(time.perf_counter() - start)
    return epoch_seconds


def _time(fn: Callable[[], Any]) -> tuple[float, list[float]]:
    """(wall seconds of the call, per-epoch seconds it reported)."""
    start = time.perf_counter()
    out = fn()
    wall = time.perf_counter() - start
    epochs = out if isinstance(out, list) else [h["seconds"] for h in out.history]
    return wall, epochs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    splits = data_lib.prepare(DataConfig(source=args.data, val_fraction=0.08, test_fraction=0.2, seed=0))
    x = {k: torch.from_numpy(v) for k, v in splits.x.items()}
    y = {k: torch.from_numpy(v) for k, v in splits.y.items()}
    shape, classes = tuple(splits.meta.input_shape), splits.meta.num_classes
    torch.manual_seed(0)
    teacher = build_model(*TEACHER, shape, classes).eval()  # untrained: the cost is the same
    lr = 3e-3
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr, patience=100, scheduler="none", seed=0)
    objective_terms = [
        LossTermConfig(name="kd", weight=ALPHA, params={"temperature": TEMPERATURE}),
        LossTermConfig(name="ce", weight=1 - ALPHA),
    ]
    n = len(x["train"]) * args.epochs

    rows = []
    for name in args.students:
        arch, params = STUDENTS[name]

        # This student's arch/params bound now, whenever the variants below call it.
        def fresh(arch: str = arch, params: dict[str, Any] = params) -> nn.Module:
            torch.manual_seed(1)
            return build_model(arch, params, shape, classes)

        variants: dict[str, Callable[[], Any]] = {
            "plain": lambda: plain_kd_loop(
                fresh(),
                teacher,
                x["train"],
                y["train"],
                x["val"],
                y["val"],
                args.epochs,
                args.batch_size,
                lr,
                validate=True,
            ),
            "plain (no val)": lambda: plain_kd_loop(
                fresh(),
                teacher,
                x["train"],
                y["train"],
                x["val"],
                y["val"],
                args.epochs,
                args.batch_size,
                lr,
                validate=False,
            ),
            "kdflow live": lambda: training.distill(
                fresh(),
                teacher,
                build_objective(objective_terms),
                x["train"],
                y["train"],
                x["val"],
                y["val"],
                cfg,
                cache_teacher_logits=False,
            ),
            "kdflow cached": lambda: training.distill(
                fresh(), teacher, build_objective(objective_terms), x["train"], y["train"], x["val"], y["val"], cfg
            ),
            # Consistent teaching ("function matching"): teacher and student on the same cropped,
            # mixed-up batch, so the teacher runs on every batch: what it costs against the cache.
            "kdflow fm": lambda: training.distill(
                fresh(),
                teacher,
                build_objective([LossTermConfig(name="kd", weight=1.0, params={"temperature": 1.0})]),
                x["train"],
                y["train"],
                x["val"],
                y["val"],
                cfg,
                augment=make_augment(AugmentConfig(random_crop_padding=2, mixup_alpha=1.0), shape),
            ),
        }
        _time(variants["plain (no val)"])  # warm-up: allocator, kernels, first-call overheads
        walls: dict[str, list[float]] = {v: [] for v in variants}
        epochs: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.repeats):  # alternate, so drifting machine load hits every variant alike
            for variant, fn in variants.items():
                wall, per_epoch = _time(fn)
                walls[variant].append(wall)
                epochs[variant] += per_epoch
        median_wall = {v: statistics.median(t) for v, t in walls.items()}
        median_epoch = {v: statistics.median(t) for v, t in epochs.items()}
        for variant in variants:
            rows.append(
                {
                    "student": name,
                    "student_params": count_parameters(fresh()),
                    "teacher_params": count_parameters(teacher),
                    "variant": variant,
                    "wall_seconds": median_wall[variant],
                    "all_wall_seconds": walls[variant],
                    "samples_per_s": n / median_wall[variant],
                    "vs_plain": median_wall["plain"] / median_wall[variant],
                    "epoch_seconds": median_epoch[variant],
                    "epoch_speedup_vs_live": median_epoch["kdflow live"] / median_epoch[variant],
                }
            )

    print(
        f"\n{args.epochs} epochs x {len(x['train'])} samples, batch {args.batch_size}, {args.threads} thread(s), "
        f"median of {args.repeats}; teacher {TEACHER[0]} {rows[0]['teacher_params']} params"
    )
    header = (
        f"{'student':8s} {'variant':15s} {'samples/s':>10s} {'vs plain':>9s} {'epoch s':>8s} "
        f"{'epoch vs kdflow live':>21s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['student']:8s} {r['variant']:15s} {r['samples_per_s']:10.0f} {r['vs_plain']:8.2f}x "
            f"{r['epoch_seconds']:8.3f} {r['epoch_speedup_vs_live']:20.2f}x"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "cpus": os.cpu_count(),
                    "threads": args.threads,
                    "torch": torch.__version__,
                    "load_avg_at_end": os.getloadavg(),
                },
                "args": vars(args),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
