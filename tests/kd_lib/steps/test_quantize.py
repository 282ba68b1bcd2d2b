"""The quantize step on real (tiny) artifacts: calibration from the dataset, QAT with the
teacher, `auto` with its logged tries and its gate failure, ONNX export checked with
onnxruntime, and the registered pyfunc loading without pickle."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lib.adapters.tracking import client_for
from kd_lib.artifacts.dataset_dir import load_splits
from kd_lib.compress.quantization import QuantizationError, load_model, save_model
from kd_lib.config import DEFAULT_CANDIDATES, PipelineConfig
from kd_lib.evaluate import gates
from kd_lib.steps.distill import distill
from kd_lib.steps.evaluate import evaluate
from kd_lib.steps.gate import gate
from kd_lib.steps.prepare_data import prepare_data
from kd_lib.steps.quantize import quantize as quantize_step
from kd_lib.steps.train_teacher import train_teacher
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """prepare_data -> train_teacher -> distill once (digits, MLP student and CNN student)."""
    root = tmp_path_factory.mktemp("quantize_step")
    # A sqlite store puts run artifacts under ./mlruns of the working directory: keep them here.
    cwd = os.getcwd()
    os.chdir(root)
    try:
        yield _train(root)
    finally:
        os.chdir(cwd)


def _train(root: Path) -> dict[str, Path]:
    cfg = tiny_config(root)
    paths = {"root": root, "dataset": root / "dataset", "teacher": root / "teacher"}
    prepare_data(cfg, "prep", paths["dataset"])
    train_teacher(cfg, "prep", paths["dataset"], paths["teacher"])
    for arch, params in (("mlp", {"width": 24, "depth": 1}), ("cnn", {"channels": 4, "depth": 1, "hidden": 16})):
        student_cfg = _cfg(root, student={"model": {"arch": arch, "params": params}})
        paths[arch] = root / f"student_{arch}"
        distill(student_cfg, "prep", paths["dataset"], paths["teacher"], paths[arch])
    return paths


def _cfg(root: Path, **sections: dict) -> PipelineConfig:
    cfg = tiny_config(root, **sections)
    # All tests of this module share one tracking store (the fixture's).
    cfg.tracking.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    return cfg


def _quantize(trained: dict[str, Path], tmp_path: Path, arch: str = "mlp", **quantize: object):
    cfg = _cfg(trained["root"], quantize=dict(quantize))
    out = tmp_path / "quantized"
    info = quantize_step(
        cfg,
        f"run-{tmp_path.name}",
        trained["dataset"],
        trained[arch],
        out,
        teacher_dir=trained["teacher"],
        onnx_dir=tmp_path / "onnx",
    )
    return cfg, info, out


def _step_run(cfg: PipelineConfig, pipeline_run_id: str) -> dict:
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp is not None
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`kdflow.pipeline_run_id` = '{pipeline_run_id}' and tags.`kdflow.step` = 'quantize'"
    )
    assert len(runs) == 1
    data = runs[0].data
    return {"params": dict(data.params), "metrics": dict(data.metrics), "tags": dict(data.tags)}


def test_static_int8_calibrates_on_the_dataset(trained, tmp_path: Path) -> None:
    cfg, info, out = _quantize(
        trained, tmp_path, arch="cnn", scheme="static_int8", calibration_batches=3, calibration_batch_size=32
    )
    spec = json.loads((out / "spec.json").read_text())
    assert spec["quantization"] == "static_int8" and spec["backend"] == "torch.ao.quantization.eager[x86]"
    assert spec["calibration"] == {"batches": 3, "batch_size": 32}
    assert spec["fp32_layers"] == []
    # (This CNN is too tiny for int8 to be smaller than fp32: per-tensor file overhead dominates;
    # sizes are tested on a realistic model in test_quantization_schemes.)
    assert info["quantized_bytes"] == sum(p.stat().st_size for p in out.iterdir() if p.name != "selection.json")
    selected = json.loads((out / "selection.json").read_text())
    assert selected["select"] == "named" and selected["chosen"] == "static_int8"
    assert [c["name"] for c in selected["candidates"]] == ["static_int8"]  # torch fp32 is the reference
    assert selected["reference"]["name"] == "none" and abs(selected["candidates"][0]["drop_points"]) < 5.0
    load_model(out)


def test_dynamic_int8_records_the_convolutions_it_left_in_fp32(trained, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="Conv2d"):
        _, _, out = _quantize(trained, tmp_path, arch="cnn", scheme="dynamic_int8")
    assert json.loads((out / "spec.json").read_text())["fp32_layers"] == ["0 (Conv2d)"]
    with pytest.raises(QuantizationError, match="'dynamic_int8'.*Conv2d"):
        _quantize(trained, tmp_path / "strict", arch="cnn", scheme="dynamic_int8", allow_fp32_layers=False)


def test_qat_fine_tunes_with_the_teacher(trained, tmp_path: Path) -> None:
    cfg, info, out = _quantize(trained, tmp_path, scheme="qat_int8", qat_epochs=2)
    model, spec = load_model(out)
    assert spec["quantization"] == "qat_int8"
    run = _step_run(cfg, f"run-{tmp_path.name}")
    assert "qat.train_loss" in run["metrics"]
    assert json.loads((out / "selection.json").read_text())["candidates"][0]["val_accuracy"] > 0.8


def test_qat_fine_tunes_on_the_transfer_set_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With distill.transfer_source, qat_int8's fine-tuning learns the teacher's answers on the
    unlabeled samples as distill did (logged as qat.transfer_size), and its weights differ from a
    fine-tuning without them (its answers on the validation split differ)."""
    from sklearn.datasets import load_digits

    monkeypatch.chdir(tmp_path)  # the sqlite store's run artifacts go to ./mlruns: keep them here

    digits = load_digits()
    x, y = digits.images[:, None].astype(np.float32), digits.target.astype(np.int64)
    np.savez(tmp_path / "labeled.npz", x=x[:600], y=y[:600])
    np.savez(tmp_path / "unlabeled.npz", x=x[600:])
    sections: dict = {
        "data": {"source": str(tmp_path / "labeled.npz")},
        "distill": {"transfer_source": str(tmp_path / "unlabeled.npz")},
        "student": {"model": {"arch": "cnn", "params": {"channels": 4, "depth": 1, "hidden": 16}}},
        "quantize": {"scheme": "qat_int8", "qat_epochs": 1},
    }
    cfg = tiny_config(tmp_path, **sections)
    prepare_data(cfg, "qat", tmp_path / "dataset")
    train_teacher(cfg, "qat", tmp_path / "dataset", tmp_path / "teacher")
    distill(cfg, "qat", tmp_path / "dataset", tmp_path / "teacher", tmp_path / "student")
    x_val = torch.from_numpy(load_splits(tmp_path / "dataset").x["val"])
    outputs = {}
    for name, transfer in (("with", cfg.distill.transfer_source), ("without", None)):
        run_cfg = cfg.model_copy(deep=True)
        run_cfg.distill.transfer_source = transfer
        out = tmp_path / f"q-{name}"
        quantize_step(run_cfg, f"qat-{name}", tmp_path / "dataset", tmp_path / "student", out, tmp_path / "teacher")
        assert _step_run(run_cfg, f"qat-{name}")["params"]["qat.transfer_size"] == ("1197" if transfer else "0")
        model, spec = load_model(out)
        assert spec["quantization"] == "qat_int8"
        with torch.no_grad():
            outputs[name] = model(x_val)
    assert not torch.equal(outputs["with"], outputs["without"])


