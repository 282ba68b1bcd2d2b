"""A teacher given as an ONNX file alone (``teacher.source: onnx``), distilled from on kfp.local:
import_teacher -> distill -> quantize -> evaluate -> gate -> register, no torch teacher anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from kd_lib.compress.onnx_runtime import export_fp32_onnx, weight_count
from kd_lib.config import DataConfig
from kd_lib.data.dataset import load_source
from kd_lib.models.builders import mlp
from pipelines.local import run_local
from tests.helpers import tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]


def _teacher_file(tmp_path: Path) -> Path:
    """A teacher trained outside kdflow on raw digits scaled by 1/16, exported to ONNX and nothing else."""
    x, y = load_source(DataConfig(source="digits").source)
    xt, yt = torch.from_numpy(x).float() / 16.0, torch.from_numpy(y)
    torch.manual_seed(0)
    model = mlp((1, 8, 8), 10, width=128, depth=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return export_fp32_onnx(model.eval(), (1, 8, 8), None, tmp_path / "teacher.onnx")


def test_distilling_from_an_onnx_file_alone_registers_a_champion(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _teacher_file(tmp_path)
    teacher = {"source": "onnx", "uri": str(path), "input_normalization": {"mean": 0.0, "std": 16.0}}
    cfg = tiny_config(tmp_path, teacher=teacher)
    uri = cfg.tracking.tracking_uri or ""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    result = run_local(cfg, root=tmp_path / "runs")
    assert result.succeeded, f"{result.failed_task}: {result.failure_cause} {result.error}"
    summary = result.summary
    tasks = [s["task"] for s in result.steps]
    assert "import-teacher" in tasks and "train-teacher" not in tasks
    assert summary["gate"]["passed"] is True, summary["gate"]["checks"]
    teacher_eval = summary["evaluation"]["teacher"]
    # Counted from the file's initializers (+ the folded mean and std), run by ONNX Runtime.
    assert teacher_eval["num_params"] == weight_count(path.read_bytes()) + 2
    assert teacher_eval["backend"] == "onnxruntime" and teacher_eval["accuracy"] > 0.9
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert champion.tags["validation_status"] == "passed"
    assert result.parent_run_id is not None
    assert client.get_run(result.parent_run_id).data.tags["kdflow.teacher_source"] == str(path)
