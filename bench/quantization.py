"""Quantization benchmark: every scheme and backend side by side on mnist5k.

Trains a CNN teacher, distills an MLP student, a CNN student, a wide Linear-heavy MLP
(784-1200-1200-10) and a small ResNet (BatchNorm inside residual blocks, residual adds,
strided blocks with projection shortcuts, adaptive pooling) from it, then for each model and
each (scheme, backend) registered in kd_lib.compress.quantization (plus torch.compile'd torchao
and PT2E candidates that have no artifact format of their own), and each ONNX Runtime
artifact (onnx_fp32, onnx_static_int8, onnx_dynamic_int8; kd_lib.compress.onnx_runtime):
artifact bytes and ratio to fp32, test accuracy and its drop, and CPU latency p50/p95 at
batch 1 and 64 with a fixed thread count. Every artifact-backed row is measured on the model
loaded back from its artifact (kdflow's pickle-free weights file, or model.onnx run by ONNX
Runtime on the raw test inputs: its normalization is folded in). Prints a table and writes
JSON. Not part of `make test`; `make bench` runs it. ``--quick`` (2 epochs unless --epochs
says, 30 timed passes, no torch.compile candidates) gives the same table in a few minutes.

With ``--profile``, torch.profiler also runs on each CNN (fp32 and its int8 artifacts) at
batch 1 and 64: self CPU time per operator and per kind of operator (conv, linear, pooling,
quantize/dequantize, tensor bookkeeping), to show where int8 gains or loses time.

    python bench/quantization.py --data /work/shared/datasets/mnist5k.npz --threads 1 --profile
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_lib.artifacts import SPEC_FILE  # noqa: E402
from kd_lib.artifacts.dataset_dir import Splits  # noqa: E402
from kd_lib.compress import onnx_runtime, quantization  # noqa: E402
from kd_lib.config import ONNX_SCHEMES, DataConfig, LossTermConfig, TrainConfig  # noqa: E402
from kd_lib.data import dataset as data_lib  # noqa: E402
from kd_lib.data.normalization import denormalize  # noqa: E402
from kd_lib.evaluate import metrics as evaluation
from kd_lib.models.builders import build_model  # noqa: E402
from kd_lib.train import loop as training  # noqa: E402
from kd_lib.train.losses import build_objective  # noqa: E402

# Hinton KD, as the pipeline's default distill.losses.
KD_LOSSES = [LossTermConfig(name="kd", weight=0.9, params={"temperature": 4.0}), LossTermConfig(name="ce", weight=0.1)]


MODELS = {
    "teacher_cnn": ("cnn", {"channels": 16, "depth": 2, "hidden": 128}),
    "student_mlp": ("mlp", {"width": 128, "depth": 1}),
    "student_cnn": ("cnn", {"channels": 8, "depth": 2, "hidden": 32}),
    "wide_mlp": ("mlp", {"width": 1200, "depth": 2}),
    # The builtin ResNet-8 (kd_lib.models.resnet): a 16-channel stem, one BasicBlock per stage with
    # 16/32/64 channels, strided 1x1 projection shortcuts, adaptive pooling. torch.ao's eager static
    # int8 cannot quantize it (BatchNorm inside the blocks, the residual adds).
    "resnet": ("resnet", {"depth": 8, "width": 1}),
}


def _train(args: argparse.Namespace, splits: Splits) -> dict[str, nn.Module]:
    t = {k: torch.from_numpy(v) for k, v in splits.x.items()}
    y = {k: torch.from_numpy(v) for k, v in splits.y.items()}
    shape, classes = tuple(splits.meta.input_shape), splits.meta.num_classes
    cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=2e-3, patience=args.epochs, seed=0)
    torch.manual_seed(0)
    arch, params = MODELS["teacher_cnn"]
    start = time.perf_counter()
    teacher = training.train_supervised(
        build_model(arch, params, shape, classes), t["train"], y["train"], t["val"], y["val"], cfg
    ).model
    print(f"trained teacher_cnn in {time.perf_counter() - start:.0f}s", flush=True)
    models = {"teacher_cnn": teacher}
    for name in ("student_mlp", "student_cnn", "wide_mlp", "resnet"):
        arch, params = MODELS[name]
        torch.manual_seed(0)
        start = time.perf_counter()
        models[name] = training.distill(
            build_model(arch, params, shape, classes),
            teacher,
            build_objective(KD_LOSSES),
            t["train"],
            y["train"],
            t["val"],
            y["val"],
            cfg,
        ).model
        print(f"distilled {name} in {time.perf_counter() - start:.0f}s", flush=True)
    return models


def _latency(model: nn.Module, x1: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    out = {}
    for bs, iters in ((1, args.iters), (64, max(10, args.iters // 2))):
        timing = evaluation.latency_ms(model, x1, batch_size=bs, warmup=args.warmup, iters=iters, threads=args.threads)
        out[f"b{bs}_p50_ms"], out[f"b{bs}_p95_ms"] = timing["p50"], timing["p95"]
    return out


class _Callable(nn.Module):
    """Lets latency_ms (which calls .eval()/.train()) time a compiled callable."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        # In a list, not as a child module: .eval() must not reach an exported PT2E graph,
        # which refuses train()/eval().
        self._fn = [fn]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn[0](x)