def test_auto_measures_every_candidate_and_keeps_the_fastest_not_slower_than_torch_fp32(
    trained, tmp_path: Path
) -> None:
    cfg, info, out = _quantize(trained, tmp_path, arch="cnn", scheme="auto", candidates=[*DEFAULT_CANDIDATES, "bf16"])
    spec = json.loads((out / "spec.json").read_text())
    assert "quantization_auto" not in spec and "validation" not in spec
    # The measurements sit beside the spec, not in it, and do not count in the model's size.
    auto = json.loads((out / "selection.json").read_text())
    tries = {t["name"]: t for t in auto["candidates"]}
    assert list(tries) == [*DEFAULT_CANDIDATES, "bf16"]
    assert auto["found"] is True and auto["select"] == "fastest" and auto["threads"] == cfg.evaluate.threads
    assert info["quantized_bytes"] == sum(p.stat().st_size for p in out.iterdir() if p.name != "selection.json")
    chosen = [t for t in tries.values() if t["verdict"] == "chosen"]
    assert len(chosen) == 1 and chosen[0]["name"] == spec["quantization"] == info["scheme"]
    reference = tries["none"]["latency_ms"]
    for bs, ms in chosen[0]["latency_ms"].items():
        assert ms <= reference[bs], (bs, ms, reference[bs])
    # Every qualifying candidate is slower (geometric mean) than the chosen one.
    best = math.prod(chosen[0]["latency_ms"].values())
    for t in tries.values():
        if t["verdict"] == "qualifies":
            assert math.prod(t["latency_ms"].values()) >= best
    # The ONNX artifacts were built and measured as deployed (loaded back from their directory).
    assert tries["onnx_fp32"]["backend"] == "onnxruntime" and tries["onnx_fp32"]["drop_points"] == 0.0
    assert tries["onnx_static_int8"]["backend"] == tries["onnx_dynamic_int8"]["backend"] == "onnxruntime"
    assert spec["class_names"] == [str(i) for i in range(10)] and spec["source_role"] == "student"
    run = _step_run(cfg, f"run-{tmp_path.name}")
    for name in tries:
        assert f"candidate.{name}.latency_b64_p50_ms" in run["metrics"]
    assert run["tags"]["kdflow.quantize_choice"] == spec["quantization"]
    model, _ = load_model(out)  # what was chosen loads


