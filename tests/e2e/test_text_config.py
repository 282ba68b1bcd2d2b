"""configs/text.yaml end to end on kfp.local: the shipped movie_toy reviews tokenized by a
tokenizer built from the train split, a small transformer teacher trained from scratch, a text
CNN student distilled from it, an int64-ids artifact chosen, registered and verified on raw
strings in a fresh process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kd_lib.config import load_config
from pipelines.local import run_local

# Minutes on 2 cores shared with other tests (the transformer teacher is most of it).
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "text.yaml"


def test_the_text_config_registers_a_verified_text_student(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(CONFIG, [f"tracking.tracking_uri={uri}", f"registry.model_name=text-e2e-{tmp_path.name}"])
    assert cfg.data.text_column == "text" and cfg.teacher.model.arch == "transformer"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the sqlite store's run artifacts land here
    result = run_local(cfg, root=tmp_path / "runs")
    assert result.succeeded, f"{result.failed_task}: {result.failure_cause} {result.error}"
    summary = result.summary
    assert summary["gate"]["passed"] is True
    evaluation = summary["evaluation"]
    assert evaluation["quantized"]["accuracy"] >= cfg.gate.min_accuracy
    assert evaluation["teacher"]["num_params"] > 2 * evaluation["student"]["num_params"]

    # Every model directory the run wrote carries the tokenizer of the data's ids.
    runs = list((tmp_path / "runs").rglob("prepare-data/dataset/tokenizer.json"))
    assert len(runs) == 1
    tokenizer = runs[0].read_bytes()
    task_root = runs[0].parents[2]
    for model_dir in ("train-teacher/teacher", "distill/student", "quantize/quantized"):
        assert (task_root / model_dir / "tokenizer.json").read_bytes() == tokenizer, model_dir
        spec = json.loads((task_root / model_dir / "spec.json").read_text())
        assert spec["text"]["max_length"] == cfg.data.max_length and "vocab_size" in spec["params"]

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert str(champion.version) == summary["registered"]["version"]
    # register loaded it in a fresh process (pickle off), fed it the raw test strings, and it
    # predicted what evaluate measured on their token ids.
    assert champion.tags["validation_status"] == "passed"
    n = len(evaluation["quantized"]["predictions"])
    assert f"predicted all {n} expected class ids" in champion.tags["kdflow.verification"]
