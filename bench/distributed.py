"""Scaling of multi-process training: samples/s with 1 vs 2 processes (torchrun, gloo, CPU).

Teacher training (a CNN, cross-entropy) and distillation (an MLP student and a CNN student,
Hinton KD from a fixed CNN teacher through the teacher-logit cache) on mnist5k, each with the
same global batch, seed and epochs in three layouts: one process with one thread, one
process with two threads (kdflow's default for nproc_per_node 1), and two processes of one
thread each (nproc_per_node 2: what torchrun + DDP add). Throughput is training samples per
second over an epoch (median epoch, validation pass included); "wall" is the whole call,
torchrun's start-up and, for distillation, the teacher-logit cache included. The last column
is the largest weight difference to the one-process run (the same training, up to float
reduction order, which Adam amplifies over epochs: on the CNN teacher a 1e-7 perturbation of
the initial weights alone grows to ~1e-2 in one epoch). "speedup" is against one process on
one thread. On a machine whose cores are busy with other work, the second process (or
thread) has no free core to run on: read the figures with the load average. Prints a table
and writes JSON. Not part of `make test` (`make bench-distributed`).

    python bench/distributed.py --data /work/shared/datasets/mnist5k.npz
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_lib.artifacts.dataset_dir import Splits, load_splits, save_splits  # noqa: E402
from kd_lib.config import DataConfig, DistributedConfig, LossTermConfig, TrainConfig  # noqa: E402
from kd_lib.data import dataset as data_lib  # noqa: E402
from kd_lib.launch import torchrun  # noqa: E402
from kd_lib.models.builders import build_model  # noqa: E402
from kd_lib.train import loop as training  # noqa: E402
from kd_lib.train import ranks  # noqa: E402
from kd_lib.train.losses import build_objective  # noqa: E402

CASES = {
    # case: (what trains, architecture, params)
    "train_teacher cnn": ("cnn", {"channels": 16, "depth": 2, "hidden": 128}),
    "distill mlp student": ("mlp", {"width": 128, "depth": 1}),
    "distill cnn student": ("cnn", {"channels": 8, "depth": 2, "hidden": 32}),
}
TEACHER = ("cnn", {"channels": 16, "depth": 2, "hidden": 128})
LAYOUTS = [("1 proc x 1 thread", 1, 1), ("1 proc x 2 threads", 1, 2), ("2 procs x 1 thread", 2, 1)]


def _tensors(splits: Splits) -> dict[str, torch.Tensor]:
    return {
        f"{kind}_{name}": torch.from_numpy(getattr(splits, kind)[name])
        for kind in ("x", "y")
        for name in ("train", "val")
    }


def run_case(case: str, splits: Splits, epochs: int, batch_size: int) -> training.TrainResult:
    """Train one case in this process (under torchrun: as one rank of the group)."""
    t = _tensors(splits)
    shape, classes = tuple(splits.meta.input_shape), splits.meta.num_classes
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=2e-3, patience=epochs, seed=0, scheduler="cosine")
    arch, params = CASES[case]
    torch.manual_seed(0)
    model = build_model(arch, params, shape, classes)
    data = (t["x_train"], t["y_train"], t["x_val"], t["y_val"])
    if case.startswith("train_teacher"):
        return training.train_supervised(model, *data, cfg)
    torch.manual_seed(1)
    teacher = build_model(*TEACHER, shape, classes)  # a fixed function: throughput does not need a good one
    objective = build_objective(
        [LossTermConfig(name="kd", weight=0.9, params={"temperature": 4.0}), LossTermConfig(name="ce", weight=0.1)]
    )
    return training.distill(model, teacher, objective, data[0], data[1], data[2], data[3], cfg)


def _worker(args: argparse.Namespace) -> None:
    """One rank: train the case, rank 0 writes its history and weights."""
    splits = load_splits(args.splits)
    dcfg = DistributedConfig(nproc_per_node=args.procs, threads_per_process=args.threads)
    with ranks.recording_errors(), ranks.init(dcfg, "cpu") as group:
        result = run_case(args.case, splits, args.epochs, args.batch_size)
        if group.is_main:
            torch.save(result.model.state_dict(), Path(args.result).with_suffix(".pt"))
            Path(args.result).write_text(json.dumps(result.history))


def _measure(
    case: str,
    layout: tuple[str, int, int],
    args: argparse.Namespace,
    splits: Splits,
    splits_dir: Path,
    tmp: Path,
) -> dict[str, Any]:
    name, nproc, threads = layout
    start = time.perf_counter()
    if nproc == 1:
        torch.set_num_threads(threads)
        result = run_case(case, splits, args.epochs, args.batch_size)
        history, state = result.history, result.model.state_dict()
    else:
        out = tmp / f"{case.replace(' ', '_')}-{nproc}.json"
        dcfg = DistributedConfig(nproc_per_node=nproc, threads_per_process=threads)
        worker_args = [
            "--worker",
            "--case",
            case,
            "--splits",
            str(splits_dir),
            "--result",
            str(out),
            "--procs",
            str(nproc),
            "--threads",
            str(threads),
            "--epochs",
            str(args.epochs),
            "--batch-size",
            str(args.batch_size),
        ]
        torchrun.launch(str(Path(__file__).resolve()), worker_args, dcfg, tmp / "errors")
        history, state = json.loads(out.read_text()), torch.load(out.with_suffix(".pt"), weights_only=True)
    wall = time.perf_counter() - start
    epoch_s = statistics.median(h["seconds"] for h in history)
    n = len(splits.x["train"])
    return {
        "case": case,
        "layout": name,
        "processes": nproc,
        "threads_per_process": threads,
        "epochs": len(history),
        "median_epoch_s": epoch_s,
        "samples_per_s": n / epoch_s,
        "wall_s": wall,
        "final_val_accuracy": history[-1]["val_accuracy"],
        "_state": state,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/datasets/mnist5k.npz", help="an .npz with x and y (mnist5k)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed.json"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="the GLOBAL batch (each of 2 processes takes half)")
    # Worker mode (started by torchrun from this script).
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--case", "--splits", "--result"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return

    splits = data_lib.prepare(DataConfig(source=args.data))
    print(
        f"{args.data}: {len(splits.x['train'])} training samples {tuple(splits.meta.input_shape)}, "
        f"global batch {args.batch_size}, {args.epochs} epochs, {os.cpu_count()} CPU cores, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        splits_dir = Path(tmp) / "splits"
        save_splits(splits, splits_dir)
        for case in CASES:
            base = None
            for layout in LAYOUTS:
                row = _measure(case, layout, args, splits, splits_dir, Path(tmp))
                state = row.pop("_state")
                base = base or state
                row["max_abs_weight_diff_vs_1_proc"] = max((state[k] - base[k]).abs().max().item() for k in state)
                rows.append(row)
                print(
                    f"  {case:22s} {row['layout']:20s} {row['samples_per_s']:8.0f} samples/s  "
                    f"wall {row['wall_s']:5.1f}s",
                    flush=True,
                )
    for row in rows:
        # Against one process on one core: the scaling per core (the 2-thread row shows what
        # intra-op threads alone give on the same cores).
        ref = next(r for r in rows if r["case"] == row["case"] and r["layout"] == LAYOUTS[0][0])
        row["speedup_vs_1_proc_1_thread"] = row["samples_per_s"] / ref["samples_per_s"]
    header = (
        f"{'case':22s} {'layout':20s} {'samples/s':>10s} {'speedup':>8s} {'epoch s':>8s} {'wall s':>7s} "
        f"{'val acc':>8s} {'max|dw|':>9s}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['case']:22s} {r['layout']:20s} {r['samples_per_s']:10.0f} {r['speedup_vs_1_proc_1_thread']:7.2f}x "
            f"{r['median_epoch_s']:8.2f} {r['wall_s']:7.1f} {r['final_val_accuracy']:8.4f} "
            f"{r['max_abs_weight_diff_vs_1_proc']:9.1e}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "data": args.data,
        "epochs": args.epochs,
        "global_batch": args.batch_size,
        "cpu_count": os.cpu_count(),
        "load_average_1min_at_end": os.getloadavg()[0],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
