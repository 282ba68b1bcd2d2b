"""The compiled KFP IR: the DAG the diagram shows, the config baked in, caching off."""

import json
from pathlib import Path

import yaml

from kd_lib.config import PipelineConfig, load_config
from pipelines.chain import training_steps
from pipelines.cluster import pytorchjob_steps
from pipelines.compile import compile_pipeline

REPO = Path(__file__).resolve().parents[2]


def _compiled(tmp_path: Path) -> tuple[dict, PipelineConfig]:
    cfg = load_config(REPO / "configs" / "demo.yaml")
    out = compile_pipeline(cfg, tmp_path / "pipeline.yaml")
    docs = list(yaml.safe_load_all(out.read_text()))
    return docs[0], cfg


def _deps(task: dict) -> set[str]:
    return set(task.get("dependentTasks", []))


def test_dag_matches_the_diagram(tmp_path: Path) -> None:
    spec, _ = _compiled(tmp_path)
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"exit-handler-1", "finalize"}
    assert root["finalize"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(inner) == {"prepare-data", "train-teacher", "distill", "quantize", "evaluate", "gate", "condition-2"}
    assert _deps(inner["train-teacher"]) == {"prepare-data"}
    assert _deps(inner["distill"]) == {"prepare-data", "train-teacher"}
    assert _deps(inner["quantize"]) == {"prepare-data", "train-teacher", "distill"}
    assert _deps(inner["evaluate"]) == {"prepare-data", "train-teacher", "distill", "quantize"}
    assert _deps(inner["gate"]) == {"prepare-data", "evaluate"}
    condition = inner["condition-2"]
    assert (
        condition["triggerPolicy"]["condition"] == "inputs.parameter_values['pipelinechannel--gate-Output'] != 'reject'"
    )
    register = spec["components"]["comp-condition-2"]["dag"]["tasks"]
    assert set(register) == {"register"}


def test_config_is_the_default_parameter_and_caching_is_off(tmp_path: Path) -> None:
    spec, cfg = _compiled(tmp_path)
    param = spec["root"]["inputDefinitions"]["parameters"]["config_json"]
    assert json.loads(param["defaultValue"]) == json.loads(cfg.to_json())
    all_tasks = [t for c in spec["components"].values() for t in c.get("dag", {}).get("tasks", {}).values()]
    all_tasks += list(spec["root"]["dag"]["tasks"].values())
    leaf = [t for t in all_tasks if not t["componentRef"]["name"].startswith(("comp-exit", "comp-condition"))]
    assert len(leaf) == 8
    assert all(t.get("cachingOptions", {}).get("enableCache", False) is False for t in leaf)


def test_every_step_runs_the_kdflow_image_without_pip(tmp_path: Path) -> None:
    spec, _ = _compiled(tmp_path)
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 8
    for name, ex in executors.items():
        container = ex["container"]
        assert container["image"].startswith("kdflow:"), name
        script = " ".join(container["command"])
        assert "pip install" not in script, f"{name} installs packages at start"


def test_a_hugging_face_teacher_is_imported_unless_fine_tuned() -> None:
    for fine_tune, step in ((False, "import_teacher"), (True, "train_teacher")):
        cfg = PipelineConfig.model_validate(
            {
                "data": {"source": "movie_toy", "text_column": "text"},
                "teacher": {"source": "huggingface", "uri": "/models/bert", "fine_tune": fine_tune},
                "cluster": {"pytorchjob": {"steps": ["train_teacher", "distill"]}},
            }
        )
        assert training_steps(cfg, for_cluster=False)[1] == step
        assert ("train_teacher" in pytorchjob_steps(cfg)) is fine_tune
