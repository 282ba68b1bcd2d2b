"""The whole DAG on kfp.local against real MLflow stores: a fresh sqlite store and a real
`mlflow server` process on 127.0.0.1 (PostgreSQL-backed when KDFLOW_TEST_POSTGRES_URI is set)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kd_lib.config import DEFAULT_CANDIDATES, PipelineConfig
from kd_lib.data.dataset import DataError
from pipelines.local import LocalRunResult, run_local
from tests.helpers import tiny_config

pytestmark = pytest.mark.e2e

# Runs in a fresh interpreter: nothing of this test process (imports, caches) helps it load.
LOAD_CHAMPION = textwrap.dedent(
    """
    import json, sys
    import mlflow
    import numpy as np
    from kd_lib.config import DataConfig
    from kd_lib.data.dataset import load_source, stratified_split

    uri, name, alias, out = sys.argv[1:5]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@{alias}")
    cfg = DataConfig(source="digits", seed=0)
    x, y = load_source(cfg.source)
    _, _, test = stratified_split(y, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    preds = model.predict(x[test])   # raw pixels: the pyfunc applies the stored normalization
    json.dump([int(p) for p in preds["class_id"]], open(out, "w"))
    """
)


def _run(cfg: PipelineConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalRunResult:
    # run_local exports MLFLOW_TRACKING_URI for its task subprocesses; monkeypatch restores it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.tracking_uri or "")
    return run_local(cfg, root=tmp_path / "runs")


def _champion_predictions(uri: str, name: str, alias: str, tmp_path: Path) -> list[int]:
    out = tmp_path / "champion_preds.json"
    env = os.environ | {
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_REGISTRY_URI": uri,
    }
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_CHAMPION, uri, name, alias, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _assert_registered_champion(result: LocalRunResult, cfg: PipelineConfig, uri: str, tmp_path: Path) -> str:
    assert result.succeeded, result.error
    summary = result.summary
    assert summary["gate"]["passed"] is True
    version = summary["registered"]["version"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert str(champion.version) == version
    tags = champion.tags
    assert tags["validation_status"] == "passed"
    assert tags["kdflow.pipeline_run_id"] == result.pipeline_run_id
    assert tags["kdflow.config_hash"] == cfg.config_hash()
    assert tags["kdflow.dataset_fingerprint"] == summary["tags"]["kdflow.dataset_fingerprint"]
    assert tags["kdflow.teacher_run_id"] == summary["steps"]["train_teacher"]
    assert {f"gate.{c['name']}" for c in summary["gate"]["checks"]} <= set(tags)
    # Every step left a finished nested run under the parent, and the parent is closed.
    expected = {"prepare_data", "train_teacher", "distill", "quantize", "evaluate", "gate", "register"}
    assert expected <= set(summary["steps"])
    assert result.parent_run_id is not None
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["distill.train.epochs"] == "8"
    # The registered model, loaded without pickle in a fresh process, predicts what evaluate measured.
    measured = summary["evaluation"]["quantized"]["predictions"]
    assert _champion_predictions(uri, cfg.registry.model_name, "champion", tmp_path) == measured
    # One line per task, in DAG order, every one succeeded.
    tasks = ["prepare-data", "train-teacher", "distill", "quantize", "evaluate", "gate", "register", "finalize"]
    assert [(s["task"], s["status"]) for s in result.steps] == [(t, "SUCCESS") for t in tasks]
    _assert_evaluate_outputs(result)
    return version


def _assert_evaluate_outputs(result: LocalRunResult) -> None:
    """What the KFP UI shows for evaluate: HTML report, Markdown summary, metrics, confusion matrix."""
    evaluate_dir = result.pipeline_root / "evaluate"
    page = (evaluate_dir / "report").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count('src="data:image/png;base64,') == 3
    assert "PENDING" in page and '<section id="gate">' in page
    assert (evaluate_dir / "summary").read_text().startswith("# Compression report: kdflow-test")
    outputs = json.loads((evaluate_dir / "executor_output.json").read_text())["artifacts"]
    matrix = outputs["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [a["displayName"] for a in matrix["annotationSpecs"]] == [str(i) for i in range(10)]
    assert len(matrix["rows"]) == 10
    assert "quantized_accuracy" in outputs["metrics"]["artifacts"][0]["metadata"]


# About 200 s on 2 cores (three whole runs): in `make test-slow`. `make test` keeps a whole local run
# against a real MLflow server (below) and the registry-teacher path at step level (tests/kd_lib/steps).
@pytest.mark.slow
def test_pass_then_fail_then_distill_from_the_champion_on_a_fresh_sqlite_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # scheme auto (the default): the deployment candidates are built, measured and chosen.
    cfg = tiny_config(tmp_path, quantize={"scheme": "auto"})
    uri = cfg.tracking.tracking_uri
    assert uri is not None  # tiny_config points tracking at a sqlite store under tmp_path
    first = _run(cfg, tmp_path, monkeypatch)
    version = _assert_registered_champion(first, cfg, uri, tmp_path)
    assert first.report_path is not None and "PROMOTED" in first.report_path.read_text()
    quantized = first.summary["evaluation"]["quantized"]
    assert [c["name"] for c in quantized["candidates"]] == list(DEFAULT_CANDIDATES)
    chosen = [c for c in quantized["candidates"] if c["verdict"] == "chosen"]
    assert len(chosen) == 1 and chosen[0]["name"] == quantized["quantization"]
    champion_tags = (
        MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version(cfg.registry.model_name, version).tags
    )
    assert champion_tags["kdflow.quantization"] == chosen[0]["name"]
    assert champion_tags["kdflow.selection"].startswith(f"chose {chosen[0]['name']}")
    assert "Deployment candidates" in first.report_path.read_text()

    # Thresholds no student can meet: the run succeeds, the gate fails, nothing changes.
    strict = cfg.model_copy(deep=True)
    strict.gate.min_accuracy = 1.0
    strict.gate.min_compression_ratio = 1000.0
    second = _run(strict, tmp_path, monkeypatch)
    assert second.succeeded, second.error
    assert second.summary["gate"]["passed"] is False
    assert "registered" not in second.summary
    assert "register" not in second.summary["steps"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name = '{cfg.registry.model_name}'")
    assert [str(v.version) for v in versions] == [version]
    assert str(client.get_model_version_by_alias(cfg.registry.model_name, "champion").version) == version
    tags = second.summary["tags"]
    assert tags["kdflow.gate_status"] == "failed"
    # No candidate fits the size bar either: auto kept torch fp32 and says so.
    assert set(tags["kdflow.gate_failed_checks"].split(",")) == {
        "min_accuracy",
        "min_compression_ratio",
        "quantization_auto_found",
    }
    assert tags["gate.min_accuracy"].endswith("FAIL")
    assert "register" not in [s["task"] for s in second.steps]
    assert second.report_path is not None and "REJECTED" in second.report_path.read_text()

    # The registered champion as the teacher of a new run (teacher.source=mlflow: no training
    # task in the DAG), with the no-KD baseline trained beside the student.
    tree = json.loads(cfg.to_json())
    tree["teacher"] |= {"source": "mlflow", "uri": f"models:/{cfg.registry.model_name}@champion"}
    tree["distill"]["baseline"] = True
    tree["registry"]["model_name"] += "-from-registry"
    third = _run(PipelineConfig.model_validate(tree), tmp_path, monkeypatch)
    assert third.succeeded, third.error
    tasks = [s["task"] for s in third.steps]
    assert "import-teacher" in tasks and "train-teacher" not in tasks
    assert third.summary["tags"]["kdflow.teacher_source"] == f"models:/{cfg.registry.model_name}/{version}"
    evaluation = third.summary["evaluation"]
    # The imported teacher is the first run's registered model: the same test predictions.
    assert evaluation["teacher"]["predictions"] == first.summary["evaluation"]["quantized"]["predictions"]
    assert set(evaluation) == {"teacher", "student", "quantized", "baseline"}
    gain = evaluation["student"]["kd_gain_points"]
    assert gain == pytest.approx(100 * (evaluation["student"]["accuracy"] - evaluation["baseline"]["accuracy"]))
    paired = evaluation["student"]["kd_gain"]
    assert 100 * (paired["kd_only_right"] - paired["baseline_only_right"]) / paired["n"] == pytest.approx(gain)
    assert 0.0 < paired["p_value"] <= 1.0
    assert third.report_path is not None
    assert "KD gain" in third.report_path.read_text() and "exact McNemar p = " in third.report_path.read_text()


FAKE_SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIAKDFLOWFAKE7EXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "kdflow/Fake+Secret/Key/9f8e7d6c5b4a",
    "MLFLOW_TRACKING_USERNAME": "kdflow-ci-user-3c2b1a",
    "MLFLOW_TRACKING_PASSWORD": "Fake-Mlflow-Password-0a9b8c",
    "MLFLOW_TRACKING_TOKEN": "fake-token-5e4d3c2b1a09",
}


def _recorded_text(client: MlflowClient, cfg: PipelineConfig, result: LocalRunResult, tmp_path: Path) -> str:
    """Everything the run left behind: MLflow params, tags and artifacts of every run, the
    registered version's tags, and every file kfp.local wrote (executor inputs and outputs)."""
    parts: list[str] = []
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp is not None
    for run in client.search_runs([exp.experiment_id]):
        parts.append(json.dumps([run.data.params, run.data.tags, run.info.run_name]))
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, dst_path=str(tmp_path / "scan" / run.info.run_id), tracking_uri=client.tracking_uri
        )
        parts += [p.read_bytes().decode("utf-8", "replace") for p in Path(local).rglob("*") if p.is_file()]
    for v in client.search_model_versions(f"name = '{cfg.registry.model_name}'"):
        parts.append(json.dumps(v.tags))
    # The invocation directory: every task's files plus kfp.local's own log of all task output.
    parts += [p.read_bytes().decode("utf-8", "replace") for p in result.pipeline_root.parent.rglob("*") if p.is_file()]
    return "\n".join(parts)


