"""Each component's own Python function, called directly on small fixtures (no KFP runner):
the adapters must pass paths and config through and fill their KFP outputs."""

import json
from pathlib import Path

import pytest
from kfp import dsl
from mlflow import MlflowClient

import components
from tests.helpers import experiment_id, tiny_config


def _art(cls, tmp_path: Path, name: str):
    return cls(name=name, uri=str(tmp_path / name), metadata={})


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """prepare_data -> ... -> gate, run once for the module: each test checks one component."""
    tmp = tmp_path_factory.mktemp("components")
    cfg = tiny_config(
        tmp,
        teacher={"train": {"epochs": 3}},
        distill={"train": {"epochs": 3}},
        gate={"min_accuracy": 0.5, "max_accuracy_drop": 40.0, "max_quantization_drop": 5.0},
    )
    cj, rid = cfg.to_json(), "component-test-run"
    out: dict = {"cfg": cfg, "tmp": tmp}
    out["dataset"] = _art(dsl.Dataset, tmp, "dataset")
    out["fingerprint"] = components.prepare_data.python_func(
        config_json=cj, pipeline_run_id=rid, dataset=out["dataset"]
    )
    out["teacher"] = _art(dsl.Model, tmp, "teacher")
    out["teacher_history"] = _art(dsl.Artifact, tmp, "teacher_history")
    out["teacher_acc"] = components.train_teacher.python_func(
        config_json=cj,
        pipeline_run_id=rid,
        dataset=out["dataset"],
        teacher=out["teacher"],
        history=out["teacher_history"],
    )
    out["student"] = _art(dsl.Model, tmp, "student")
    out["student_history"] = _art(dsl.Artifact, tmp, "student_history")
    out["baseline"] = _art(dsl.Model, tmp, "baseline")
    out["student_acc"] = components.distill.python_func(
        config_json=cj,
        pipeline_run_id=rid,
        dataset=out["dataset"],
        teacher=out["teacher"],
        student=out["student"],
        history=out["student_history"],
        baseline=out["baseline"],
    )
    out["quantized"] = _art(dsl.Model, tmp, "quantized")
    out["onnx"] = _art(dsl.Model, tmp, "onnx")
    out["bytes"] = components.quantize.python_func(
        config_json=cj,
        pipeline_run_id=rid,
        dataset=out["dataset"],
        teacher=out["teacher"],
        student=out["student"],
        baseline=out["baseline"],
        quantized=out["quantized"],
        onnx=out["onnx"],
    )
    out["evaluation"] = _art(dsl.Artifact, tmp, "evaluation")
    out["metrics"] = _art(dsl.Metrics, tmp, "metrics")
    out["confusion"] = _art(dsl.ClassificationMetrics, tmp, "confusion")
    out["report"] = _art(dsl.HTML, tmp, "report")
    out["summary"] = _art(dsl.Markdown, tmp, "summary")
    components.evaluate.python_func(
        config_json=cj,
        pipeline_run_id=rid,
        dataset=out["dataset"],
        teacher=out["teacher"],
        student=out["student"],
        quantized=out["quantized"],
        baseline=out["baseline"],
        teacher_history=out["teacher_history"],
        student_history=out["student_history"],
        evaluation=out["evaluation"],
        metrics=out["metrics"],
        confusion=out["confusion"],
        report=out["report"],
        summary=out["summary"],
    )
    out["decision"] = _art(dsl.Artifact, tmp, "decision")
    out["action"] = components.gate.python_func(
        config_json=cj,
        pipeline_run_id=rid,
        dataset=out["dataset"],
        evaluation=out["evaluation"],
        decision=out["decision"],
    )
    return out


def test_prepare_data_writes_the_dataset_and_returns_its_fingerprint(chain: dict) -> None:
    assert len(chain["fingerprint"]) == 64
    assert chain["dataset"].metadata["fingerprint"] == chain["fingerprint"]
    assert (Path(chain["dataset"].path) / "splits.npz").is_file()


