"""Does distillation earn its place? Teacher, scratch student and every KD method, then int8.

For each dataset (mnist5k from ``--data`` and the builtin 8x8 digits), with one fixed
stratified split: train one CNN teacher (on randomly shifted images), then for each seed
train the same small CNN student (on the plain images unless ``--crop``) once per method and
per point of the tuning grid: ``scratch`` (cross-entropy only) and each KD objective. Every
student run uses exactly the same architecture, initial weights (per seed), schedule, learning
rate, weight decay, batch order and augmentation: only ``distill.losses`` differs (and ``fm``,
consistent teaching, also mixes its samples with mixup: a mixed sample has no label, which the
other methods need), so the scratch student is a fair baseline. Each student keeps its last
epoch (``train.keep: last``): choosing the best of many epochs on 400 validation images selects
noise, the same for every method but adding spread to every arm.

Tuning effort is the same for every method: each runs every number of epochs in
``--grid-epochs`` for every seed, and keeps the one with the best mean VALIDATION accuracy
over the seeds (ties: fewer epochs). The test split decides nothing. Each kept student is then
quantized (``--scheme``, static int8 by default) and measured again. With ``--tune`` each KD
method also runs its variants (``METHODS``' ``<method>@<change>``: a temperature, a weight), and
the setting with the best mean validation accuracy is its tuned one, reported beside the
paper's; the held-out seeds run both. ``--fixed kd@T8=120 ...`` runs given settings at given
epochs on ``--seeds`` and chooses nothing: a recipe fixed earlier, confirmed on new seeds.

Reported per method: its chosen epochs, test accuracy mean and standard deviation over the
seeds, the difference to scratch (and its standard deviation over paired seeds), "gap
recovered" = (method - scratch) / (teacher - scratch), the int8 accuracy, and per seed the exact
McNemar p-value against scratch on the same test images (with how many seeds were significantly
better or worse). The ``default`` method is what a config without ``distill.losses`` gets, so the
default recipe and the papers' tuned ones sit side by side. ``--holdout-seeds`` are run only
after the choice, each method at its chosen epochs, and summarized apart: nothing is chosen on
them. Prints the tables, writes JSON (every run of the grid, the choice, the held-out runs). Not
part of ``make test``.

    python bench/kd_quality.py --data ../shared/datasets/mnist5k.npz --seeds 0 1 2 --holdout-seeds 3 4 5 --jobs 2
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_lib.artifacts.dataset_dir import DatasetMeta, Splits  # noqa: E402
from kd_lib.compress import quantization
from kd_lib.config import AugmentConfig, DataConfig, DistillConfig, LossTermConfig, TrainConfig  # noqa: E402
from kd_lib.data import dataset as data_lib  # noqa: E402
from kd_lib.data.augment import make_augment  # noqa: E402
from kd_lib.evaluate import metrics as evaluation
from kd_lib.models.builders import build_model, count_parameters  # noqa: E402
from kd_lib.train import loop as training  # noqa: E402
from kd_lib.train.losses import build_objective, describe  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist5k.npz"

# The methods compared, each a distill.losses list. Weights follow the papers' usual settings
# (Hinton: alpha 0.9, T 4, plus T 2; DKD: alpha 1, beta 8, T 4 plus CE; FitNets/AT: hint or
# attention term added to CE, AT with the paper's beta/2 = 500) and were NOT tuned on the test
# split. Every row is reported, so no method is picked after the fact.
METHODS: dict[str, list[dict[str, Any]]] = {
    "scratch": [{"name": "ce", "weight": 1.0}],
    # What a config without distill.losses gets (kd_lib.config.train), beside the papers' settings.
    "default": [term.model_dump() for term in DistillConfig().losses],
    "kd": [{"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}, {"name": "ce", "weight": 0.1}],
    "dkd": [
        {"name": "dkd", "weight": 1.0, "params": {"alpha": 1.0, "beta": 8.0, "temperature": 4.0}},
        {"name": "ce", "weight": 1.0},
    ],
    "fitnets": [{"name": "fitnets", "weight": 1.0}, {"name": "ce", "weight": 1.0}],
    "at": [{"name": "at", "weight": 500.0}, {"name": "ce", "weight": 1.0}],
    # The tuning variants (``--tune``): ``<method>@<change>``, each one change to the paper's
    # setting above, chosen on validation against it (``choose_variants``). A small grid, fixed
    # before any run: temperature and soft-target weight for KD, DKD's non-target weight beta,
    # the feature terms' weight a decade either side.
    "kd@T2": [{"name": "kd", "weight": 0.9, "params": {"temperature": 2.0}}, {"name": "ce", "weight": 0.1}],
    "kd@T8": [{"name": "kd", "weight": 0.9, "params": {"temperature": 8.0}}, {"name": "ce", "weight": 0.1}],
    "kd@a0.5": [{"name": "kd", "weight": 0.5, "params": {"temperature": 4.0}}, {"name": "ce", "weight": 0.5}],
    "kd@a1": [{"name": "kd", "weight": 1.0, "params": {"temperature": 4.0}}],
    "dkd@b2": [
        {"name": "dkd", "weight": 1.0, "params": {"alpha": 1.0, "beta": 2.0, "temperature": 4.0}},
        {"name": "ce", "weight": 1.0},
    ],
    "dkd@b4": [
        {"name": "dkd", "weight": 1.0, "params": {"alpha": 1.0, "beta": 4.0, "temperature": 4.0}},
        {"name": "ce", "weight": 1.0},
    ],
    "fitnets@w0.1": [{"name": "fitnets", "weight": 0.1}, {"name": "ce", "weight": 1.0}],
    "fitnets@w10": [{"name": "fitnets", "weight": 10.0}, {"name": "ce", "weight": 1.0}],
    "at@w50": [{"name": "at", "weight": 50.0}, {"name": "ce", "weight": 1.0}],
    "at@w5": [{"name": "at", "weight": 5.0}, {"name": "ce", "weight": 1.0}],
    # Consistent teaching ("function matching", Beyer et al. 2022): the teacher's answers on the
    # same mixed-up view alone, at T=1; its mixup is in METHOD_MIXUP (crop comes from --crop).
    "fm": [{"name": "kd", "weight": 1.0, "params": {"temperature": 1.0}}],
}
# Methods that mix their training samples (mixup alpha): teacher and student see the same mixed batch.
METHOD_MIXUP: dict[str, float] = {"fm": 1.0}

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
        "student_epochs": [60, 120],
    },
    # CIFAR-style ResNets (kd_lib.models.resnet), the pairing KD papers benchmark (ResNet-56 ->
    # ResNet-20 on CIFAR), shrunk for 2 CPU cores: ResNet-14 (175k params) -> ResNet-8 at half
    # width (20k, 1/9), the pair of configs/resnet.yaml.
    "digits_resnet": {
        "teacher": ("resnet", {"depth": 14, "width": 1}),
        # 40 epochs at 3e-3 left the teacher below the scratch student (96.7% against 97.7% test).
        "teacher_epochs": 100,
        "teacher_lr": 2e-3,
        "teacher_crop": 1,
        "student": ("resnet", {"depth": 8, "width": 0.5}),
        "student_epochs": [30, 60],
    },
    "digits": {
        "teacher": ("cnn", {"channels": 32, "depth": 2, "hidden": 512, "dropout": 0.5}),
        "teacher_epochs": 80,
        "teacher_lr": 2e-3,
        "teacher_crop": 1,
        "student": ("cnn", {"channels": 8, "depth": 2, "hidden": 32}),
        "student_epochs": [60, 120],
    },
}


def _tensors(splits: Splits) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    return (
        {k: torch.from_numpy(v) for k, v in splits.x.items()},
        {k: torch.from_numpy(v) for k, v in splits.y.items()},
    )


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return evaluation.accuracy(evaluation.predict(model, x), y)


def _quantized_accuracy(model: torch.nn.Module, scheme: str, x: dict, y: dict, seed: int) -> float:
    order = torch.randperm(len(x["train"]), generator=torch.Generator().manual_seed(seed))[: 8 * 64]
    context = quantization.QuantizeContext(
        calibration=[x["train"][order[i : i + 64]] for i in range(0, len(order), 64)]
    )
    quantized = quantization.get_quantizer(scheme).apply(model, context)
    return _accuracy(quantized, x["test"], y["test"])


@functools.lru_cache(maxsize=4)
def _load(source: str, val_fraction: float, test_fraction: float) -> tuple[dict, dict, DatasetMeta]:
    """The fixed split (seed 0) as tensors, once per process."""
    splits = data_lib.prepare(DataConfig(source=source, val_fraction=val_fraction, test_fraction=test_fraction, seed=0))
    x, y = _tensors(splits)
    return x, y, splits.meta


def _student_run(task: dict[str, Any]) -> dict[str, Any]:
    """One student: ``task`` names the data, teacher weights, method, seed and epochs. Runs in a
    worker process (spawned: it loads the split and the cached teacher itself)."""
    torch.set_num_threads(task["threads"])
    x, y, meta = _load(task["source"], task["val_fraction"], task["test_fraction"])
    shape, classes = tuple(meta.input_shape), meta.num_classes
    teacher_arch, teacher_params = task["teacher"]
    teacher = build_model(teacher_arch, teacher_params, shape, classes)
    teacher.load_state_dict(torch.load(task["teacher_weights"], weights_only=True))
    teacher.eval()
    mixing = AugmentConfig(random_crop_padding=task["crop"], mixup_alpha=METHOD_MIXUP.get(task["method"], 0.0))
    augment = make_augment(mixing, shape)
    losses = [LossTermConfig(**t) for t in METHODS[task["method"]]]
    cfg = TrainConfig(
        epochs=task["epochs"],
        batch_size=64,
        lr=task["lr"],
        weight_decay=task["weight_decay"],
        optimizer="adamw",
        keep="last",
        seed=task["seed"],
    )
    torch.manual_seed(task["seed"])  # same initial student weights for every method of this seed
    student_arch, student_params = task["student"]
    student = build_model(student_arch, student_params, shape, classes)
    start = time.perf_counter()
    result = training.distill(
        student, teacher, build_objective(losses), x["train"], y["train"], x["val"], y["val"], cfg, augment=augment
    )
    return {
        "dataset": task["dataset"],
        "seed": task["seed"],
        "method": task["method"],
        "epochs": task["epochs"],
        "objective": describe(losses),
        "val_accuracy": result.best_val_accuracy,
        "test_accuracy": _accuracy(result.model, x["test"], y["test"]),
        # For the paired test against scratch on the same test images (dropped from the JSON).
        "test_pred": evaluation.predict(result.model, x["test"]).tolist(),
        "int8_accuracy": _quantized_accuracy(result.model, task["scheme"], x, y, task["seed"]),
        "seconds": time.perf_counter() - start,
    }


def run_dataset(name: str, source: str, args: argparse.Namespace) -> dict[str, Any]:
    setup = SETUPS[name]
    x, y, meta = _load(source, args.val_fraction, args.test_fraction)
    shape, classes = tuple(meta.input_shape), meta.num_classes

    t_arch, t_params = setup["teacher"]
    torch.manual_seed(0)
    teacher = build_model(t_arch, t_params, shape, classes)
    t_cfg = TrainConfig(epochs=setup["teacher_epochs"], batch_size=64, lr=setup["teacher_lr"], patience=100, seed=0)
    # The teacher is trained once per recipe and kept (weights only): reruns compare students.
    recipe = json.dumps(
        [name, meta.fingerprint, t_arch, t_params, t_cfg.model_dump(), setup["teacher_crop"]], sort_keys=True
    )
    cached = Path(args.teacher_cache) / f"{name}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.pt"
    start = time.perf_counter()
    loaded = cached.is_file()
    if loaded:
        teacher.load_state_dict(torch.load(cached, weights_only=True))
        teacher.eval()
    else:
        t_augment = (
            make_augment(AugmentConfig(random_crop_padding=setup["teacher_crop"]), shape)
            if setup["teacher_crop"]
            else None
        )
        teacher = training.train_supervised(
            teacher, x["train"], y["train"], x["val"], y["val"], t_cfg, augment=t_augment
        ).model
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(teacher.state_dict(), cached)
    teacher_acc = _accuracy(teacher, x["test"], y["test"])
    print(
        f"[{name}] teacher {t_arch} {t_params}: {count_parameters(teacher)} params, test {teacher_acc:.4f} "
        f"({'loaded ' + str(cached) if loaded else 'trained'}, {time.perf_counter() - start:.0f}s)",
        flush=True,
    )

    student = tuple(setup["student"]) if args.student is None else tuple(json.loads(args.student))
    grid = args.grid_epochs or setup["student_epochs"]
    # --fixed: each named setting at its own epochs, nothing chosen (a recipe confirmed on new seeds).
    fixed = dict(_setting(text) for text in args.fixed) if args.fixed else None
    methods = list(fixed) if fixed else select_methods(args.methods, args.tune)
    grids = {method: [fixed[method]] if fixed else grid for method in methods}
    common = {
        "dataset": name,
        "source": source,
        "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction,
        "teacher": (t_arch, t_params),
        "teacher_weights": str(cached),
        "student": student,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "crop": args.crop,
        "scheme": args.scheme,
        "threads": max(1, args.threads // args.jobs),
    }
    tasks = [
        common | {"method": method, "seed": seed, "epochs": epochs}
        for seed in args.seeds
        for method in methods
        for epochs in grids[method]
    ]
    runs = _run_all(name, tasks, args.jobs)
    chosen = choose_epochs(runs)
    tuned = {} if fixed else choose_variants(runs, chosen)
    # Held-out seeds, run only after the choice: each paper setting and each method's tuned
    # variant at its chosen epochs, nothing tuned on them.
    kept_methods = [m for m in methods if "@" not in m or m in tuned.values()]
    holdout_tasks = [
        common | {"method": method, "seed": seed, "epochs": chosen[method]}
        for seed in args.holdout_seeds
        for method in kept_methods
    ]
    holdout = _run_all(name, holdout_tasks, args.jobs) if holdout_tasks else []
    labels = y["test"].tolist()
    kept = [r for r in runs if r["epochs"] == chosen[r["method"]]]
    summaries = {"summary": summarize(kept, teacher_acc, chosen, labels)}
    if holdout:
        summaries["holdout_summary"] = summarize(holdout, teacher_acc, chosen, labels)
    return {
        "dataset": name,
        "source": source,
        "sizes": meta.sizes,
        "teacher": {
            "arch": t_arch,
            "params": t_params,
            "num_params": count_parameters(teacher),
            "test_accuracy": teacher_acc,
        },
        "student": {
            "arch": student[0],
            "params": student[1],
            "num_params": count_parameters(build_model(student[0], student[1], shape, classes)),
        },
        "grid_epochs": grid,
        "fixed": fixed,
        "chosen_epochs": chosen,
        "tuned": tuned,
        "holdout_seeds": args.holdout_seeds,
        "runs": [_without_predictions(r) for r in runs],
        "holdout_runs": [_without_predictions(r) for r in holdout],
        **summaries,
    }


def _run_all(name: str, tasks: list[dict[str, Any]], jobs: int) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        for row in pool.map(_student_run, tasks):
            runs.append(row)
            print(
                f"[{name}] seed {row['seed']} {row['method']:8s} {row['epochs']:4d} ep: val {row['val_accuracy']:.4f} "
                f"test {row['test_accuracy']:.4f} int8 {row['int8_accuracy']:.4f} ({row['seconds']:.0f}s)",
                flush=True,
            )
    return runs


def _without_predictions(run: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in run.items() if k != "test_pred"}


def _setting(text: str) -> tuple[str, int]:
    """``"kd@T8=120"`` -> ``("kd@T8", 120)``."""
    method, _, epochs = text.partition("=")
    if method not in METHODS or not epochs.isdigit():
        raise SystemExit(f"--fixed takes METHOD=EPOCHS with METHOD one of {list(METHODS)}, got {text!r}")
    return method, int(epochs)


def family(method: str) -> str:
    """The paper's method a tuning variant belongs to (``"dkd@b2"`` -> ``"dkd"``)."""
    return method.split("@", 1)[0]


