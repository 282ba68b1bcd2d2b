"""kd_lib.artifacts: the files between steps are validated on read and written byte for byte as before.

Each record test builds its file the way the step writes it today (a plain dict, ``json.dumps``)
and checks that the typed record reads it, names the file and field of a wrong one, and writes
back exactly the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kd_lib import artifacts
from kd_lib.artifacts import ArtifactError, dataset_dir, model_dir, records
from kd_lib.compress.quantization import load_model, quantize, save_model
from kd_lib.config import GateConfig
from kd_lib.evaluate import metrics
from kd_lib.evaluate.gates import GateDecision, decide
from kd_lib.models.builders import build_model

SPEC: dict[str, Any] = {"arch": "mlp", "params": {"width": 8, "depth": 1}, "input_shape": [6], "num_classes": 3}


def _model_dir(tmp_path: Path, scheme: str, **extra: Any) -> Path:
    torch.manual_seed(0)
    model = quantize(build_model("mlp", SPEC["params"], (6,), 3), scheme)
    return save_model(model, {**SPEC, "quantization": scheme, **extra}, tmp_path / scheme)


def _evaluation_as_the_step_writes_it(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """What steps.evaluate puts in evaluation.json, from the real measuring functions."""
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    results: dict[str, dict[str, Any]] = {}
    for role, scheme in (("teacher", "none"), ("student", "none"), ("quantized", "dynamic_int8"), ("baseline", "none")):
        directory = _model_dir(tmp_path / role, scheme, mlflow_run_id=f"run-{role}")
        model, spec = load_model(directory)
        results[role] = metrics.evaluate_model(
            model, x, y, 3, directory, num_params=99, batch_sizes=(1, 64), warmup=0, iters=2
        )
        results[role]["mlflow_run_id"] = spec.get("mlflow_run_id", "")
        results[role]["quantization"] = spec.get("quantization", "none")
        results[role]["backend"] = spec.get("backend", "none")
    results["quantized"]["quantization_auto_found"] = False
    results["quantized"]["quantization_auto_reason"] = "quantize.scheme auto: none of static_int8 kept ..."
    paired = metrics.paired_gain(
        torch.tensor(results["student"]["predictions"]), torch.tensor(results["baseline"]["predictions"]), y
    )
    results["student"]["kd_gain_points"] = paired["gain_points"]
    results["student"]["kd_gain"] = paired
    teacher = torch.tensor(results["teacher"]["predictions"])
    for role in ("student", "quantized"):
        results[role]["vs_teacher"] = metrics.agreement(teacher, torch.tensor(results[role]["predictions"]), y, 3)
    return results


# ---------------------------------------------------------------- evaluation.json


def test_evaluation_round_trips_byte_for_byte(tmp_path: Path) -> None:
    written = _evaluation_as_the_step_writes_it(tmp_path)
    today = tmp_path / "today.json"
    today.write_text(json.dumps(written))  # what the step wrote before the records
    record = records.read_evaluation(today)
    assert list(record.roles()) == ["teacher", "student", "quantized", "baseline"]
    quantized, student = record.quantized, record.student
    assert quantized is not None and student is not None
    assert student.vs_teacher is not None and student.kd_gain is not None
    assert quantized.accuracy == written["quantized"]["accuracy"]
    assert quantized.latency_ms(64, 95) == written["quantized"]["latency_b64_p95_ms"]
    assert student.vs_teacher.agreement == written["student"]["vs_teacher"]["agreement"]
    assert student.kd_gain.significant is written["student"]["kd_gain"]["significant"]
    assert record.to_dict() == written
    again = records.write_evaluation(tmp_path / "again.json", record)
    assert again.read_bytes() == today.read_bytes()
    from_dict = records.write_evaluation(tmp_path / "from_dict.json", written)
    assert from_dict.read_bytes() == today.read_bytes()


def test_the_placeholder_evaluation_of_an_empty_sweep_round_trips(tmp_path: Path) -> None:
    path = records.write_evaluation(tmp_path / "e.json", {})
    assert path.read_text() == "{}" and records.read_evaluation(path).roles() == {}


def test_ints_stay_ints_and_unknown_keys_stay(tmp_path: Path) -> None:
    written = {"quantized": {"accuracy": 1, "size_bytes": 5000, "latency_b1_p50_ms": 0.1, "extra": {"a": [1]}}}
    path = tmp_path / "e.json"
    path.write_text(json.dumps(written))
    quantized = records.read_evaluation(path).quantized
    assert quantized is not None and quantized.accuracy == 1 and isinstance(quantized.accuracy, int)
    assert records.write_evaluation(tmp_path / "out.json", records.read_evaluation(path)).read_text() == json.dumps(
        written
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"quantized": {"accuracy": "high"}}', r"e\.json: field quantized\.accuracy: .*expected a number"),
        ('{"teacher": {"predictions": [0, 1.5]}}', r"e\.json: field teacher\.predictions\[1\]"),
        ('{"student": {"vs_teacher": {"agreement": 1.0}}}', r"e\.json: field student\.vs_teacher\.n_disagree"),
        ('{"quantized": {"latency_b1_p50_ms": "fast"}}', r"e\.json: field quantized: .*latency_b1_p50_ms"),
        ("[1, 2]", r"e\.json: field the top level"),
        ("{not json", r"e\.json: unreadable or not JSON"),
    ],
)
def test_a_wrong_evaluation_names_the_file_and_field(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "e.json").write_text(content)
    with pytest.raises(ArtifactError, match=message):
        records.read_evaluation(tmp_path / "e.json")


def test_a_missing_record_names_the_file_and_its_writer(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"absent\.json: missing; the gate step writes it"):
        records.read_decision(tmp_path / "absent.json")


# ---------------------------------------------------------------- decision.json


def _decision() -> GateDecision:
    teacher = {"accuracy": 0.97, "size_bytes": 4_000_000}
    candidate = {"accuracy": 0.5, "size_bytes": 1_000_000, "quantization_auto_found": False}
    return decide(candidate, teacher, GateConfig(), fp32_student={"accuracy": 0.9})


def test_decision_round_trips_byte_for_byte(tmp_path: Path) -> None:
    decision = _decision()
    # What steps.gate wrote before the records: the dataclasses as dicts, plus the action and the sweep keys.
    today = {"passed": decision.passed, "checks": [dataclasses.asdict(c) for c in decision.checks]}
    assert decision.to_dict() == today
    for extra in ({"action": "reject"}, {"action": "reject", "candidate": "c0", "quantized_run_id": "r1"}):
        written = today | extra
        path = tmp_path / "today.json"
        path.write_text(json.dumps(written))
        record = records.read_decision(path)
        assert record.to_dict() == written
        assert records.write_decision(tmp_path / "again.json", record).read_bytes() == path.read_bytes()
        assert decision.to_record(**extra).to_dict() == written
        assert GateDecision.from_record(record) == decision == GateDecision.from_dict(written)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"action": "promote-now"}, r"field action"),
        ({"checks": [{"name": "x"}]}, r"field checks\[0\]\.value"),
        ({"passed": "yes"}, r"field passed"),
    ],
)
def test_a_wrong_decision_names_the_file_and_field(tmp_path: Path, change: dict[str, Any], message: str) -> None:
    path = tmp_path / "decision.json"
    path.write_text(json.dumps(_decision().to_dict() | change))
    with pytest.raises(ArtifactError, match=rf"decision\.json: {message}"):
        records.read_decision(path)


# ---------------------------------------------------------------- history.json


def test_history_round_trips_byte_for_byte(tmp_path: Path) -> None:
    rows = [
        {"epoch": 1, "train_loss": 1.2, "val_loss": 1.1, "val_accuracy": 0.5, "lr": 0.01, "seconds": 0.2, "kd": 0.3},
        {"epoch": 2, "train_loss": float("nan"), "val_loss": 1.0, "val_accuracy": 1, "lr": 0.005, "seconds": 0.1},
    ]
    for written in (rows, []):
        path = tmp_path / "today.json"
        path.write_text(json.dumps(written))
        record = records.read_history(path)
        assert records.write_history(tmp_path / "again.json", record).read_bytes() == path.read_bytes()
    assert records.read_history(tmp_path / "absent.json", missing_ok=True).to_list() == []
    (tmp_path / "bad.json").write_text(json.dumps([{"train_loss": 1.0}]))
    with pytest.raises(ArtifactError, match=r"bad\.json: field \[0\]\.epoch"):
        records.read_history(tmp_path / "bad.json")


# ---------------------------------------------------------------- the model directory


def test_read_spec_is_the_spec_as_written(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path, "dynamic_int8", normalization={"mean": 0.5, "std": [1, 2.0]}, role="student")
    spec = artifacts.read_spec(directory)
    assert spec.to_dict() == json.loads((directory / "spec.json").read_text())
    assert (spec.arch, spec.input_shape, spec.quantization) == ("mlp", [6], "dynamic_int8")
    assert (
        spec.backend == "torch.ao.quantization.quantize_dynamic" and (spec.versions or {})["torch"] == torch.__version__
    )
    assert artifacts.has_model(directory) and not artifacts.has_model(tmp_path) and not artifacts.has_model(None)
    assert model_dir.weights_path(directory) == directory / "weights.bin"


def test_a_wrong_spec_names_the_file_and_field(tmp_path: Path) -> None:
    directory = _model_dir(tmp_path, "none")
    spec = json.loads((directory / "spec.json").read_text())
    (directory / "spec.json").write_text(json.dumps(spec | {"num_classes": "three"}))
    with pytest.raises(ArtifactError, match=r"spec\.json: field num_classes"):
        artifacts.read_spec(directory)
    (directory / "spec.json").write_text(json.dumps({k: v for k, v in spec.items() if k != "arch"}))
    with pytest.raises(ArtifactError, match=r"spec\.json: missing key\(s\) arch"):
        artifacts.read_spec(directory)
    with pytest.raises(ValueError, match="model spec: field input_shape"):
        save_model(
            build_model("mlp", SPEC["params"], (6,), 3),
            {**SPEC, "input_shape": [], "quantization": "none"},
            tmp_path / "x",
        )
    assert not (tmp_path / "x").exists()  # nothing written before the spec is known to be good


# ---------------------------------------------------------------- the dataset directory


def _splits() -> dataset_dir.Splits:
    meta = dataset_dir.DatasetMeta(
        source="digits",
        fingerprint="f" * 64,
        num_classes=2,
        input_shape=[3],
        sizes={"train": 2, "val": 1, "test": 1},
        class_counts={"train": [1, 1], "val": [1, 0], "test": [0, 1]},
        normalization={"mean": 0.25, "std": 1.0},
    )
    x = {"train": np.zeros((2, 3), np.float32), "val": np.ones((1, 3), np.float32), "test": np.ones((1, 3), np.float32)}
    y = {"train": np.array([0, 1]), "val": np.array([0]), "test": np.array([1])}
    return dataset_dir.Splits(x=x, y=y, meta=meta)


def test_meta_json_is_written_as_before_and_validated_on_read(tmp_path: Path) -> None:
    splits = _splits()
    directory = dataset_dir.save_splits(splits, tmp_path / "ds")
    fields = ["source", "fingerprint", "num_classes", "input_shape", "sizes", "class_counts", "normalization"]
    today = {name: getattr(splits.meta, name) for name in fields} | {"class_names": [], "test_source": None}
    assert (directory / "meta.json").read_text() == json.dumps(today, indent=2)  # dataclasses.asdict order
    loaded = dataset_dir.load_splits(directory)
    assert loaded.meta == splits.meta and dataset_dir.read_meta(directory) == splits.meta
    (directory / "meta.json").write_text(json.dumps(today | {"num_classes": "2"}))
    with pytest.raises(ArtifactError, match=r"not a prepared kdflow dataset \(.*meta\.json: field num_classes"):
        dataset_dir.load_splits(directory)
    (directory / "meta.json").write_text(json.dumps(today))
    (directory / "splits.npz").write_bytes(b"not a zip")
    with pytest.raises(ArtifactError, match=r"splits\.npz: .*; re-run the prepare_data step"):
        dataset_dir.load_splits(directory)


# ---------------------------------------------------------------- what reading costs


def test_reading_specs_and_records_imports_neither_torch_nor_numpy(repo_root: Path) -> None:
    script = "import sys, kd_lib.artifacts\nprint(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
