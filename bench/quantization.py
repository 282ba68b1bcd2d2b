"""Quantization benchmark: every scheme and backend side by side on mnist5k.

Trains a CNN teacher, distills an MLP student, a CNN student and a wide Linear-heavy MLP
(784-1200-1200-10) from it, then for each model and each (scheme, backend) registered in
kd_lib.quantization (plus torch.compile'd torchao and PT2E candidates that have no artifact
format of their own): artifact bytes and ratio to fp32, test accuracy and its drop, and CPU
latency p50/p95 at batch 1 and 64 with a fixed thread count. Every artifact-backed row is
measured on the model loaded back from its artifact (weights_only=True). Prints a table and
writes JSON. Not part of `make test`; `make bench` runs it.

    python bench/quantization.py --data /work/shared/datasets/mnist5k.npz --threads 1
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
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd_lib import data as data_lib  # noqa: E402
from kd_lib import evaluation, quantization, training  # noqa: E402
from kd_lib.config import DataConfig, TrainConfig  # noqa: E402
from kd_lib.models import build_model  # noqa: E402

MODELS = {
    "teacher_cnn": ("cnn", {"channels": 16, "depth": 2, "hidden": 128}),
    "student_mlp": ("mlp", {"width": 128, "depth": 1}),
    "student_cnn": ("cnn", {"channels": 8, "depth": 2, "hidden": 32}),
    "wide_mlp": ("mlp", {"width": 1200, "depth": 2}),
}


def _train(args: argparse.Namespace, splits: data_lib.Splits) -> dict[str, nn.Module]:
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
    teacher_logits = training.compute_logits(teacher, t["train"])
    models = {"teacher_cnn": teacher}
    for name in ("student_mlp", "student_cnn", "wide_mlp"):
        arch, params = MODELS[name]
        torch.manual_seed(0)
        start = time.perf_counter()
        models[name] = training.distill(
            build_model(arch, params, shape, classes), teacher_logits, t["train"], y["train"], t["val"], y["val"],
            cfg, temperature=4.0, alpha=0.9,
        ).model  # fmt: skip
        print(f"distilled {name} in {time.perf_counter() - start:.0f}s", flush=True)
    return models


def _latency(model: Callable, x1: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
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


def _pt2e_x86(model: nn.Module, calibration: list[torch.Tensor]) -> tuple[nn.Module, int]:
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


def _profile(model: nn.Module, x: torch.Tensor, threads: int) -> list[dict[str, Any]]:
    """Top operators by self CPU time over 20 batch-64 passes."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(20):
                model(x)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:6]
    return [{"op": e.key, "self_cpu_ms_per_pass": e.self_cpu_time_total / 1000 / 20} for e in rows]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    start = time.perf_counter()
    splits = data_lib.prepare(DataConfig(source=str(args.data), seed=0))
    x_test, y_test = torch.from_numpy(splits.x["test"]), torch.from_numpy(splits.y["test"])
    x_train, y_train = torch.from_numpy(splits.x["train"]), torch.from_numpy(splits.y["train"])
    models = _train(args, splits)
    teacher_logits = training.compute_logits(models["teacher_cnn"], x_train)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x_train), generator=gen)[: 8 * 64]
    calibration = [x_train[order[i : i + 64]] for i in range(0, len(order), 64)]
    x1 = x_test[:1]
    rows: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_name, fp32 in models.items():
            arch, params = MODELS[model_name]
            spec = {"arch": arch, "params": params, "input_shape": list(splits.meta.input_shape),
                    "num_classes": splits.meta.num_classes}  # fmt: skip
            fp32_acc = evaluation.accuracy(evaluation.predict(fp32, x_test), y_test)

            def finetune(prepared: nn.Module) -> None:
                qat_cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-4, seed=0)
                training.kd_finetune(prepared, teacher_logits, x_train, y_train, qat_cfg, 4.0, 0.9)

            context = quantization.QuantizeContext(calibration=calibration, finetune=finetune)
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
                            quantization.save_model(quantized, spec | {"quantization": scheme, "backend": backend}, directory)
                            loaded, _ = quantization.load_model(directory)
                    except Exception as err:  # a backend that fails here is a result, not a crash
                        rows.append(row | {"error": f"{type(err).__name__}: {str(err)[:200]}"})
                        continue
                    row["bytes"] = evaluation.artifact_size_bytes(directory)
                    row["fp32_layers"] = quantization.fp32_layers(fp32, scheme, backend)
                    rows.append(row | _measure(loaded, x_test, y_test, x1, fp32_acc, args))
                    print(_line(rows[-1]), flush=True)
                    if backend.startswith("torchao"):
                        compiled = _Callable(torch.compile(loaded))
                        rows.append(
                            row | {"backend": backend + "+compile"}
                            | _measure(compiled, x_test, y_test, x1, fp32_acc, args)
                        )  # fmt: skip
                        print(_line(rows[-1]), flush=True)
            if not args.no_pt2e:
                row = {"model": model_name, "scheme": "static_int8", "backend": "pt2e.x86_inductor+compile(bench only)"}
                try:
                    compiled, size = _pt2e_x86(fp32, calibration)
                    row["bytes"] = size
                    row |= _measure(_Callable(compiled), x_test, y_test, x1, fp32_acc, args)
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
                finally:
                    import torch._inductor.config as inductor_config

                    inductor_config.freezing = False
                rows.append(row)
                print(_line(row), flush=True)
            if arch == "cnn":
                x64 = x1.expand(64, *x1.shape[1:]).contiguous()
                profiles[model_name] = {
                    "fp32": _profile(fp32, x64, args.threads),
                    "static_int8": _profile(quantization.quantize(fp32, "static_int8", context), x64, args.threads),
                }
    return {
        "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
                    "load_average": os.getloadavg()},  # fmt: skip
        "threads": args.threads,
        "versions": quantization.get_quantizer("weight_only_int8", "torchao.Int8WeightOnlyConfig").versions(),
        "data": str(args.data),
        "test_samples": len(y_test),
        "seconds": time.perf_counter() - start,
        "rows": rows,
        "profiles": profiles,
    }


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
        return f"{r['model']:<12} {r['scheme']:<16} {r['backend']:<48} FAILED {r['error'][:90]}"
    size = f"{r['bytes'] / 1e3:>8.1f}" if "bytes" in r else f"{'-':>8}"
    return (
        f"{r['model']:<12} {r['scheme']:<16} {r['backend']:<48} {size} {r.get('ratio', float('nan')):>6.3f} "
        f"{r['accuracy'] * 100:>6.2f} {r['drop_points']:>6.2f} "
        f"{r['b1_p50_ms']:>7.3f} {r['b1_p95_ms']:>7.3f} {r['b64_p50_ms']:>8.3f} {r['b64_p95_ms']:>8.3f} "
        f"{r.get('speedup_b64', float('nan')):>6.2f}"
    )


