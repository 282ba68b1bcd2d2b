"""What a pipeline registers against the torch fp32 student, side by side: is it faster?

Runs a config's own steps in-process (prepare_data, train_teacher, distill, quantize; a fresh
sqlite MLflow store in a temporary directory), so the artifact measured is exactly the one the
quantize step chose for that config. Then times the chosen artifact and the torch fp32 student
it was made from in interleaved rounds (the step's own measurements of every candidate are in
the JSON too): each
round times every model once at every batch size, and the median of the rounds' p50 is kept,
so load that comes and goes hits all of them alike. Threads are pinned (``--threads``) and
stated; the load average before and after is recorded.

    python bench/deployment.py                       # configs/demo.yaml
    python bench/deployment.py --config configs/mnist5k.yaml --out bench/results/deployment-mnist5k.json

Prints a table and writes JSON. Not part of `make test`.
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

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))

from tabulate import tabulate  # noqa: E402

from kd_lib.compress import quantization  # noqa: E402
from kd_lib.config import load_config  # noqa: E402
from kd_lib.data import lazy  # noqa: E402
from kd_lib.evaluate import metrics  # noqa: E402
from kd_lib.steps import candidates  # noqa: E402
from kd_lib.steps.distill import distill  # noqa: E402
from kd_lib.steps.inputs import tensors  # noqa: E402
from kd_lib.steps.prepare_data import prepare_data  # noqa: E402
from kd_lib.steps.quantize import quantize  # noqa: E402
from kd_lib.steps.train_teacher import train_teacher  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE.parents[1] / "configs" / "demo.yaml"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=300, help="timed passes per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(HERE.parent / "results" / "deployment.json"))
    args = parser.parse_args()
    out = Path(args.out).resolve()  # the steps below run in a temporary working directory

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-deploy-") as tmp:
        root = Path(tmp)
        cfg = load_config(args.config)
        cfg.tracking.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        os.chdir(root)  # the sqlite store's artifacts land here, not in the checkout
        d = {name: root / name for name in ("dataset", "teacher", "student", "baseline", "quantized")}
        started = time.perf_counter()
        prepare_data(cfg, "bench", d["dataset"])
        train_teacher(cfg, "bench", d["dataset"], d["teacher"])
        distill(cfg, "bench", d["dataset"], d["teacher"], d["student"], baseline_dir=d["baseline"])
        info = quantize(
            cfg, "bench", d["dataset"], d["student"], d["quantized"], d["teacher"], baseline_dir=d["baseline"]
        )
        pipeline_s = time.perf_counter() - started

        splits = lazy.open_splits(d["dataset"], root / "samples")  # arrays, or a folder's or table's samples
        x_test, y_test = tensors(splits, "test")
        chosen, chosen_spec = quantization.load_model(d["quantized"])
        source = d["baseline"] if info["source_role"] == "baseline" else d["student"]
        fp32, fp32_spec = quantization.load_model(source)
        models: dict[str, tuple[Any, Any, int]] = {
            "torch fp32 student": (
                fp32,
                candidates.model_inputs(x_test, fp32_spec, splits.meta),
                metrics.artifact_size_bytes(source),
            ),
            f"registered ({info['scheme']})": (
                chosen,
                candidates.model_inputs(x_test, chosen_spec, splits.meta),
                metrics.artifact_size_bytes(d["quantized"]),
            ),
        }
        accuracy = {name: metrics.accuracy(metrics.predict(model, x), y_test) for name, (model, x, _) in models.items()}
        p50: dict[str, dict[int, list[float]]] = {name: {bs: [] for bs in args.batch_sizes} for name in models}
        p95: dict[str, dict[int, list[float]]] = {name: {bs: [] for bs in args.batch_sizes} for name in models}
        for _ in range(args.rounds):
            for name, (model, x, _) in models.items():
                for bs in args.batch_sizes:
                    t = metrics.latency_ms(model, x[:1], bs, warmup=20, iters=args.iters, threads=args.threads)
                    p50[name][bs].append(t["p50"])
                    p95[name][bs].append(t["p95"])
        tries = chosen_spec.get("quantization_auto", {}).get("tries", [])

    reference = "torch fp32 student"
    rows, records = [], []
    for name, (_, _, size) in models.items():
        rec: dict[str, Any] = {"model": name, "bytes": size, "test_accuracy": accuracy[name]}
        cells = [name, size, f"{accuracy[name] * 100:.2f}%"]
        for bs in args.batch_sizes:
            mid50, mid95 = statistics.median(p50[name][bs]), statistics.median(p95[name][bs])
            ref = statistics.median(p50[reference][bs])
            rec[f"b{bs}_p50_ms"], rec[f"b{bs}_p95_ms"], rec[f"b{bs}_speedup"] = mid50, mid95, ref / mid50
            cells += [f"{mid50:.4f}", f"{mid95:.4f}", f"{ref / mid50:.2f}x"]
        rows.append(cells)
        records.append(rec)
    headers = ["model", "bytes", "test acc"]
    for bs in args.batch_sizes:
        headers += [f"b{bs} p50 ms", f"b{bs} p95 ms", f"b{bs} vs fp32"]
    load_after = os.getloadavg()
    print(f"config {args.config}: chose {info['scheme']} ({info['source_role']}); steps took {pipeline_s:.1f} s")
    print(f"{args.threads} thread(s), {args.rounds} interleaved rounds x {args.iters} passes, median of the rounds")
    print(tabulate(rows, headers, tablefmt="github", disable_numparse=True))
    cpu = platform.processor() or platform.machine()
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}; {cpu}")
    result = {
        "config": args.config,
        "chosen": info["scheme"],
        "source_role": info["source_role"],
        "threads": args.threads,
        "rounds": args.rounds,
        "iters": args.iters,
        "models": records,
        "candidates_in_the_quantize_step": tries,
        "load_average": {"before": load_before, "after": load_after},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