def test_auto_without_a_qualifying_candidate_keeps_fp32_and_fails_the_gate_with_the_reason(
    trained, tmp_path: Path
) -> None:
    # dynamic_int8 cannot apply to the CNN's convolutions when fp32 layers are refused.
    cfg, info, out = _quantize(
        trained, tmp_path, arch="cnn", scheme="auto", candidates=["dynamic_int8"], allow_fp32_layers=False
    )
    assert info["auto_found"] is False and info["scheme"] == "none"
    model, spec = load_model(out)  # a real model, not None
    selected = json.loads((out / "selection.json").read_text())
    assert selected["found"] is False and selected["chosen"] is None
    reason = selected["reason"]
    assert reason.startswith("no candidate qualified") and "dynamic_int8: not applicable" in reason
    assert "Conv2d" in reason

    models = {"teacher": trained["teacher"], "student": trained["cnn"], "quantized": out}
    cfg.evaluate.latency_iters = 1
    evaluate(cfg, f"run-{tmp_path.name}", trained["dataset"], models, tmp_path / "evaluation.json")
    decision, action = gate(
        cfg, f"run-{tmp_path.name}", trained["dataset"], tmp_path / "evaluation.json", tmp_path / "decision.json"
    )
    assert not decision.passed and action == "reject"
    failed = {c.name: c for c in decision.failed()}
    assert "quantization_auto_found" in failed
    assert failed["quantization_auto_found"].detail == reason
    assert "quantization_auto_found: no candidate qualified" in decision.table()
    again = gates.GateDecision.from_dict(json.loads((tmp_path / "decision.json").read_text()))
    assert again.failed()[-1].detail == failed["quantization_auto_found"].detail


@pytest.fixture(scope="module")
def untrained_student(trained) -> Path:
    """The MLP student with fresh random weights: a "KD student" its baseline beats significantly."""
    model, spec = load_model(trained["mlp"])
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    return save_model(model, spec, trained["root"] / "untrained_mlp")


@pytest.mark.parametrize("promote", ["better", "kd"])
def test_a_significantly_better_baseline_goes_on_or_fails_the_gate(
    trained, untrained_student: Path, tmp_path: Path, promote: str
) -> None:
    cfg = _cfg(trained["root"], distill={"baseline": True, "promote": promote})
    run_id = f"run-{tmp_path.name}"
    out = tmp_path / "quantized"
    info = quantize_step(
        cfg, run_id, trained["dataset"], untrained_student, out, trained["teacher"], baseline_dir=trained["mlp"]
    )
    spec = json.loads((out / "spec.json").read_text())
    promotion = spec["promotion"]
    assert promotion["kd_significantly_worse"] is True and promotion["p_value"] < 0.05
    assert promotion["kd_gain_points"] < -30
    expected_role = "baseline" if promote == "better" else "student"
    assert info["source_role"] == spec["source_role"] == expected_role
    assert f"distill.promote: {promote}" in promotion["reason"]

    models = {
        "teacher": trained["teacher"],
        "student": untrained_student,
        "baseline": trained["mlp"],
        "quantized": out,
    }
    cfg.evaluate.latency_iters = 1
    evaluate(cfg, run_id, trained["dataset"], models, tmp_path / "evaluation.json")
    decision, action = gate(cfg, run_id, trained["dataset"], tmp_path / "evaluation.json", tmp_path / "decision.json")
    check = {c.name: c for c in decision.checks}["kd_not_worse"]
    # The quantization drop is measured against the model that went on.
    drop = {c.name: c for c in decision.checks}["max_quantization_drop"]
    if promote == "better":
        assert check.passed and decision.passed and action == "promote"
        assert drop.value < 2.0
    else:
        assert not check.passed and action == "reject"
        assert "distill.promote: kd keeps the KD student" in check.detail
    assert _step_run(cfg, run_id)["tags"]["kdflow.promotion"] == promotion["reason"]


