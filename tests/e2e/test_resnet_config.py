"""configs/resnet.yaml end to end on kfp.local: a ResNet-14 teacher distilled into a half-width
ResNet-8 on the builtin digits, exported to ONNX (BatchNorm folded), int8 when it keeps the
accuracy, and registered."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from kd_lib.config import load_config
from kd_lib.models.builders import build_model, count_parameters
from pipelines.local import run_local

# A few minutes alone on 2 cores; more while other tests share them.
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1800)]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "resnet.yaml"


def test_the_resnet_config_registers_an_onnx_resnet_champion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(
        CONFIG,
        [f"tracking.tracking_uri={uri}", f"registry.model_name=resnet-e2e-{tmp_path.name}"],
    )
    assert cfg.teacher.model.arch == cfg.student.model.arch == "resnet"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the sqlite store's run artifacts land here
    result = run_local(cfg, root=tmp_path / "runs")
    assert result.succeeded, f"{result.failed_task}: {result.failure_cause} {result.error}"
    summary = result.summary
    assert summary["gate"]["passed"] is True, summary["gate"]["checks"]

    # The parameter counts evaluate reports are those of the configured ResNets.
    evaluation = summary["evaluation"]
    for role, model in (("teacher", cfg.teacher.model), ("student", cfg.student.model)):
        expected = count_parameters(build_model(model.arch, model.params, (1, 8, 8), 10))
        assert evaluation[role]["num_params"] == expected
    assert evaluation["teacher"]["num_params"] > 8 * evaluation["student"]["num_params"]
    assert evaluation["quantized"]["accuracy"] >= cfg.gate.min_accuracy

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert str(champion.version) == summary["registered"]["version"]
    tags = champion.tags
    # register loaded it in a fresh process (pickle off) and it predicted what evaluate measured.
    assert tags["validation_status"] == "passed"
    assert tags["kdflow.backend"] == "onnxruntime" and tags["kdflow.quantization"] in {"onnx_static_int8", "onnx_fp32"}
    n = len(evaluation["quantized"]["predictions"])
    assert f"predicted all {n} expected class ids" in tags["kdflow.verification"]