def select_methods(names: list[str] | None, tune: bool) -> list[str]:
    """The methods to run: the paper settings named (all by default), then with ``tune`` every
    variant of theirs; a variant named explicitly runs too."""
    base = [m for m in METHODS if "@" not in m and (not names or m in names)]
    variants = [m for m in METHODS if "@" in m and ((tune and family(m) in base) or (names and m in names))]
    return base + variants


def choose_variants(runs: list[dict[str, Any]], chosen: dict[str, int]) -> dict[str, str]:
    """Per method family, the setting (the paper's or a variant, each at its chosen epochs) with
    the best mean VALIDATION accuracy over the seeds; ties go to the paper's setting."""
    val: dict[str, list[float]] = {}
    for r in runs:
        if r["epochs"] == chosen[r["method"]]:
            val.setdefault(r["method"], []).append(r["val_accuracy"])
    best: dict[str, str] = {}
    for method in sorted(val, key=lambda m: ("@" in m, m)):
        name = family(method)
        if name not in best or statistics.fmean(val[method]) > statistics.fmean(val[best[name]]):
            best[name] = method
    return best


def choose_epochs(runs: list[dict[str, Any]]) -> dict[str, int]:
    """Per method, the grid's number of epochs with the best mean validation accuracy over the
    seeds (ties: fewer epochs). Validation only: the test split decides nothing."""
    val: dict[str, dict[int, list[float]]] = {}
    for r in runs:
        val.setdefault(r["method"], {}).setdefault(r["epochs"], []).append(r["val_accuracy"])
    return {
        method: max(sorted(by_epochs), key=lambda e: statistics.fmean(by_epochs[e]))
        for method, by_epochs in val.items()
    }


