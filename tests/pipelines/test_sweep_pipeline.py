"""The sweep DAG as compiled for the cluster (KFP's own protos), and the local step display
when a ParallelFor runs tasks side by side."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from kfp.local import logging_utils
from kfp.local.status import Status
from kfp.pipeline_spec import pipeline_spec_pb2 as pb

from kd_lib.config import PipelineConfig, load_config
from kd_lib.evaluate import sweep
from pipelines.build import build_pipeline
from pipelines.compile import compile_pipeline
from pipelines.local import StepDisplay
from tests.pipelines.test_compiled_spec import Compiled

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "configs" / "sweep.yaml"
CANDIDATE_STEPS = {"distill", "quantize", "evaluate", "gate"}


@pytest.fixture(scope="module")
def cfg() -> PipelineConfig:
    return load_config(SWEEP, ["sweep.parallelism=3", "image=registry.example.com/ml/kdflow:1.2.3"])


@pytest.fixture(scope="module")
def compiled(cfg: PipelineConfig, tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return Compiled(compile_pipeline(cfg, tmp_path_factory.mktemp("sweep") / "pipeline.yaml"))


def _loop(compiled: Compiled) -> tuple[str, pb.PipelineTaskSpec]:
    loops = [(n, t) for n, t in compiled.dag("comp-exit-handler-1").items() if t.HasField("parameter_iterator")]
    assert len(loops) == 1, "expected exactly one ParallelFor"
    return loops[0]


def test_the_candidates_fan_out_in_a_parallel_for_with_the_configured_parallelism(
    compiled: Compiled, cfg: PipelineConfig
) -> None:
    name, loop = _loop(compiled)
    assert loop.task_info.name == "candidates"
    assert loop.iterator_policy.parallelism_limit == 3
    # One item per candidate, from sweep-items: its full config JSON, computed when the
    # pipeline was built, with the run id.
    assert loop.parameter_iterator.items.input_parameter == "pipelinechannel--sweep-items-Output"
    assert set(loop.dependent_tasks) == {"prepare-data", "train-teacher", "sweep-items"}
    items_task = compiled.dag("comp-exit-handler-1")["sweep-items"]
    constant = items_task.inputs.parameters["candidate_configs"].runtime_value.constant
    items = [v.string_value for v in constant.list_value.values]
    assert items == sweep.candidate_configs(cfg) and len(items) == 6
    assert [json.loads(i)["candidate"] for i in items] == [c.name for c in sweep.expand(cfg)]
    assert (
        items_task.inputs.parameters["pipeline_run_id"].runtime_value.constant.string_value == "{{$.pipeline_job_name}}"
    )

    body = compiled.dag(loop.component_ref.name)
    assert {n: set(t.dependent_tasks) for n, t in body.items()} == {
        "distill": set(),
        "quantize": {"distill"},
        "evaluate": {"distill", "quantize"},
        "gate": {"evaluate"},
    }
    item = loop.parameter_iterator.item_input
    for step, task in body.items():
        params = task.inputs.parameters
        # Each candidate's tasks run on its own config, nested under the one run id.
        assert params["config_json"].component_input_parameter == item, step
        assert params["config_json"].parameter_expression_selector == 'parseJson(string_value)["config_json"]', step
        assert params["pipeline_run_id"].parameter_expression_selector == 'parseJson(string_value)["pipeline_run_id"]'
        assert not task.caching_options.enable_cache


def test_select_collects_every_candidate_and_register_takes_the_chosen_one(
    compiled: Compiled, cfg: PipelineConfig
) -> None:
    loop_name, _ = _loop(compiled)
    inner = compiled.dag("comp-exit-handler-1")
    select = inner["select"]
    assert list(select.dependent_tasks) == [loop_name]
    collected = {
        k: (a.task_output_artifact.producer_task, a.task_output_artifact.output_artifact_key)
        for k, a in select.inputs.artifacts.items()
    }
    assert collected == {
        "evaluations": (loop_name, "pipelinechannel--evaluate-evaluation"),
        "decisions": (loop_name, "pipelinechannel--gate-decision"),
        "quantized_models": (loop_name, "pipelinechannel--quantize-quantized"),
    }
    # select gets the same candidate configs the loop fanned out: it hands the chosen one to register.
    constant = select.inputs.parameters["candidate_configs"].runtime_value.constant
    assert [v.string_value for v in constant.list_value.values] == sweep.candidate_configs(cfg)
    select_inputs = compiled.spec.components["comp-select"].input_definitions
    assert select_inputs.artifacts["evaluations"].is_artifact_list

    branch = next(t for t in inner.values() if t.task_info.name == "candidate-passed")
    assert branch.trigger_policy.condition == "inputs.parameter_values['pipelinechannel--select-Output'] != 'reject'"
    register = compiled.dag(branch.component_ref.name)["register"]
    assert (
        register.inputs.parameters["config_json"].component_input_parameter == "pipelinechannel--select-selected_config"
    )
    assert {k: a.component_input_artifact for k, a in register.inputs.artifacts.items()} == {
        "dataset": "pipelinechannel--prepare-data-dataset",
        "quantized": "pipelinechannel--select-quantized",
        "evaluation": "pipelinechannel--select-evaluation",
        "decision": "pipelinechannel--select-decision",
    }
    root = dict(compiled.spec.root.dag.tasks)
    assert set(root) == {"exit-handler-1", "finalize"}


def test_every_task_gets_the_cluster_settings(compiled: Compiled) -> None:
    steps = ["prepare_data", "train_teacher", "sweep_items", *sorted(CANDIDATE_STEPS), "select", "register", "finalize"]
    assert len(compiled.deployment.executors) == len(steps)
    for step in steps:
        assert compiled.container(step).image == "registry.example.com/ml/kdflow:1.2.3", step
        assert compiled.k8s(step).pod_metadata.labels["kdflow.io/mlflow-client"] == "true", step


def test_build_pipeline_dispatches_on_the_sweep_section(cfg: PipelineConfig) -> None:
    assert build_pipeline(cfg).name == "kdflow-sweep"
    assert build_pipeline(cfg.model_copy(update={"sweep": None})).name == "kdflow-distillation"
    imported = load_config(SWEEP, ["teacher.source=mlflow", "teacher.uri=models:/teacher@champion"])
    tasks = build_pipeline(imported, for_cluster=False).pipeline_spec.components
    assert "comp-import-teacher" in tasks and "comp-train-teacher" not in tasks


# ---------------------------------------------------------------- the local display


def _start(task: str) -> str:
    return f"01:13:32.815 - INFO - Executing task {logging_utils.format_task_name(task)}"


def _finish(task: str, status: Status = Status.SUCCESS) -> str:
    name, result = logging_utils.format_task_name(task), logging_utils.format_status(status)
    return f"01:13:51.946 - INFO - Task {name} finished with status {result}"


def test_tasks_running_side_by_side_each_get_their_line() -> None:
    out, err, log = io.StringIO(), io.StringIO(), io.StringIO()
    display = StepDisplay(out, err, log, live=True)
    lines = [
        _start("prepare-data"),
        "    distill done: best val_acc 0.9 at epoch 1 of 1",
        _finish("prepare-data"),
        _start("distill"),
        _start("distill"),
        "    distill epoch 1/8  loss 1.0  val_acc 0.5",
        _finish("distill"),
        _start("quantize"),
        _finish("distill"),
        _finish("quantize", Status.FAILURE),
    ]
    for line in lines:
        display.write(line + "\n")
    shown = [line for line in out.getvalue().replace("\r\x1b[K", "\n").splitlines() if line.strip()]
    finished = [line.split()[:2] for line in shown if line.split()[0] in ("ok", "FAILED", "✓", "✗")]
    assert finished == [["ok", "prepare-data"], ["ok", "distill"], ["ok", "distill"], ["FAILED", "quantize"]]
    assert [s["task"] for s in display.steps] == ["prepare-data", "distill", "distill", "quantize"]
    # A progress line cannot be attributed while tasks overlap: no detail on their lines.
    assert "val_acc" not in "".join(line for line in shown if "distill" in line)
    assert "interleaved with the tasks that ran beside it" in err.getvalue()


def test_local_candidate_tasks_share_the_cores_and_cluster_tasks_set_no_env(
    cfg: PipelineConfig, compiled: Compiled, monkeypatch: pytest.MonkeyPatch
) -> None:
    from google.protobuf import json_format

    from pipelines import sweep as sweep_pipeline

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(sweep_pipeline.os, "cpu_count", lambda: 8)
    assert sweep_pipeline.local_threads(3) == 4  # kfp.local runs 2 at a time: 8 cores / 2
    assert sweep_pipeline.local_threads(1) == 8
    executors = json_format.MessageToDict(build_pipeline(cfg, for_cluster=False).pipeline_spec.deployment_spec)[
        "executors"
    ]
    env = {name: {e["name"]: e["value"] for e in ex["container"].get("env", [])} for name, ex in executors.items()}
    assert {n for n, e in env.items() if e} == {f"exec-{step}" for step in CANDIDATE_STEPS}
    assert env["exec-distill"] == {"OMP_NUM_THREADS": "4"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert sweep_pipeline.local_threads(2) is None  # the user's choice stands
    for step in CANDIDATE_STEPS:
        assert not compiled.container(step).env, step