def _pt2e_x86(model: nn.Module, calibration: list[torch.Tensor]) -> tuple[Callable[..., Any], int]:
    """PT2E static int8 with the x86 inductor quantizer, compiled with freezing (bench-only)."""
    import torch._inductor.config as inductor_config

    quantization._import_torchao()  # quietly: torchao logs every CUDA library it cannot load
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    exported = torch.export.export(
        copy.deepcopy(model).eval(), (calibration[0],), dynamic_shapes=({0: torch.export.Dim.AUTO},)
    ).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    for batch in calibration:
        prepared(batch)
    converted = convert_pt2e(prepared)
    size = sum(v.numel() * v.element_size() for v in converted.state_dict().values())
    inductor_config.freezing = True  # folds the int8 weights into the compiled graph
    return torch.compile(converted), size


# Which (scheme, backend) artifacts of a CNN --profile looks into, next to fp32.
PROFILED = (
    ("static_int8", "torch.ao.quantization.eager[x86]"),
    ("static_int8", "torch.ao.quantization.eager[onednn]"),
    ("dynamic_int8", "torch.ao.quantization.quantize_dynamic"),
)
# Operator name fragments -> kind, first match wins. quantize/dequantize comes first and names
# only the conversion ops ("quantized::conv2d" is a conv, not a conversion).
_OP_KINDS = (
    ("quantize/dequantize", ("quantize_per_tensor", "dequantize", "choose_qparams")),
    ("conv", ("conv",)),
    ("linear", ("linear", "addmm", "matmul", "aten::mm")),
    ("pool", ("pool",)),
    ("relu", ("relu", "clamp", "threshold")),
)
BOOKKEEPING = "tensor bookkeeping"  # allocation, copies, views, reading scales: everything else


def _op_kind(op: str) -> str:
    return next((kind for kind, parts in _OP_KINDS if any(p in op for p in parts)), BOOKKEEPING)


def _profile(model: nn.Module, x1: torch.Tensor, batch_size: int, threads: int, passes: int) -> dict[str, Any]:
    """Self CPU time per operator and per kind of operator, averaged over ``passes`` forward passes.

    Self times include the profiler's own per-op cost, so their sum exceeds the unprofiled
    latency; compare shares and kinds between models, not the totals with the latency table.
    """
    from torch.profiler import ProfilerActivity, profile

    batch = x1.expand(batch_size, *x1.shape[1:]).contiguous()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(10):
                model(batch)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(passes):
                    model(batch)
    finally:
        torch.set_num_threads(previous)
    ops = [
        {
            "op": e.key,
            "kind": _op_kind(e.key),
            "self_cpu_ms_per_pass": e.self_cpu_time_total / 1000 / passes,
            "calls_per_pass": e.count / passes,
        }
        for e in prof.key_averages()
    ]
    ops.sort(key=lambda o: o["self_cpu_ms_per_pass"], reverse=True)
    by_kind: dict[str, float] = {kind: 0.0 for kind, _ in _OP_KINDS} | {BOOKKEEPING: 0.0}
    for o in ops:
        by_kind[o["kind"]] += o["self_cpu_ms_per_pass"]
    return {
        "batch_size": batch_size,
        "passes": passes,
        "self_cpu_ms_per_pass": sum(by_kind.values()),
        "by_kind_ms_per_pass": by_kind,
        "top_ops": ops[:10],
    }