def summarize(
    runs: list[dict[str, Any]], teacher_acc: float, chosen: dict[str, int], labels: list[int]
) -> dict[str, dict[str, Any]]:
    """Per method (one run per seed): mean/std of test and int8 accuracy, paired difference to
    scratch, gap recovered, and per seed the exact McNemar p-value against scratch on the same
    test images (``labels``); ``chosen`` is each method's number of epochs."""
    by_method: dict[str, dict[int, dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    scratch = by_method.get("scratch", {})
    out: dict[str, dict[str, Any]] = {}
    for method, seeds in by_method.items():
        acc = [seeds[s]["test_accuracy"] for s in sorted(seeds)]
        int8 = [seeds[s]["int8_accuracy"] for s in sorted(seeds)]
        row = {
            "epochs": chosen[method],
            "n": len(acc),
            "mean": statistics.fmean(acc),
            "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "int8_mean": statistics.fmean(int8),
            "int8_std": statistics.stdev(int8) if len(int8) > 1 else 0.0,
        }
        paired = [seeds[s]["test_accuracy"] - scratch[s]["test_accuracy"] for s in sorted(seeds) if s in scratch]
        if method != "scratch":
            # Exact McNemar test per seed on the same test images (kd_lib.evaluate.metrics.paired_gain).
            tests = [
                evaluation.paired_gain(
                    torch.tensor(seeds[s]["test_pred"]),
                    torch.tensor(scratch[s]["test_pred"]),
                    torch.tensor(labels),
                )
                for s in sorted(seeds)
                if s in scratch
            ]
            row["p_values"] = [t["p_value"] for t in tests]
            row["significantly_better"] = sum(t["significant"] and t["gain_points"] > 0 for t in tests)
            row["significantly_worse"] = sum(t["significant"] and t["gain_points"] < 0 for t in tests)
        if paired and method != "scratch":
            base = statistics.fmean(scratch[s]["test_accuracy"] for s in sorted(seeds) if s in scratch)
            row["delta_vs_scratch"] = statistics.fmean(paired)
            row["delta_std"] = statistics.stdev(paired) if len(paired) > 1 else 0.0
            row["gap_recovered"] = (row["mean"] - base) / (teacher_acc - base) if teacher_acc > base else float("nan")
            # "Beats scratch by more than two standard deviations": against the larger of the two
            # methods' seed-to-seed standard deviations (the conservative reading).
            spread = max(
                row["std"],
                statistics.stdev([scratch[s]["test_accuracy"] for s in scratch]) if len(scratch) > 1 else 0.0,
            )
            row["beats_scratch_2sd"] = row["delta_vs_scratch"] > 2 * spread
        out[method] = row
    return out


def print_table(result: dict[str, Any]) -> None:
    t = result["teacher"]
    print(
        f"\n{result['dataset']}: split {result['sizes']}; teacher {t['arch']} {t['num_params']} params "
        f"test {t['test_accuracy']:.4f}; student {result['student']['arch']} {result['student']['num_params']} params "
        f"(1/{t['num_params'] / result['student']['num_params']:.0f} of the teacher)"
    )
    if result.get("fixed"):
        print(f"fixed settings, nothing chosen: {result['fixed']}; last epoch kept")
    else:
        print(f"each method's epochs chosen on validation from {result['grid_epochs']}; last epoch kept")
    _print_summary("tuning seeds (epochs chosen on their validation accuracy)", result["summary"])
    if any(method != name for name, method in result["tuned"].items()):
        _print_side_by_side("tuning seeds", result["summary"], result["tuned"])
    if "holdout_summary" in result:
        title = f"held-out seeds {result['holdout_seeds']} (nothing chosen on them)"
        _print_summary(title, result["holdout_summary"])
        _print_side_by_side(title, result["holdout_summary"], result["tuned"])


def _print_side_by_side(title: str, summary: dict[str, dict[str, Any]], tuned: dict[str, str]) -> None:
    """Per method family: the paper's setting beside the variant chosen on validation."""
    print(f"\n{title}: the paper's setting | the tuned one (chosen on validation)")
    for name, method in tuned.items():
        if name == "scratch" or name not in summary or method not in summary:
            continue
        cells = []
        for key in (name, method):
            row = summary[key]
            gap = f", {100 * row['gap_recovered']:.0f}% of the gap" if "gap_recovered" in row else ""
            cells.append(
                f"{key} {row['epochs']} ep: {100 * row['mean']:.2f}±{100 * row['std']:.2f}% "
                f"({100 * row.get('delta_vs_scratch', 0.0):+.2f}pt{gap})"
            )
        print(f"  {name:8s} {cells[0]:52s} | {cells[1] if method != name else '(the paper setting)'}")


def _print_summary(title: str, summary: dict[str, dict[str, Any]]) -> None:
    print(f"\n{title}; McNemar: exact p per seed against scratch, + / - significantly better / worse")
    header = (
        f"{'method':12s} {'epochs':>6s} {'test acc (mean±sd)':>20s} {'vs scratch':>16s} {'gap rec.':>9s} "
        f"{'>2sd':>5s} {'int8 acc':>16s}  McNemar"
    )
    print(header)
    print("-" * len(header))
    for method, row in summary.items():
        delta = (
            f"{100 * row['delta_vs_scratch']:+.2f}±{100 * row['delta_std']:.2f}pt" if "delta_vs_scratch" in row else ""
        )
        gap = f"{100 * row['gap_recovered']:.0f}%" if "gap_recovered" in row else ""
        beats = ("yes" if row["beats_scratch_2sd"] else "no") if "beats_scratch_2sd" in row else ""
        print(
            f"{method:12s} {row['epochs']:6d} {100 * row['mean']:13.2f}±{100 * row['std']:.2f}% "
            f"{delta:>16s} {gap:>9s} {beats:>5s} "
            f"{100 * row['int8_mean']:9.2f}±{100 * row['int8_std']:.2f}%  {_mcnemar(row)}"
        )


def _mcnemar(row: dict[str, Any]) -> str:
    if "p_values" not in row:
        return ""
    ps = " ".join(f"{p:.3f}" for p in row["p_values"])
    return f"p {ps} ({row['significantly_better']}+ {row['significantly_worse']}-)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="mnist5k .npz (x uint8 [N,1,28,28], y int64)")
    parser.add_argument("--datasets", nargs="+", default=["mnist5k", "digits"], choices=sorted(SETUPS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="tuning seeds: epochs chosen on them")
    parser.add_argument(
        "--holdout-seeds",
        nargs="*",
        type=int,
        default=[],
        help="seeds run only after the choice, each method at its chosen epochs (e.g. 3 4 5)",
    )
    parser.add_argument("--methods", nargs="*", default=None, help=f"subset of {list(METHODS)}")
    parser.add_argument(
        "--fixed",
        nargs="+",
        default=None,
        metavar="METHOD=EPOCHS",
        help="run only these settings, each at its epochs, on --seeds: a fixed recipe confirmed, nothing chosen",
    )
    parser.add_argument(
        "--tune",
        action="store_true",
        help="also run each chosen method's variants (METHODS' <method>@<change>) and pick one on validation",
    )
    parser.add_argument(
        "--lr", type=float, default=3e-3, help="student learning rate (AdamW), the same for every method"
    )
    parser.add_argument(
        "--weight-decay", type=float, default=0.05, help="student AdamW weight decay, the same for every method"
    )
    parser.add_argument(
        "--student",
        default=None,
        help='student as JSON, e.g. \'["cnn", {"channels": 4, "depth": 2, "hidden": 32}]\' (default: the setup\'s)',
    )
    parser.add_argument(
        "--grid-epochs",
        nargs="+",
        type=int,
        default=None,
        help="student epochs tried by every method, chosen on validation (default: the setup's, 60 120)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="student runs at once (worker processes sharing --threads)")
    parser.add_argument(
        "--crop", type=int, default=0, help="random-crop padding for every student (0 = no augmentation)"
    )
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
        source = args.data if name.startswith("mnist5k") else "digits"
        if name.startswith("mnist5k") and not Path(source).is_file():
            print(f"skipping mnist5k: {source} not found (pass --data)", file=sys.stderr)
            continue
        results.append(run_dataset(name, source, args))
    for result in results:
        print_table(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                    "cpus": os.cpu_count(),
                    "threads": args.threads,
                    "torch": torch.__version__,
                },
                "args": vars(args),
                "methods": METHODS,
                "results": results,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
