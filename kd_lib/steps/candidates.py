"""The quantize step's candidates: each deployment artifact built into its own model directory
and measured as it will be deployed (loaded back from disk; validation accuracy, bytes, p50
latency at every ``evaluate.batch_sizes`` with ``evaluate.threads`` threads).

Latencies are taken in interleaved rounds (every candidate once per round, the fastest round
kept), so a burst of load on the machine slows one round of every candidate instead of
deciding the comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kd_lib.artifacts.dataset_dir import DatasetMeta
from kd_lib.compress import quantization
from kd_lib.config import ONNX_SCHEMES, PipelineConfig
from kd_lib.data.lazy import LazySamples
from kd_lib.evaluate import metrics as evaluation
from kd_lib.evaluate.candidates import Candidate
from kd_lib.models.builders import for_data
from kd_lib.steps.inputs import accuracy, pad_id

# Rounds of latency measurement per candidate; the fastest round of each is kept.
LATENCY_ROUNDS = 3


def model_inputs(x: Any, spec: dict[str, Any], meta: DatasetMeta) -> Any:
    """``x`` (normalized with this run's train split) as the model in ``spec`` takes it: the same
    tensor for a model trained on it, raw features for an ONNX artifact (normalization folded in).
    Samples read lazily (``kd_lib.data.lazy``) get the transform on every read."""
    transform = for_data(torch.nn.Identity(), spec.get("normalization"), meta.normalization)
    if isinstance(x, LazySamples):
        return x if isinstance(transform, torch.nn.Identity) else x.map(transform)
    with torch.no_grad():
        return transform(x)


def build(
    name: str,
    student: torch.nn.Module,
    spec: dict[str, Any],
    meta: DatasetMeta,
    context: quantization.QuantizeContext,
    directory: Path,
    backend: str | None = None,
) -> Path:
    """Build candidate ``name`` from the fp32 ``student`` into ``directory``, with ``spec`` plus
    what the scheme adds (scheme, backend, versions, the layers left in fp32, calibration).

    Raises:
        QuantizationError: a torch scheme does not apply to this model.
    """
    if name in ONNX_SCHEMES:
        # lazy: the ONNX exporter and onnxruntime load only when an ONNX candidate is built
        from kd_lib.compress import onnx_runtime

        calibration_raw = [
            model_inputs(b, {"normalization": {"mean": 0.0, "std": 1.0}}, meta) for b in context.calibration
        ]
        return onnx_runtime.build_onnx_artifact(student, name, spec, calibration_raw, directory)
    model = quantization.quantize(student, name, context, backend)
    extra: dict[str, Any] = {
        "quantization": name,
        "backend": backend,
        "fp32_layers": quantization.fp32_layers(student, name, backend),
    }
    if name in ("static_int8", "qat_int8"):
        extra["calibration"] = {"batches": len(context.calibration), "batch_size": len(context.calibration[0])}
    return quantization.save_model(model, spec | extra, directory)


def measure(
    names: Sequence[str],
    directories: dict[str, Path],
    errors: dict[str, str],
    cfg: PipelineConfig,
    meta: DatasetMeta,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    fp32_val: float,
) -> list[Candidate]:
    """Every candidate's measurements, in ``names`` order (an unbuilt one carries its error)."""
    ecfg = cfg.evaluate
    loaded: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
    rows: dict[str, Candidate] = {}
    for name in names:
        if name in errors:
            rows[name] = Candidate(name=name, error=errors[name])
            continue
        model, spec = quantization.load_model(directories[name])
        x = model_inputs(x_val, spec, meta)
        val_acc = accuracy(model, x, y_val, pad_id(meta))
        rows[name] = Candidate(
            name=name,
            backend=str(spec.get("backend") or ""),
            val_accuracy=val_acc,
            drop_points=round((fp32_val - val_acc) * 100, 9),
            size_bytes=evaluation.artifact_size_bytes(directories[name]),
        )
        # Timed on one validation sample repeated: text data's ids at the full max_length.
        loaded[name] = (model, x[:1])
    for _ in range(LATENCY_ROUNDS):
        for name, (model, example) in loaded.items():
            timed = {
                bs: evaluation.latency_ms(
                    model,
                    example,
                    batch_size=bs,
                    warmup=ecfg.latency_warmup,
                    iters=ecfg.latency_iters,
                    threads=ecfg.threads,
                )["p50"]
                for bs in ecfg.batch_sizes
            }
            best = {bs: min(ms, rows[name].latency_ms.get(bs, ms)) for bs, ms in timed.items()}
            rows[name] = replace(rows[name], latency_ms=best)
    return [rows[name] for name in names]
