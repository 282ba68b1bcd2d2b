"""Data that does not fit in memory: prepare_data and a distillation epoch at 5k, 50k and 200k samples.

For each size and format (an image folder of PNG files, and a Parquet file with one pixel
column) it generates synthetic 28x28 grey images in 10 classes (a noisy bar whose row tells the
class), then, each in a fresh Python process so that its peak memory is its own:

* ``prepare``: ``kd_lib.data.dataset.prepare`` + ``save_splits``, the prepare_data step's work:
  one streaming pass (checks, fingerprint, train statistics) and the manifest written;
* ``epoch w=0`` and ``epoch w=2``: ``lazy.open_splits`` + one epoch of ``kd_lib.train.loop.distill``
  (a CNN teacher's logits cached over the training split first, then the student's epoch and
  its validation pass) with 0 and 2 DataLoader workers.

Reported per run: peak RSS of the process (``resource.getrusage``: ``ru_maxrss`` of the process
itself; workers' peak separately, from ``RUSAGE_CHILDREN``), wall seconds, samples/s of the
epoch (training samples / the epoch's seconds from the loop's history) and, for prepare, the
bytes of the dataset artifact against the bytes of the samples decoded as float32. Prints a
table, writes JSON. Not part of ``make test``; the machine's load is recorded with the results.

    python bench/data_scale.py                       # 5k, 50k, 200k (about 15 minutes on 2 cores)
    python bench/data_scale.py --sizes 5000 --formats folder
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HW = 28
CLASSES = 10
TEACHER = ("cnn", {"channels": 16, "depth": 2, "hidden": 64})
STUDENT = ("cnn", {"channels": 4, "depth": 2, "hidden": 24})


def _synthetic(n: int, seed: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Samples ``start .. start+n`` of the synthetic set: uint8 ``[n, 28, 28]`` and labels."""
    rng = np.random.default_rng([seed, start])
    y = (np.arange(start, start + n) % CLASSES).astype(np.int64)
    x = rng.integers(0, 90, size=(n, HW, HW), dtype=np.uint8)
    rows = 2 + 2 * y + rng.integers(0, 2, size=n)
    x[np.arange(n), rows, 4:24] = 230
    return x, y


def generate(kind: str, n: int, where: Path, seed: int = 0) -> Path:
    """An image folder ``where/folder_<n>/<class>/<i>.png`` or ``where/table_<n>.parquet``, made once."""
    from PIL import Image  # bench-only dependencies, imported where used

    if kind == "folder":
        root = where / f"folder_{n}"
        if (root / ".complete").is_file():
            return root
        for c in range(CLASSES):
            (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for start in range(0, n, 10_000):
            x, y = _synthetic(min(10_000, n - start), seed, start)
            for i, (img, label) in enumerate(zip(x, y, strict=True)):
                Image.fromarray(img, mode="L").save(root / f"class{label}" / f"{start + i:07d}.png", compress_level=1)
        (root / ".complete").write_text("ok")
        return root
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = where / f"table_{n}.parquet"
    if path.is_file():
        return path
    partial = path.with_suffix(".partial")
    schema = pa.schema([("label", pa.int64()), ("pixels", pa.list_(pa.uint8()))])
    with pq.ParquetWriter(partial, schema) as writer:
        for start in range(0, n, 10_000):
            x, y = _synthetic(min(10_000, n - start), seed, start)
            pixels = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), HW * HW).cast(pa.list_(pa.uint8()))
            writer.write_table(pa.table({"label": pa.array(y), "pixels": pixels}, schema=schema))
    partial.rename(path)
    return path


def _data_cfg(source: Path, kind: str) -> Any:
    from kd_lib.config import DataConfig

    if kind == "folder":
        return DataConfig(source=str(source))
    return DataConfig(source=str(source), pixel_column="pixels", image_shape=[1, HW, HW])


def _peaks() -> dict[str, float]:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "workers_peak_rss_mb": round(children, 1)}


def child_prepare(source: Path, kind: str, out: Path) -> dict[str, Any]:
    from kd_lib.artifacts.dataset_dir import save_splits
    from kd_lib.data import dataset as data

    start = time.perf_counter()
    splits = data.prepare(_data_cfg(source, kind))
    directory = save_splits(splits, out)
    seconds = time.perf_counter() - start
    artifact = sum(p.stat().st_size for p in directory.iterdir())
    n = sum(splits.meta.sizes.values())
    decoded = n * HW * HW * 4
    return {
        "seconds": round(seconds, 2),
        "samples_per_s": round(n / seconds, 1),
        "artifact_bytes": artifact,
        "decoded_bytes": decoded,
        "artifact_fraction": round(artifact / decoded, 5),
    } | _peaks()


