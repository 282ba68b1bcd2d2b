"""Sweep benchmark: six candidates on mnist5k through the local runner, against the same
candidates one after another in one process.

The pipeline run is ``kdflow run --local`` on a config with a ``sweep`` section: kfp.local
runs every step as a subprocess (kd_lib, torch and mlflow imported afresh each time) with
the candidates' ParallelFor 2 at a time. The sequential run calls the same kd_lib steps
directly, in this process, in DAG order (prepare_data, train_teacher, then distill,
quantize, evaluate (+ its report), gate per candidate, then select, register and
finalize), against its own MLflow store. Both train the teacher. Prints the wall times and
the chosen candidate against each of the others, and writes JSON. Not part of `make test`.

    python bench/sweep.py --data /work/shared/datasets/mnist5k.npz --out bench/results/sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_lib.adapters import tracking  # noqa: E402
from kd_lib.config import PipelineConfig, parse_config  # noqa: E402
from kd_lib.evaluate import sweep
from kd_lib.steps.distill import distill
from kd_lib.steps.evaluate import evaluate, evaluation_report
from kd_lib.steps.finalize import finalize
from kd_lib.steps.gate import gate
from kd_lib.steps.prepare_data import prepare_data
from kd_lib.steps.quantize import quantize
from kd_lib.steps.register import register
from kd_lib.steps.select import select
from kd_lib.steps.train_teacher import train_teacher

STUDENTS = [
    {"arch": "mlp", "params": {"width": 16, "depth": 1}},
    {"arch": "mlp", "params": {"width": 64, "depth": 1}},
    {"arch": "cnn", "params": {"channels": 4, "depth": 1, "hidden": 32}},
]
SCHEMES = ["dynamic_int8", "static_int8"]


def bench_config(data: str, store: Path, name: str, epochs: int) -> PipelineConfig:
    """Six candidates (3 students x 2 schemes) on ``data``; MLflow in ``store``."""
    return parse_config(
        {
            "name": name,
            "data": {"source": str(Path(data).resolve()), "seed": 0},
            "teacher": {
                "model": {"arch": "mlp", "params": {"width": 256, "depth": 2}},
                "train": {"epochs": epochs, "batch_size": 64, "lr": 0.002, "patience": epochs, "seed": 0},
            },
            "distill": {"train": {"epochs": epochs, "batch_size": 64, "lr": 0.003, "patience": epochs, "seed": 0}},
            "evaluate": {"latency_warmup": 3, "latency_iters": 20},
            "gate": {
                "min_accuracy": 0.90,
                "max_accuracy_drop": 5.0,
                "max_quantization_drop": 1.0,
                "max_size_mb": 0.5,
                "min_compression_ratio": 4.0,
            },
            "sweep": {"students": STUDENTS, "schemes": SCHEMES, "parallelism": 2},
            "registry": {"model_name": f"{name}-student"},
            "tracking": {"experiment": name, "tracking_uri": f"sqlite:///{store / 'mlflow.db'}"},
        }
    )


def run_pipeline(cfg: PipelineConfig, root: Path) -> dict[str, Any]:
    from pipelines.local import run_local

    os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking.tracking_uri or ""
    start = time.perf_counter()
    result = run_local(cfg, root=root)
    wall = time.perf_counter() - start
    if not result.succeeded:
        raise SystemExit(f"the local sweep failed: {result.error}")
    return {
        "wall_s": wall,
        "summary": result.summary["sweep"],
        "steps": result.steps,
        "registered": result.summary.get("registered"),
    }


def run_sequential(cfg: PipelineConfig, work: Path) -> dict[str, Any]:
    """The same DAG, step by step in this process."""
    os.environ["MLFLOW_TRACKING_URI"] = cfg.tracking.tracking_uri or ""
    rid = f"{cfg.name}-sequential"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    dataset, teacher = work / "dataset", work / "teacher"
    prepare_data(cfg, rid, dataset)
    train_teacher(cfg, rid, dataset, teacher, work / "teacher_history.json")
    timings["shared steps"] = time.perf_counter() - start
    evaluations: list[str | Path] = []
    decisions: list[str | Path] = []
    quantized: list[str | Path] = []
    for candidate in sweep.expand(cfg):
        t0 = time.perf_counter()
        c, d = candidate.config, work / candidate.name
        distill(c, rid, dataset, teacher, d / "student", d / "student_history.json")
        quantize(c, rid, dataset, d / "student", d / "quantized", teacher_dir=teacher)
        models: dict[str, str | Path] = {"teacher": teacher, "student": d / "student", "quantized": d / "quantized"}
        evaluate(c, rid, dataset, models, d / "evaluation.json")
        histories: dict[str, str | Path] = {
            "teacher": work / "teacher_history.json",
            "student": d / "student_history.json",
        }
        evaluation_report(c, rid, dataset, d / "evaluation.json", histories, d / "report.html", d / "summary.md")
        gate(c, rid, dataset, d / "evaluation.json", d / "decision.json")
        evaluations.append(d / "evaluation.json")
        decisions.append(d / "decision.json")
        quantized.append(d / "quantized")
        timings[candidate.name] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = work / "selected"
    selection, chosen_config = select(
        cfg,
        rid,
        sweep.candidate_configs(cfg),
        evaluations,
        decisions,
        quantized,
        out / "quantized",
        out / "evaluation.json",
        out / "decision.json",
        out / "summary.md",
    )
    registered = None
    if selection.action != "reject":
        registered = register(
            parse_config(json.loads(chosen_config)),
            rid,
            dataset,
            out / "quantized",
            out / "evaluation.json",
            out / "decision.json",
        )
    finalize(cfg, rid, "SUCCEEDED")
    timings["select, register, finalize"] = time.perf_counter() - t0
    return {
        "wall_s": time.perf_counter() - start,
        "summary": selection.to_dict(),
        "timings": timings,
        "registered": registered,
    }


def comparison(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each candidate against the chosen one: accuracy in points, size and latency as ratios."""
    rows = summary["candidates"]
    chosen = next((r for r in rows if r["chosen"]), None)
    out = []
    for r in rows:
        row = {
            k: r[k]
            for k in (
                "candidate",
                "accuracy",
                "size_bytes",
                "latency_b1_p50_ms",
                "on_front",
                "passed",
                "failed_checks",
                "chosen",
            )
        }
        if chosen is not None:
            row["accuracy_vs_chosen_points"] = (r["accuracy"] - chosen["accuracy"]) * 100
            row["size_vs_chosen"] = r["size_bytes"] / chosen["size_bytes"]
            if r["latency_b1_p50_ms"] and chosen["latency_b1_p50_ms"]:
                row["latency_vs_chosen"] = r["latency_b1_p50_ms"] / chosen["latency_b1_p50_ms"]
        out.append(row)
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "candidate",
        "acc %",
        "size KB",
        "lat b1 ms",
        "front",
        "gate",
        "Δacc pts",
        "size x",
        "lat x",
        "failed checks",
    ]
    cells = [headers]
    for r in rows:
        cells.append(
            [
                ("* " if r["chosen"] else "  ") + r["candidate"],
                f"{r['accuracy'] * 100:.2f}",
                f"{r['size_bytes'] / 1e3:.1f}",
                f"{r['latency_b1_p50_ms']:.3f}" if r["latency_b1_p50_ms"] else "-",
                "yes" if r["on_front"] else "-",
                "PASS" if r["passed"] else "FAIL",
                f"{r['accuracy_vs_chosen_points']:+.2f}" if "accuracy_vs_chosen_points" in r else "-",
                f"{r['size_vs_chosen']:.2f}" if "size_vs_chosen" in r else "-",
                f"{r['latency_vs_chosen']:.2f}" if "latency_vs_chosen" in r else "-",
                ", ".join(r["failed_checks"]) or "-",
            ]
        )
    widths = [max(len(c[i]) for c in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an .npz with x and y, e.g. /work/shared/datasets/mnist5k.npz")
    parser.add_argument(
        "--out", default="bench/results/sweep.json", help="JSON results (default: bench/results/sweep.json)"
    )
    parser.add_argument("--epochs", type=int, default=6, help="teacher and distillation epochs (default: 6)")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-sweep-") as tmp:
        root = Path(tmp)
        (root / "pipeline").mkdir()
        (root / "sequential").mkdir()
        print("local runner (kfp.local, ParallelFor parallelism 2) ...", flush=True)
        pipeline = run_pipeline(
            bench_config(args.data, root / "pipeline", "bench-sweep-local", args.epochs), root / "runs"
        )
        print("sequential, one process ...", flush=True)
        sequential = run_sequential(
            bench_config(args.data, root / "sequential", "bench-sweep-seq", args.epochs), root / "sequential"
        )
        # Both stores must hold one parent run with every candidate's four steps under it.
        for name, mode in (("pipeline", "bench-sweep-local"), ("sequential", "bench-sweep-seq")):
            client = tracking.client_for_uri(f"sqlite:///{root / name / 'mlflow.db'}")
            exp = client.get_experiment_by_name(mode)
            assert exp is not None, f"{name}: no experiment {mode!r}"
            children = client.search_runs([exp.experiment_id], "tags.`kdflow.candidate` != ''", max_results=1000)
            assert len({r.data.tags["kdflow.candidate"] for r in children}) == 6, f"{name}: not every candidate logged"

    rows = comparison(pipeline["summary"])
    result = {
        "data": str(Path(args.data).resolve()),
        "epochs": args.epochs,
        "candidates": len(rows),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "local_runner": {
            "wall_s": pipeline["wall_s"],
            "parallelism": 2,
            "steps": pipeline["steps"],
            "registered": pipeline["registered"],
        },
        "sequential": {
            "wall_s": sequential["wall_s"],
            "timings": sequential["timings"],
            "registered": sequential["registered"],
        },
        "speedup_sequential_over_local": sequential["wall_s"] / pipeline["wall_s"],
        "chosen": pipeline["summary"]["chosen"],
        "chosen_sequential": sequential["summary"]["chosen"],
        "rule": pipeline["summary"]["rule"],
        "comparison": rows,
        "sequential_comparison": comparison(sequential["summary"]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    print()
    print(
        f"{len(rows)} candidates on {Path(args.data).name}, {args.epochs} epochs, {os.cpu_count()} CPUs "
        f"(load average before {load_before[0]:.1f}, after {result['machine']['loadavg_after'][0]:.1f})"
    )
    print(f"  local runner (kfp.local, 2 at a time): {pipeline['wall_s']:7.1f} s")
    print(f"  sequential, one process:              {sequential['wall_s']:7.1f} s")
    print(f"  sequential / local runner:            {result['speedup_sequential_over_local']:7.2f}x")
    print(f"chosen: {result['chosen']} (sequential run chose {result['chosen_sequential']}); rule: {result['rule']}")
    print(_table(rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