HEADER = (
    f"{'model':<12} {'scheme':<16} {'backend':<48} {'kB':>8} {'ratio':>6} {'acc%':>6} {'drop':>6} "
    f"{'b1 p50':>7} {'b1 p95':>7} {'b64 p50':>8} {'b64 p95':>8} {'x b64':>6}"
)


def _finish(result: dict[str, Any]) -> None:
    """Ratios to fp32 bytes and batch-64 speedups, per model."""
    base = {r["model"]: r for r in result["rows"] if r["scheme"] == "none" and "error" not in r}
    for r in result["rows"]:
        b = base.get(r["model"])
        if b is None or "error" in r:
            continue
        if "bytes" in r:
            r["ratio"] = r["bytes"] / b["bytes"]
        r["speedup_b64"] = b["b64_p50_ms"] / r["b64_p50_ms"]
        r["speedup_b1"] = b["b1_p50_ms"] / r["b1_p50_ms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/datasets/mnist5k.npz"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/quantization.json"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads while timing")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--iters", type=int, default=100, help="timed passes at batch 1 (half at batch 64)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-pt2e", action="store_true", help="skip the PT2E + torch.compile candidate")
    args = parser.parse_args(argv)
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file; pass the mnist5k .npz (x uint8 [N,1,28,28], y int64)")
    torch.set_num_threads(max(args.threads, 1))
    result = run(args)
    _finish(result)
    print()
    print(f"CPU {result['machine']['cpu']}, {result['machine']['cores']} cores, {args.threads} thread(s) while "
          f"timing; load average at the end {result['machine']['load_average']}; torch {torch.__version__}; "
          f"test split {result['test_samples']} samples; latency in ms")  # fmt: skip
    print(HEADER)
    print("-" * len(HEADER))
    for r in result["rows"]:
        print(_line(r))
    for name, prof in result["profiles"].items():
        for kind, ops in prof.items():
            top = ", ".join(f"{o['op']} {o['self_cpu_ms_per_pass']:.2f}" for o in ops[:4])
            print(f"profile {name} {kind} b64 (self CPU ms/pass): {top}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out} ({result['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
