"""Does distillation earn its place? Teacher, scratch student and every KD method, then int8.

For each dataset (mnist5k from ``--data`` and the builtin 8x8 digits), with one fixed
stratified split: train one CNN teacher (on randomly shifted images), then for each seed
train the same small CNN student (on the plain images unless ``--crop``) once per method:
``scratch`` (cross-entropy only) and each KD objective. Every
student run uses exactly the same architecture, initial weights (per seed), epochs,
schedule, learning rate, batch order and augmentation: only ``distill.losses`` differs, so
the scratch student is a fair baseline. Each trained student is then quantized
(``--scheme``, static int8 by default) and measured again.

Reported per method: test accuracy mean and standard deviation over the seeds, the
difference to scratch (and its standard deviation over paired seeds), "gap recovered" =
(method - scratch) / (teacher - scratch), and the int8 accuracy. Prints a table, writes
JSON. Not part of ``make test``.

    python bench/kd_quality.py --data ../shared/datasets/mnist5k.npz --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_lib import data as data_lib  # noqa: E402
from kd_lib import evaluation, quantization, training  # noqa: E402
from kd_lib.augment import make_augment  # noqa: E402
from kd_lib.config import AugmentConfig, DataConfig, LossTermConfig, TrainConfig  # noqa: E402
from kd_lib.losses import build_objective, describe  # noqa: E402
from kd_lib.models import build_model, count_parameters  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist5k.npz"

# The methods compared, each a distill.losses list. Weights follow the papers' usual settings
# (Hinton: alpha 0.9, T 4, plus T 2; DKD: alpha 1, beta 8, T 4 plus CE; FitNets/AT: hint or
# attention term added to CE, AT with the paper's beta/2 = 500) and were NOT tuned on the test
# split. Every row is reported, so no method is picked after the fact.
METHODS: dict[str, list[dict[str, Any]]] = {
    "scratch": [{"name": "ce", "weight": 1.0}],
    "kd": [{"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}, {"name": "ce", "weight": 0.1}],
    "kd_T2": [{"name": "kd", "weight": 0.9, "params": {"temperature": 2.0}}, {"name": "ce", "weight": 0.1}],
    "dkd": [{"name": "dkd", "weight": 1.0, "params": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}},
            {"name": "ce", "weight": 1.0}],
    "fitnets": [{"name": "fitnets", "weight": 1.0}, {"name": "ce", "weight": 1.0}],
    "at": [{"name": "at", "weight": 500.0}, {"name": "ce", "weight": 1.0}],
}  # fmt: skip

# Per dataset: the teacher and student architectures and the training recipes.
SETUPS: dict[str, dict[str, Any]] = {
    # A teacher with a wide fully connected head (1.28M params, most of them in the head) leaves
    # room for a student of 1/25 of its size that still has the capacity to imitate it: a
    # 3.4k-param student (this bench's first setup) gained nothing from any teacher signal.
    "mnist5k": {
        "teacher": ("cnn", {"channels": 32, "depth": 3, "hidden": 1024, "dropout": 0.5}),
        "teacher_epochs": 60,
        "teacher_lr": 1e-3,
        "teacher_crop": 2,
        "student": ("cnn", {"channels": 8, "depth": 2, "hidden": 64}),
        "student_epochs": 60,
    },
    "digits": {
        "teacher": ("cnn", {"channels": 32, "depth": 2, "hidden": 512, "dropout": 0.5}),
        "teacher_epochs": 80,
        "teacher_lr": 2e-3,
        "teacher_crop": 1,
        "student": ("cnn", {"channels": 8, "depth": 2, "hidden": 32}),
        "student_epochs": 60,
    },
}


def _tensors(splits: data_lib.Splits) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return ({k: torch.from_numpy(v) for k, v in splits.x.items()}, {k: torch.from_numpy(v) for k, v in splits.y.items()})


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return evaluation.accuracy(evaluation.predict(model, x), y)


def _quantized_accuracy(model: torch.nn.Module, scheme: str, x: dict, y: dict, seed: int) -> float:
    order = torch.randperm(len(x["train"]), generator=torch.Generator().manual_seed(seed))[: 8 * 64]
    context = quantization.QuantizeContext(calibration=[x["train"][order[i : i + 64]] for i in range(0, len(order), 64)])
    quantized = quantization.get_quantizer(scheme).apply(model, context)
    return _accuracy(quantized, x["test"], y["test"])


def run_dataset(name: str, source: str, args: argparse.Namespace) -> dict[str, Any]:
    setup = SETUPS[name]
    splits = data_lib.prepare(DataConfig(source=source, val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=0))
    x, y = _tensors(splits)
    shape, classes = tuple(splits.meta.input_shape), splits.meta.num_classes
    augment = make_augment(AugmentConfig(random_crop_padding=args.crop), shape) if args.crop else None

    t_arch, t_params = setup["teacher"]
    torch.manual_seed(0)
    teacher = build_model(t_arch, t_params, shape, classes)
    t_cfg = TrainConfig(epochs=setup["teacher_epochs"], batch_size=64, lr=setup["teacher_lr"], patience=100, seed=0)
    # The teacher is trained once per recipe and kept (weights only): reruns compare students.
    recipe = json.dumps([name, splits.meta.fingerprint, t_arch, t_params, t_cfg.model_dump(), setup["teacher_crop"]], sort_keys=True)
    cached = Path(args.teacher_cache) / f"{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.pt"
    start = time.perf_counter()
    if cached.is_file():
        teacher.load_state_dict(torch.load(cached, weights_only=True))
        teacher.eval()
    else:
        t_augment = make_augment(AugmentConfig(random_crop_padding=setup["teacher_crop"]), shape) if setup["teacher_crop"] else None
        teacher = training.train_supervised(teacher, x["train"], y["train"], x["val"], y["val"], t_cfg, augment=t_augment).model
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), cached)
    teacher_acc = _accuracy(teacher, x["test"], y["test"])
    print(f"[{name}] teacher {t_arch} {t_params}: {count_parameters(teacher)} params, test {teacher_acc:.4f} "
          f"({'loaded ' + str(cached) if cached.is_file() and time.perf_counter() - start < 5 else 'trained'}, "
          f"{time.perf_counter() - start:.0f}s)", flush=True)  # fmt: skip

    s_arch, s_params = setup["student"] if args.student is None else json.loads(args.student)
    s_cfg = TrainConfig(epochs=args.epochs or setup["student_epochs"], batch_size=64, lr=args.lr, patience=100, seed=0)
    runs: list[dict[str, Any]] = []
    for seed in args.seeds:
        for method, terms in METHODS.items():
            if args.methods and method not in args.methods:
                continue
            losses = [LossTermConfig(**t) for t in terms]
            torch.manual_seed(seed)  # same initial student weights for every method of this seed
            student = build_model(s_arch, s_params, shape, classes)
            start = time.perf_counter()
            result = training.distill(
                student, teacher, build_objective(losses), x["train"], y["train"], x["val"], y["val"],
                s_cfg.model_copy(update={"seed": seed}), augment=augment,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            row = {
                "dataset": name, "seed": seed, "method": method, "objective": describe(losses),
                "val_accuracy": result.best_val_accuracy,
                "test_accuracy": _accuracy(result.model, x["test"], y["test"]),
                "int8_accuracy": _quantized_accuracy(result.model, args.scheme, x, y, seed),
                "best_epoch": result.best_epoch, "seconds": seconds,
            }  # fmt: skip
            runs.append(row)
            print(f"[{name}] seed {seed} {method:8s} test {row['test_accuracy']:.4f} int8 {row['int8_accuracy']:.4f} "
                  f"({seconds:.0f}s)", flush=True)  # fmt: skip
    return {
        "dataset": name,
        "source": source,
        "sizes": splits.meta.sizes,
        "teacher": {"arch": t_arch, "params": t_params, "num_params": count_parameters(teacher), "test_accuracy": teacher_acc},
        "student": {"arch": s_arch, "params": s_params, "num_params": count_parameters(build_model(s_arch, s_params, shape, classes))},
        "student_epochs": args.epochs or setup["student_epochs"],
        "runs": runs,
        "summary": summarize(runs, teacher_acc),
    }


def summarize(runs: list[dict[str, Any]], teacher_acc: float) -> dict[str, dict[str, float]]:
    """Per method: mean/std of test and int8 accuracy, paired difference to scratch, gap recovered."""
    by_method: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    scratch = by_method.get("scratch", {})
    out: dict[str, dict[str, float]] = {}
    for method, seeds in by_method.items():
        acc = [seeds[s]["test_accuracy"] for s in sorted(seeds)]
        int8 = [seeds[s]["int8_accuracy"] for s in sorted(seeds)]
        row = {
            "n": len(acc),
            "mean": statistics.fmean(acc),
            "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "int8_mean": statistics.fmean(int8),
            "int8_std": statistics.stdev(int8) if len(int8) > 1 else 0.0,
        }
        paired = [seeds[s]["test_accuracy"] - scratch[s]["test_accuracy"] for s in sorted(seeds) if s in scratch]
        if paired and method != "scratch":
            base = statistics.fmean(scratch[s]["test_accuracy"] for s in sorted(seeds) if s in scratch)
            row["delta_vs_scratch"] = statistics.fmean(paired)
            row["delta_std"] = statistics.stdev(paired) if len(paired) > 1 else 0.0
            row["gap_recovered"] = (row["mean"] - base) / (teacher_acc - base) if teacher_acc > base else float("nan")
            # "Beats scratch by more than two standard deviations": against the larger of the two
            # methods' seed-to-seed standard deviations (the conservative reading).
            spread = max(row["std"], statistics.stdev([scratch[s]["test_accuracy"] for s in scratch]) if len(scratch) > 1 else 0.0)
            row["beats_scratch_2sd"] = row["delta_vs_scratch"] > 2 * spread
        out[method] = row
    return out


def print_table(result: dict[str, Any]) -> None:
    t = result["teacher"]
    print(f"\n{result['dataset']}: split {result['sizes']}; teacher {t['arch']} {t['num_params']} params "
          f"test {t['test_accuracy']:.4f}; student {result['student']['arch']} {result['student']['num_params']} params "
          f"(1/{t['num_params'] / result['student']['num_params']:.0f} of the teacher)")  # fmt: skip
    header = f"{'method':9s} {'test acc (mean±sd)':>20s} {'vs scratch':>16s} {'gap rec.':>9s} {'>2sd':>5s} {'int8 acc':>16s}"
    print(header)
    print("-" * len(header))
    for method, row in result["summary"].items():
        delta = f"{100 * row['delta_vs_scratch']:+.2f}±{100 * row['delta_std']:.2f}pt" if "delta_vs_scratch" in row else ""
        gap = f"{100 * row['gap_recovered']:.0f}%" if "gap_recovered" in row else ""
        beats = ("yes" if row["beats_scratch_2sd"] else "no") if "beats_scratch_2sd" in row else ""
        print(f"{method:9s} {100 * row['mean']:13.2f}±{100 * row['std']:.2f}% {delta:>16s} {gap:>9s} {beats:>5s} "
              f"{100 * row['int8_mean']:9.2f}±{100 * row['int8_std']:.2f}%")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="mnist5k .npz (x uint8 [N,1,28,28], y int64)")
    parser.add_argument("--datasets", nargs="+", default=["mnist5k", "digits"], choices=sorted(SETUPS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(METHODS)}")
    parser.add_argument("--lr", type=float, default=3e-3, help="student learning rate, the same for every method")
    parser.add_argument("--student", default=None, help='student as JSON, e.g. \'["cnn", {"channels": 4, "depth": 2, "hidden": 32}]\' (default: the setup\'s)')
    parser.add_argument("--epochs", type=int, default=None, help="student epochs, the same for every method (default: the setup's)")
    parser.add_argument("--crop", type=int, default=0, help="random-crop padding for every student (0 = no augmentation)")
    parser.add_argument("--scheme", default="static_int8")
    parser.add_argument("--val-fraction", type=float, default=0.08)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 0))
    parser.add_argument("--out", default="bench/results/kd_quality.json")
    parser.add_argument("--teacher-cache", default="bench/results/teachers", help="trained teachers are kept here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    results = []
    for name in args.datasets:
        source = args.data if name == "mnist5k" else "digits"
        if name == "mnist5k" and not Path(source).is_file():
            print(f"skipping mnist5k: {source} not found (pass --data)", file=sys.stderr)
            continue
        results.append(run_dataset(name, source, args))
    for result in results:
        print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__},
        "args": vars(args), "methods": METHODS, "results": results,
    }, indent=2))  # fmt: skip
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