def _profile_cnn(candidates: dict[str, nn.Module], x1: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """``_profile`` of every candidate (fp32 and int8 artifacts of one CNN) at batch 1 and 64."""
    return {
        label: {f"b{bs}": _profile(model, x1, bs, args.threads, passes) for bs, passes in ((1, 200), (64, 20))}
        for label, model in candidates.items()
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    start = time.perf_counter()
    splits = data_lib.prepare(DataConfig(source=str(args.data), seed=0))
    x_test, y_test = torch.from_numpy(splits.x["test"]), torch.from_numpy(splits.y["test"])
    x_train, y_train = torch.from_numpy(splits.x["train"]), torch.from_numpy(splits.y["train"])
    models = _train(args, splits)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x_train), generator=gen)[: 8 * 64]
    calibration = [x_train[order[i : i + 64]] for i in range(0, len(order), 64)]
    x1 = x_test[:1]
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, fp32 in models.items():
            arch, params = MODELS[model_name]
            spec = {
                "arch": arch,
                "params": params,
                "input_shape": list(splits.meta.input_shape),
                "num_classes": splits.meta.num_classes,
            }
            fp32_acc = evaluation.accuracy(evaluation.predict(fp32, x_test), y_test)

            def finetune(prepared: nn.Module) -> None:
                qat_cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-4, seed=0)
                training.kd_finetune(
                    prepared, models["teacher_cnn"], build_objective(KD_LOSSES), x_train, y_train, qat_cfg
                )

            context = quantization.QuantizeContext(calibration=calibration, finetune=finetune)
            to_profile: dict[str, nn.Module] = {"fp32": fp32}
            for scheme in quantization.SCHEMES:
                if scheme == "qat_int8" and model_name == "teacher_cnn":
                    continue  # QAT distills from the teacher; the teacher has none
                for backend in quantization.backends(scheme):
                    row: dict[str, Any] = {"model": model_name, "scheme": scheme, "backend": backend}
                    try:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")
                            q_start = time.perf_counter()
                            quantized = quantization.quantize(fp32, scheme, context, backend)
                            row["quantize_s"] = time.perf_counter() - q_start
                            directory = Path(tmp) / f"{model_name}-{scheme}-{backend}"
                            quantization.save_model(
                                quantized, spec | {"quantization": scheme, "backend": backend}, directory
                            )
                            loaded, _ = quantization.load_model(directory)
                    except Exception as err:  # a backend that fails here is a result, not a crash
                        rows.append(row | {"error": f"{type(err).__name__}: {str(err)[:200]}"})
                        continue
                    # bytes: the whole directory, what the gate counts; weights_bytes: without spec.json.
                    row["bytes"] = evaluation.artifact_size_bytes(directory)
                    row["weights_bytes"] = evaluation.artifact_size_bytes(directory, exclude=(SPEC_FILE,))
                    row["fp32_layers"] = quantization.fp32_layers(fp32, scheme, backend)
                    rows.append(row | _measure(loaded, x_test, y_test, x1, fp32_acc, args))
                    print(_line(rows[-1]), flush=True)
                    if (scheme, backend) in PROFILED:
                        to_profile[f"{scheme}[{backend}]"] = loaded
                    if backend.startswith("torchao") and not args.quick:
                        compiled = _Callable(torch.compile(loaded))
                        rows.append(
                            row
                            | {"backend": backend + "+compile"}
                            | _measure(compiled, x_test, y_test, x1, fp32_acc, args)
                        )
                        print(_line(rows[-1]), flush=True)
            rows += _onnx_rows(model_name, fp32, spec, splits, calibration, fp32_acc, Path(tmp), args)
            if not args.no_pt2e:
                row = {"model": model_name, "scheme": "static_int8", "backend": "pt2e.x86_inductor+compile(bench only)"}
                try:
                    pt2e_compiled, size = _pt2e_x86(fp32, calibration)
                    row["bytes"] = size
                    row |= _measure(_Callable(pt2e_compiled), x_test, y_test, x1, fp32_acc, args)
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                finally:
                    import torch._inductor.config as inductor_config

                    inductor_config.freezing = False
                rows.append(row)
                print(_line(row), flush=True)
            if args.profile and arch == "cnn":
                profiles[model_name] = _profile_cnn(to_profile, x1, args)
    return {
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
            "load_average": os.getloadavg(),
        },
        "threads": args.threads,
        "versions": quantization.get_quantizer("weight_only_int8", "torchao.Int8WeightOnlyConfig").versions()
        | onnx_runtime.versions(),
        "data": str(args.data),
        "test_samples": len(y_test),
        "seconds": time.perf_counter() - start,
        "rows": rows,
        "profiles": profiles,
    }


