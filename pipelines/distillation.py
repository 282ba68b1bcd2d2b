"""The kdflow DAG, read top to bottom like the diagram in DESIGN.md.

prepare_data -> train_teacher (or import_teacher) -> distill -> quantize -> evaluate -> gate
-[not rejected]-> register, all inside an exit handler that closes the MLflow parent run
whatever happens.
"""

from typing import Any

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent

from components import (
    distill,
    evaluate,
    finalize,
    gate,
    import_teacher,
    prepare_data,
    pytorchjob,
    quantize,
    register,
    train_teacher,
)
from kd_lib.config import PipelineConfig
from pipelines.cluster import finish_tasks, pytorchjob_steps

# Unique per pipeline run on the cluster and locally; the MLflow parent run is keyed by it.
RUN_ID = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
PIPELINE_NAME = "kdflow-distillation"


def training_steps(cfg: PipelineConfig | None, for_cluster: bool) -> tuple[Any, str, Any]:
    """The components of the teacher and distill tasks: ``(teacher component, its step name,
    distill component)``. An imported teacher replaces training; with ``cluster.pytorchjob``
    the cluster build's training steps launch a PyTorchJob and wait for it."""
    importing = cfg is not None and cfg.teacher.source != "train"
    teacher_step, teacher_step_name = (
        (import_teacher, "import_teacher") if importing else (train_teacher, "train_teacher")
    )
    on_pytorchjob = pytorchjob_steps(cfg) if for_cluster else frozenset()
    if "train_teacher" in on_pytorchjob:
        teacher_step = pytorchjob.train_teacher
    return teacher_step, teacher_step_name, pytorchjob.distill if "distill" in on_pytorchjob else distill


def build_pipeline(cfg: PipelineConfig | None = None, for_cluster: bool = True) -> GraphComponent:
    """The DAG as a KFP pipeline.

    The config picks the DAG's shape: ``teacher.source`` other than ``train`` puts an
    ``import_teacher`` task where ``train_teacher`` would be (no training step at all).
    With ``for_cluster``, every task also gets the cluster settings of its step (image,
    requests and limits, GPU, Secrets as environment, pod labels), which KFP only accepts
    while the pipeline function runs; the local runner builds it without them. With
    ``cluster.pytorchjob`` the cluster build's training steps launch Training Operator
    PyTorchJobs (same inputs and outputs); locally they run in-process, or under torchrun
    when ``nproc_per_node > 1``. A config with a ``sweep`` section gets the sweep DAG
    (pipelines/sweep.py) instead.
    """
    if cfg is not None and cfg.sweep is not None:
        from pipelines.sweep import build_sweep_pipeline  # imported here: it builds on this module

        return build_sweep_pipeline(cfg, for_cluster)
    teacher_step, teacher_step_name, distill_step = training_steps(cfg, for_cluster)

    @dsl.pipeline(name=PIPELINE_NAME, description="Distill, quantize, evaluate, gate and register a student model.")
    def distillation_pipeline(config_json: str):
        finalize_task = finalize(config_json=config_json, pipeline_run_id=RUN_ID).set_display_name("finalize")
        with dsl.ExitHandler(finalize_task, name="kdflow"):
            prepare_data_task = prepare_data(config_json=config_json, pipeline_run_id=RUN_ID)
            teacher_task = teacher_step(
                config_json=config_json, pipeline_run_id=RUN_ID, dataset=prepare_data_task.outputs["dataset"]
            )
            distill_task = distill_step(
                config_json=config_json,
                pipeline_run_id=RUN_ID,
                dataset=prepare_data_task.outputs["dataset"],
                teacher=teacher_task.outputs["teacher"],
            )
            quantize_task = quantize(
                config_json=config_json,
                pipeline_run_id=RUN_ID,
                dataset=prepare_data_task.outputs["dataset"],
                teacher=teacher_task.outputs["teacher"],
                student=distill_task.outputs["student"],
            )
            evaluate_task = evaluate(
                config_json=config_json,
                pipeline_run_id=RUN_ID,
                dataset=prepare_data_task.outputs["dataset"],
                teacher=teacher_task.outputs["teacher"],
                student=distill_task.outputs["student"],
                quantized=quantize_task.outputs["quantized"],
                baseline=distill_task.outputs["baseline"],
                teacher_history=teacher_task.outputs["history"],
                student_history=distill_task.outputs["history"],
            )
            gate_task = gate(
                config_json=config_json,
                pipeline_run_id=RUN_ID,
                dataset=prepare_data_task.outputs["dataset"],
                evaluation=evaluate_task.outputs["evaluation"],
            )
            # promote -> registered + champion; challenger -> registered, rejected, never champion.
            with dsl.If(gate_task.outputs["Output"] != "reject", name="gate-passed"):
                register_task = register(
                    config_json=config_json,
                    pipeline_run_id=RUN_ID,
                    dataset=prepare_data_task.outputs["dataset"],
                    quantized=quantize_task.outputs["quantized"],
                    evaluation=evaluate_task.outputs["evaluation"],
                    decision=gate_task.outputs["decision"],
                )

        tasks = {
            "finalize": finalize_task,
            "prepare_data": prepare_data_task,
            teacher_step_name: teacher_task,
            "distill": distill_task,
            "quantize": quantize_task,
            "evaluate": evaluate_task,
            "gate": gate_task,
            "register": register_task,
        }
        finish_tasks(tasks, cfg, for_cluster)

    return distillation_pipeline


# The default DAG (a teacher trained in the run), without cluster settings.
distillation_pipeline = build_pipeline()