def child_epoch(dataset: Path, workers: int, threads: int) -> dict[str, Any]:
    import tempfile

    import torch

    from kd_lib.config import LossTermConfig, TrainConfig
    from kd_lib.data import lazy
    from kd_lib.models.builders import build_model
    from kd_lib.train import loop as training
    from kd_lib.train.losses import build_objective

    torch.set_num_threads(threads)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-") as scratch:
        splits = lazy.open_splits(dataset, scratch)
        opened = time.perf_counter() - start
        meta = splits.meta
        torch.manual_seed(0)
        teacher = build_model(TEACHER[0], TEACHER[1], tuple(meta.input_shape), meta.num_classes).eval()
        student = build_model(STUDENT[0], STUDENT[1], tuple(meta.input_shape), meta.num_classes)
        objective = build_objective(
            [LossTermConfig(name="kd", weight=0.9, params={"temperature": 4.0}), LossTermConfig(name="ce", weight=0.1)]
        )
        result = training.distill(
            student,
            teacher,
            objective,
            splits.x["train"],
            torch.from_numpy(splits.y["train"]),
            splits.x["val"],
            torch.from_numpy(splits.y["val"]),
            TrainConfig(epochs=1, batch_size=128, lr=0.003, seed=0),
            num_workers=workers,
        )
        n_train = len(splits.x["train"])
    seconds = time.perf_counter() - start
    epoch = result.history[0]["seconds"]
    return {
        "seconds": round(seconds, 2),
        "open_seconds": round(opened, 2),
        "epoch_seconds": round(epoch, 2),
        "samples_per_s": round(n_train / epoch, 1),
        "train_samples": n_train,
    } | _peaks()


def _run_child(args: list[str]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False, cwd=ROOT
    )
    if done.returncode != 0:
        raise SystemExit(f"child {args} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5_000, 50_000, 200_000])
    parser.add_argument("--formats", nargs="+", default=["folder", "parquet"], choices=["folder", "parquet"])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/kdflow-data-scale"))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_scale.json")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        what = args.child[0]
        if what == "prepare":
            print(json.dumps(child_prepare(Path(args.child[1]), args.child[2], Path(args.child[3]))))
        else:
            print(json.dumps(child_epoch(Path(args.child[1]), int(args.child[2]), int(args.child[3]))))
        return

    args.data_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    for kind in args.formats:
        for n in args.sizes:
            t0 = time.perf_counter()
            source = generate(kind, n, args.data_dir)
            print(f"{kind} {n}: data ready ({time.perf_counter() - t0:.0f} s)", flush=True)
            dataset = args.data_dir / f"dataset_{kind}_{n}"
            row = {"format": kind, "samples": n, "step": "prepare"}
            rows.append(row | _run_child(["prepare", str(source), kind, str(dataset)]))
            print(rows[-1], flush=True)
            for workers in args.workers:
                row = {"format": kind, "samples": n, "step": f"epoch w={workers}"}
                rows.append(row | _run_child(["epoch", str(dataset), str(workers), str(args.threads)]))
                print(rows[-1], flush=True)

    header = f"{'format':8} {'samples':>8} {'step':11} {'peak RSS MB':>11} {'workers MB':>10} {'seconds':>8} "
    header += f"{'samples/s':>10} {'artifact':>10} {'of decoded':>10}"
    print("\n" + header)
    for r in rows:
        artifact = f"{r['artifact_bytes'] / 1e6:.2f} MB" if "artifact_bytes" in r else ""
        fraction = f"{100 * r['artifact_fraction']:.3f}%" if "artifact_fraction" in r else ""
        print(
            f"{r['format']:8} {r['samples']:>8} {r['step']:11} {r['peak_rss_mb']:>11.0f} "
            f"{r['workers_peak_rss_mb']:>10.0f} {r['seconds']:>8.1f} {r['samples_per_s']:>10.0f} "
            f"{artifact:>10} {fraction:>10}"
        )
    summary: dict[str, Any] = {}
    for kind in args.formats:
        for step in ["prepare"] + [f"epoch w={w}" for w in args.workers]:
            peaks = {r["samples"]: r["peak_rss_mb"] for r in rows if r["format"] == kind and r["step"] == step}
            if len(peaks) > 1:
                summary[f"{kind} {step} RSS growth {min(peaks)}->{max(peaks)}"] = round(
                    peaks[max(peaks)] / peaks[min(peaks)], 2
                )
        for n in args.sizes:
            speed = {r["step"]: r["samples_per_s"] for r in rows if r["format"] == kind and r["samples"] == n}
            if "epoch w=0" in speed and "epoch w=2" in speed:
                summary[f"{kind} {n} speedup w=2/w=0"] = round(speed["epoch w=2"] / speed["epoch w=0"], 2)
    print()
    for key, value in summary.items():
        print(f"{key}: {value}")
    record = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "threads": args.threads,
        "rows": rows,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