def test_against_a_real_mlflow_server_leaking_no_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture, mlflow_server
) -> None:
    # Credentials in the environment, as a Kubernetes Secret would put them (the server
    # here has no auth, so they are sent and ignored): none may be recorded anywhere.
    for key, value in FAKE_SECRETS.items():
        monkeypatch.setenv(key, value)
    cfg = tiny_config(tmp_path, tracking={"tracking_uri": mlflow_server.url})
    result = _run(cfg, tmp_path, monkeypatch)
    _assert_registered_champion(result, cfg, mlflow_server.url, tmp_path)
    # The model's files went through the server's artifact proxy, not a path we share with it.
    assert any(mlflow_server.artifacts.rglob("weights.bin"))

    client = MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)
    recorded = _recorded_text(client, cfg, result, tmp_path)
    logs = capfd.readouterr()
    # The scan saw real content: artifacts, and kfp.local's full task log (kfp-local.log).
    assert "quantized_student" in recorded and "executor_output" in recorded and "prepare-data" in logs.out
    for key, secret in FAKE_SECRETS.items():
        assert secret not in recorded, f"{key} leaked into MLflow or KFP artifacts"
        assert secret not in logs.out + logs.err, f"{key} leaked into the logs"


def test_a_failing_step_closes_the_parent_run_as_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nope.npz"
    cfg = tiny_config(tmp_path, data={"source": str(missing)})
    result = _run(cfg, tmp_path, monkeypatch)
    assert not result.succeeded
    assert "prepare-data" in result.error or "prepare_data" in result.error
    # The run ends with the failed task's own error (kfp.local says only "Inner task failed").
    assert result.failed_task == "prepare-data" and f"{missing}: no such file" in result.failure_cause
    # ...as the task reported it (components run in kd_lib.steps.task.task): the DataError's
    # own cause, without the traceback's class prefix, and its fix.
    assert not result.failure_cause.startswith("DataError")
    assert result.failure_fix == DataError.default_fix
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    assert result.parent_run_id is not None  # prepare-data failed after the parent run was opened
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["kdflow.pipeline_state"] == "FAILED"
    with pytest.raises(MlflowException):  # RESOURCE_DOES_NOT_EXIST: nothing was registered
        client.get_registered_model(cfg.registry.model_name)
    # The failed task is named in the step lines; the exit handler still ran and wrote a report.
    statuses = {s["task"]: s["status"] for s in result.steps}
    assert statuses["prepare-data"] == "FAILURE" and statuses["finalize"] == "SUCCESS"
    assert result.report_path is not None and "NO DECISION" in result.report_path.read_text()
