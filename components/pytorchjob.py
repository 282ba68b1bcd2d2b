"""The training steps as Kubeflow Training Operator PyTorchJobs (``cluster.pytorchjob``).

Same names, inputs and outputs as components.train_teacher / components.distill, so the DAG
is wired the same way; the task only launches the job and waits for it
(``kd_lib.launch.pytorchjob.run_step``), and the training pods do the work.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def train_teacher(
    config_json: str, pipeline_run_id: str, dataset: Input[Dataset], teacher: Output[Model], history: Output[Artifact]
) -> float:
    """Train the teacher as a PyTorchJob; returns its best val accuracy."""
    from kd_lib.steps.task import task

    with task():
        from kd_lib.config import config_from_json
        from kd_lib.launch import pytorchjob

        cfg = config_from_json(config_json)
        summary = pytorchjob.run_step(
            cfg,
            "train_teacher",
            pipeline_run_id,
            {"dataset_dir": dataset.path},
            {"teacher_dir": teacher.path, "history_path": history.path},
        )
        teacher.metadata.update({"mlflow_run_id": summary["run_id"], "best_epoch": summary["best_epoch"]})
        history.metadata.update({"epochs_run": summary["epochs_run"], "stopped_early": summary["stopped_early"]})
        return float(summary["best_val_accuracy"])


@dsl.component(**COMPONENT_OPTIONS)
def distill(
    config_json: str,
    pipeline_run_id: str,
    dataset: Input[Dataset],
    teacher: Input[Model],
    student: Output[Model],
    history: Output[Artifact],
    baseline: Output[Model],
) -> float:
    """Distill the student as a PyTorchJob (and with distill.baseline the no-teacher baseline);
    returns its best val accuracy."""
    from kd_lib.steps.task import task

    with task():
        from kd_lib.config import config_from_json
        from kd_lib.launch import pytorchjob

        cfg = config_from_json(config_json)
        summary = pytorchjob.run_step(
            cfg,
            "distill",
            pipeline_run_id,
            {"dataset_dir": dataset.path, "teacher_dir": teacher.path},
            {"student_dir": student.path, "history_path": history.path, "baseline_dir": baseline.path},
        )
        student.metadata.update({"mlflow_run_id": summary["run_id"], "best_epoch": summary["best_epoch"]})
        history.metadata.update({"epochs_run": summary["epochs_run"], "stopped_early": summary["stopped_early"]})
        return float(summary["best_val_accuracy"])
