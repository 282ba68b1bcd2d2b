"""The KFP UI renders artifacts by type: the evaluate step must emit the visualization types,
and the training steps the histories the report draws."""

from __future__ import annotations

import yaml

from components import distill, evaluate, train_teacher
from kd_lib.config import PipelineConfig
from pipelines.compile import compile_pipeline


def test_evaluate_emits_what_the_kfp_ui_visualizes() -> None:
    outputs = {name: spec.type.split("@")[0] for name, spec in evaluate.component_spec.outputs.items()}
    assert outputs == {
        "evaluation": "system.Artifact",
        "metrics": "system.Metrics",
        "confusion": "system.ClassificationMetrics",
        "report": "system.HTML",
        "summary": "system.Markdown",
    }


def test_histories_flow_from_the_training_steps_into_evaluate(tmp_path) -> None:
    for component in (train_teacher, distill):
        assert component.component_spec.outputs["history"].type.startswith("system.Artifact")
    spec = next(yaml.safe_load_all(compile_pipeline(PipelineConfig(), tmp_path / "p.yaml").read_text()))
    dag = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    inputs = dag["evaluate"]["inputs"]["artifacts"]
    for name, producer in (("teacher_history", "train-teacher"), ("student_history", "distill")):
        assert inputs[name]["taskOutputArtifact"] == {"outputArtifactKey": "history", "producerTask": producer}