def test_onnx_export_is_checked_with_onnxruntime_on_the_test_split(trained, tmp_path: Path) -> None:
    cfg, info, out = _quantize(trained, tmp_path, arch="cnn", scheme="static_int8", export_onnx=True)
    report = json.loads((tmp_path / "onnx" / "onnx_check.json").read_text())
    assert report == info["onnx"]
    assert report["fp32"]["agreement_with_torch"] == 1.0 and report["fp32"]["max_abs_logit_diff"] < 1e-3
    assert report["fp32"]["test_accuracy"] == report["fp32"]["torch_test_accuracy"]
    import onnx

    ops = {node.op_type for node in onnx.load(tmp_path / "onnx" / "student_quantized.onnx").graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} & ops >= {"QuantizeLinear", "DequantizeLinear"}
    assert report["quantized_onnx"].startswith("onnxruntime quantize_static, QDQ, per-channel")
    assert report["quantized"]["test_accuracy"] > report["fp32"]["test_accuracy"] - 0.05
    assert sorted(p.name for p in (tmp_path / "onnx").iterdir()) == [
        "onnx_check.json",
        "student_fp32.onnx",
        "student_quantized.onnx",
    ]
    # The ONNX files are not part of the quantized artifact (its size is what the gate measures).
    assert sorted(p.name for p in out.iterdir()) == ["selection.json", "spec.json", "weights.bin"]


LOAD_PYFUNC = textwrap.dedent(
    """
    import json, sys
    import mlflow, numpy as np
    x = np.load(sys.argv[2])
    out = {}
    for scheme, uri in json.loads(sys.argv[1]).items():
        out[scheme] = mlflow.pyfunc.load_model(uri).predict(x)["class_id"].tolist()
    print(json.dumps(out))
    """
)


def test_pyfunc_of_each_kind_of_artifact_loads_without_pickle(trained, tmp_path: Path, repo_root: Path) -> None:
    import mlflow
    from mlflow.pyfunc import PythonModelContext

    from kd_lib.adapters.serving import KdflowPyfunc, log_pyfunc, pip_requirements

    x = np.random.default_rng(0).uniform(0, 16, size=(20, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    previous_uri = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'pyfunc.db'}")
    uris, expected = {}, {}
    try:
        # Artifacts under tmp_path, not ./mlruns of the working directory.
        experiment = mlflow.create_experiment("pyfunc", artifact_location=(tmp_path / "artifacts").as_uri())
        for scheme in ("static_int8", "weight_only_int8", "bf16"):
            _, _, out = _quantize(trained, tmp_path / scheme, arch="cnn", scheme=scheme)
            spec = json.loads((out / "spec.json").read_text())
            with mlflow.start_run(experiment_id=experiment):
                uris[scheme], _ = log_pyfunc(out, spec, pip_requirements(spec))
            wrapper = KdflowPyfunc()
            context = PythonModelContext(artifacts={"model": str(out)}, model_config={})
            wrapper.load_context(context)
            expected[scheme] = wrapper.predict(context, x)["class_id"].tolist()
    finally:
        mlflow.set_tracking_uri(previous_uri)
    env = os.environ | {
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'pyfunc.db'}",
        "PYTHONPATH": "",  # the model ships kd_lib itself
    }
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_PYFUNC, json.dumps(uris), str(tmp_path / "x.npy")],
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected
