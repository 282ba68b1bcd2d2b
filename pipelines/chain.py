"""What the single DAG and the sweep DAG share: the run id, the training components, and the
candidate chain distill -> quantize -> evaluate -> gate, written once.

The single DAG (pipelines/distillation.py) runs the chain once; the sweep DAG
(pipelines/sweep.py) runs it once per candidate inside a ParallelFor. Both call
``candidate_chain`` with the same upstream tasks, so the two cannot drift apart.
"""

from typing import Any

from kfp import dsl
from kfp.dsl import PipelineTask

from components import distill, evaluate, gate, import_teacher, pytorchjob, quantize, train_teacher
from kd_lib.config import PipelineConfig
from pipelines.cluster import pytorchjob_steps

# Unique per pipeline run on the cluster and locally; the MLflow parent run is keyed by it.
RUN_ID = dsl.PIPELINE_JOB_NAME_PLACEHOLDER
# The chain's steps, in DAG order: the keys of what ``candidate_chain`` returns.
CHAIN_STEPS = ("distill", "quantize", "evaluate", "gate")


def training_steps(cfg: PipelineConfig | None, for_cluster: bool) -> tuple[Any, str, Any]:
    """The components of the teacher and distill tasks: ``(teacher component, its step name,
    distill component)``.

    An imported teacher (``teacher.source`` other than ``train``) replaces training, except a
    Hugging Face one with ``teacher.fine_tune``, which train_teacher fine-tunes; with
    ``cluster.pytorchjob`` the cluster build's training steps launch a PyTorchJob and wait for it.
    """
    importing = cfg is not None and not cfg.teacher.trains
    teacher_step, teacher_step_name = (
        (import_teacher, "import_teacher") if importing else (train_teacher, "train_teacher")
    )
    on_pytorchjob = pytorchjob_steps(cfg) if for_cluster else frozenset()
    if "train_teacher" in on_pytorchjob:
        teacher_step = pytorchjob.train_teacher
    return teacher_step, teacher_step_name, pytorchjob.distill if "distill" in on_pytorchjob else distill


def candidate_chain(
    config_json: Any, pipeline_run_id: Any, dataset: Any, teacher_task: PipelineTask, distill_step: Any
) -> dict[str, PipelineTask]:
    """Add distill -> quantize -> evaluate -> gate to the pipeline being built.

    Called inside a ``dsl.pipeline`` function (in a ParallelFor for the sweep).

    Args:
        config_json: The config the chain's tasks get: the pipeline parameter, or a sweep
            item's candidate config.
        pipeline_run_id: The run id the tasks tag MLflow with (``RUN_ID`` or the item's).
        dataset: The ``dataset`` output of the prepare_data task.
        teacher_task: The train_teacher or import_teacher task (its ``teacher`` and ``history``).
        distill_step: The distill component (in-process, or the PyTorchJob launcher).

    Returns:
        The four tasks by step name, in ``CHAIN_STEPS`` order.
    """
    common = {"config_json": config_json, "pipeline_run_id": pipeline_run_id, "dataset": dataset}
    distill_task = distill_step(**common, teacher=teacher_task.outputs["teacher"])
    quantize_task = quantize(
        **common,
        teacher=teacher_task.outputs["teacher"],
        student=distill_task.outputs["student"],
        baseline=distill_task.outputs["baseline"],
    )
    evaluate_task = evaluate(
        **common,
        teacher=teacher_task.outputs["teacher"],
        student=distill_task.outputs["student"],
        quantized=quantize_task.outputs["quantized"],
        baseline=distill_task.outputs["baseline"],
        teacher_history=teacher_task.outputs["history"],
        student_history=distill_task.outputs["history"],
    )
    gate_task = gate(**common, evaluation=evaluate_task.outputs["evaluation"])
    return {"distill": distill_task, "quantize": quantize_task, "evaluate": evaluate_task, "gate": gate_task}