def _onnx_rows(
    model_name: str,
    fp32: nn.Module,
    spec: dict[str, Any],
    splits: Splits,
    calibration: list[torch.Tensor],
    fp32_acc: float,
    tmp: Path,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """The ONNX Runtime artifacts of ``fp32``, built as the quantize step builds them (normalization
    folded in, calibrated on the same batches in raw form) and measured on the raw test split."""
    norm = splits.meta.normalization
    raw_test = torch.from_numpy(denormalize(splits.x["test"], norm))
    y_test = torch.from_numpy(splits.y["test"])
    raw_calibration = [torch.from_numpy(denormalize(b.numpy(), norm)) for b in calibration]
    rows = []
    for scheme in ONNX_SCHEMES:
        row: dict[str, Any] = {"model": model_name, "scheme": scheme, "backend": onnx_runtime.BACKEND}
        directory = tmp / f"{model_name}-{scheme}"
        try:
            q_start = time.perf_counter()
            onnx_runtime.build_onnx_artifact(
                fp32, scheme, spec | {"quantization": "none", "normalization": norm}, raw_calibration, directory
            )
            row["quantize_s"] = time.perf_counter() - q_start
            loaded, _ = quantization.load_model(directory)
        except Exception as err:  # a failure is a result, not a crash
            rows.append(row | {"error": f"{type(err).__name__}: {str(err)[:200]}"})
            print(_line(rows[-1]), flush=True)
            continue
        row["bytes"] = evaluation.artifact_size_bytes(directory)
        row["weights_bytes"] = evaluation.artifact_size_bytes(directory, exclude=(SPEC_FILE,))
        rows.append(row | _measure(loaded, raw_test, y_test, raw_test[:1], fp32_acc, args))
        print(_line(rows[-1]), flush=True)
    return rows


def _measure(model, x_test, y_test, x1, fp32_acc, args) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        acc = evaluation.accuracy(evaluation.predict(model, x_test), y_test)
        out = {"accuracy": acc, "drop_points": (fp32_acc - acc) * 100} | _latency(model, x1, args)
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _line(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{r['model']:<12} {r['scheme']:<17} {r['backend']:<42} FAILED {r['error'][:90]}"
    size = f"{r['bytes'] / 1e3:>8.1f}" if "bytes" in r else f"{'-':>8}"
    nan = float("nan")
    return (
        f"{r['model']:<12} {r['scheme']:<17} {r['backend']:<42} {size} {r.get('ratio', nan):>6.3f} "
        f"{r.get('weights_ratio', nan):>6.3f} {r.get('onnx_ratio', nan):>6.3f} "
        f"{r['accuracy'] * 100:>6.2f} {r['drop_points']:>6.2f} "
        f"{r['b1_p50_ms']:>7.3f} {r['b1_p95_ms']:>7.3f} {r['b64_p50_ms']:>8.3f} {r['b64_p95_ms']:>8.3f} "
        f"{r.get('speedup_b1', nan):>6.2f} {r.get('speedup_b64', nan):>6.2f}"
    )


HEADER = (
    f"{'model':<12} {'scheme':<17} {'backend':<42} {'kB':>8} {'ratio':>6} {'w.rat':>6} {'o.rat':>6} {'acc%':>6} "
    f"{'drop':>6} {'b1 p50':>7} {'b1 p95':>7} {'b64 p50':>8} {'b64 p95':>8} {'x b1':>6} {'x b64':>6}"
)


def _print_profile(model_name: str, per_model: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Per-kind self CPU time of each profiled variant side by side, the top operators, and
    which scheme is fastest at batch 1 for this model."""
    labels = list(per_model)
    for batch in ("b1", "b64"):
        print(f"\nprofile {model_name} batch {batch[1:]}: self CPU ms per pass (profiler overhead included)")
        print(f"{'kind':<22}" + "".join(f"{label[:30]:>32}" for label in labels))
        for kind in next(iter(per_model.values()))[batch]["by_kind_ms_per_pass"]:
            print(
                f"{kind:<22}"
                + "".join(f"{per_model[lab][batch]['by_kind_ms_per_pass'][kind]:>32.4f}" for lab in labels)
            )
        print(f"{'total':<22}" + "".join(f"{per_model[lab][batch]['self_cpu_ms_per_pass']:>32.4f}" for lab in labels))
        for label in labels:
            top = ", ".join(
                f"{o['op']} {o['self_cpu_ms_per_pass']:.4f} (x{o['calls_per_pass']:g})"
                for o in per_model[label][batch]["top_ops"][:6]
            )
            print(f"  top ops {label}: {top}")
    timed = [r for r in rows if r["model"] == model_name and "error" not in r and "b1_p50_ms" in r]
    if timed:
        best = min(timed, key=lambda r: r["b1_p50_ms"])
        print(
            f"{model_name} fastest at batch 1: {best['scheme']} [{best['backend']}] {best['b1_p50_ms']:.3f} ms, "
            f"{best.get('speedup_b1', float('nan')):.2f}x fp32"
        )


def _finish(result: dict[str, Any]) -> None:
    """Ratios to fp32 bytes and batch-64 speedups, per model."""
    base = {r["model"]: r for r in result["rows"] if r["scheme"] == "none" and "error" not in r}
    onnx_base = {r["model"]: r for r in result["rows"] if r["scheme"] == "onnx_fp32" and "error" not in r}
    for r in result["rows"]:
        b = base.get(r["model"])
        if b is None or "error" in r:
            continue
        if r["model"] in onnx_base and r["scheme"] in ONNX_SCHEMES:
            r["onnx_ratio"] = r["weights_bytes"] / onnx_base[r["model"]]["weights_bytes"]
        if "bytes" in r:
            r["ratio"] = r["bytes"] / b["bytes"]
        if "weights_bytes" in r:
            r["weights_ratio"] = r["weights_bytes"] / b["weights_bytes"]
        r["speedup_b64"] = b["b64_p50_ms"] / r["b64_p50_ms"]
        r["speedup_b1"] = b["b1_p50_ms"] / r["b1_p50_ms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/datasets/mnist5k.npz"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/quantization.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default 8; 2 with --quick)")
    parser.add_argument("--iters", type=int, default=100, help="timed passes at batch 1 (half at batch 64)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-pt2e", action="store_true", help="skip the PT2E + torch.compile candidate")
    parser.add_argument(
        "--profile", action="store_true", help="torch.profiler on each CNN's fp32 and int8 artifacts at batch 1 and 64"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 training epochs (unless --epochs says), 30 timed passes (5 warm-up), no torch.compile "
        "candidates (torchao + compile, PT2E)",
    )
    args = parser.parse_args(argv)
    if args.epochs is None:
        args.epochs = 2 if args.quick else 8
    if args.quick:
        args.iters, args.warmup, args.no_pt2e = min(args.iters, 30), min(args.warmup, 5), True
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file; pass the mnist5k .npz (x uint8 [N,1,28,28], y int64)")
    torch.set_num_threads(max(args.threads, 1))
    result = run(args)
    _finish(result)
    print()
    print(
        f"CPU {result['machine']['cpu']}, {result['machine']['cores']} cores, {args.threads} thread(s) while "
        f"timing; load average at the end {result['machine']['load_average']}; torch {torch.__version__}; "
        f"test split {result['test_samples']} samples; latency in ms"
    )
    print(
        "ratio: artifact directory bytes / the torch fp32 artifact's (spec.json included: what the gate counts); "
        "w.rat: the same for the weights file (model.onnx) alone; o.rat: model.onnx bytes / the onnx_fp32 "
        "model.onnx's; x b1, x b64: p50 speedup over torch fp32 at batch 1 and 64; onnx* rows run in ONNX Runtime "
        f"{onnx_runtime.versions()['onnxruntime']} (intra-op threads = the thread count above, 1 inter-op thread)"
    )
    print(HEADER)
    print("-" * len(HEADER))
    for r in result["rows"]:
        print(_line(r))
    for name, per_model in result["profiles"].items():
        _print_profile(name, per_model, result["rows"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({result['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