def test_training_components_return_validation_accuracy(chain: dict) -> None:
    assert 0.5 < chain["teacher_acc"] <= 1.0
    assert 0.3 < chain["student_acc"] <= 1.0
    assert chain["teacher"].metadata["best_epoch"] >= 1
    for name in ("teacher", "student"):
        assert json.loads((Path(chain[name].path) / "spec.json").read_text())["role"] == name


def test_quantize_returns_the_artifact_bytes(chain: dict) -> None:
    files = list(Path(chain["quantized"].path).iterdir())
    # selection.json (how the artifact was chosen) sits beside the model and is not part of it.
    assert "selection.json" in {f.name for f in files}
    assert chain["bytes"] == sum(f.stat().st_size for f in files if f.name != "selection.json")
    assert chain["quantized"].metadata["scheme"] == "dynamic_int8"
    assert chain["quantized"].metadata["quantized_bytes"] < chain["quantized"].metadata["fp32_bytes"]


def test_evaluate_fills_metrics_and_the_evaluation_file(chain: dict) -> None:
    results = json.loads(Path(chain["evaluation"].path).read_text())
    assert set(results) == {"teacher", "student", "quantized"}
    assert chain["metrics"].metadata["quantized_accuracy"] == results["quantized"]["accuracy"]
    assert chain["metrics"].metadata["teacher_size_bytes"] == results["teacher"]["size_bytes"]


def test_gate_returns_the_action(chain: dict) -> None:
    decision = json.loads(Path(chain["decision"].path).read_text())
    assert chain["action"] == decision["action"] == ("promote" if decision["passed"] else "reject")
    assert chain["decision"].metadata["failed"] == [c["name"] for c in decision["checks"] if not c["passed"]]


def test_register_refuses_a_failed_decision_and_registers_a_passed_one(chain: dict, tmp_path: Path) -> None:
    cfg = chain["cfg"]
    failed = _art(dsl.Artifact, tmp_path, "failed_decision")
    Path(failed.path).write_text(
        json.dumps(
            {
                "passed": False,
                "checks": [
                    {
                        "name": "min_accuracy",
                        "value": 0.1,
                        "threshold": 0.8,
                        "op": ">=",
                        "passed": False,
                        "unit": "fraction",
                    }
                ],
            }
        )
    )
    args = dict(
        config_json=cfg.to_json(),
        pipeline_run_id="component-test-run",
        dataset=chain["dataset"],
        quantized=chain["quantized"],
        evaluation=chain["evaluation"],
    )
    with pytest.raises(RuntimeError, match="refusing to register: the gate failed \\(min_accuracy\\)"):
        components.register.python_func(decision=failed, **args)
    client = MlflowClient(cfg.tracking.tracking_uri, cfg.tracking.tracking_uri)
    assert client.search_model_versions(f"name = '{cfg.registry.model_name}'") == []
    assert chain["action"] == "promote", "tiny config is meant to pass its gate"
    version = components.register.python_func(decision=chain["decision"], **args)
    assert str(client.get_model_version_by_alias(cfg.registry.model_name, "champion").version) == version


def test_finalize_closes_the_parent_run(chain: dict) -> None:
    cfg = chain["cfg"]
    status = dsl.PipelineTaskFinalStatus(
        state="SUCCEEDED",
        pipeline_job_resource_name="x",
        pipeline_task_name="exit-handler-1",
        error_code=None,
        error_message=None,
    )
    components.finalize.python_func(config_json=cfg.to_json(), pipeline_run_id="component-test-run", status=status)
    client = MlflowClient(cfg.tracking.tracking_uri)
    parent = client.search_runs(
        [experiment_id(client, cfg.tracking.experiment)],
        filter_string="tags.`kdflow.step` = 'pipeline'",
    )[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["kdflow.pipeline_state"] == "SUCCEEDED"
