"""A user's ResNet (BatchNorm inside residual blocks) through distill, ONNX Runtime static int8,
evaluate, gate and register: torch.ao's eager static int8 refuses it; the ONNX artifact is
built, verified in a fresh process and promoted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kd_lib.compress.quantization import QuantizationError, load_model
from kd_lib.steps.distill import distill
from kd_lib.steps.evaluate import evaluate
from kd_lib.steps.gate import gate
from kd_lib.steps.prepare_data import prepare_data
from kd_lib.steps.quantize import quantize
from kd_lib.steps.register import register
from kd_lib.steps.train_teacher import train_teacher
from tests.helpers import tiny_config


def test_a_user_resnet_quantizes_to_static_int8_registers_and_serves(in_tmp: Path) -> None:
    tmp = in_tmp
    cfg = tiny_config(
        tmp,
        student={"model": {"arch": "tests.helpers:user_resnet", "params": {"width": 8}}},
        distill={"train": {"epochs": 8, "batch_size": 64, "lr": 0.005, "patience": 8}},
        quantize={"scheme": "onnx_static_int8", "calibration_batches": 4},
        gate={"min_compression_ratio": 1.0, "max_quantization_drop": 3.0, "min_accuracy": 0.6},
    )
    d = {name: tmp / name for name in ("dataset", "teacher", "student", "quantized")}
    prepare_data(cfg, "rn", d["dataset"])
    train_teacher(cfg, "rn", d["dataset"], d["teacher"])
    distill(cfg, "rn", d["dataset"], d["teacher"], d["student"])

    # The deprecated torch.ao path cannot take it at all.
    eager = cfg.model_copy(deep=True)
    eager.quantize.scheme = "static_int8"
    with pytest.raises(QuantizationError, match="cannot (quantize|run)"):
        quantize(eager, "rn", d["dataset"], d["student"], tmp / "eager")

    quantize(cfg, "rn", d["dataset"], d["student"], d["quantized"], d["teacher"])
    model, spec = load_model(d["quantized"])
    assert spec["quantization"] == "onnx_static_int8" and spec["backend"] == "onnxruntime"
    assert (d["quantized"] / "model.onnx").is_file()
    chosen = json.loads((d["quantized"] / "selection.json").read_text())["candidates"][0]
    assert chosen["verdict"] == "chosen" and abs(chosen["drop_points"]) <= 3.0

    models = {"teacher": d["teacher"], "student": d["student"], "quantized": d["quantized"]}
    evaluate(cfg, "rn", d["dataset"], models, tmp / "evaluation.json")
    decision, action = gate(cfg, "rn", d["dataset"], tmp / "evaluation.json", tmp / "decision.json")
    assert decision.passed, decision.table()
    out = register(cfg, "rn", d["dataset"], d["quantized"], tmp / "evaluation.json", tmp / "decision.json")
    assert out["champion"] == out["version"] == "1"
    client = MlflowClient(cfg.tracking.tracking_uri, cfg.tracking.tracking_uri)
    tags = client.get_model_version(cfg.registry.model_name, "1").tags
    assert tags["validation_status"] == "passed" and tags["kdflow.backend"] == "onnxruntime"
    n = len(json.loads((tmp / "evaluation.json").read_text())["quantized"]["predictions"])
    assert f"predicted all {n} expected class ids" in tags["kdflow.verification"]
