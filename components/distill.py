from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import COMPONENT_OPTIONS


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
    """Distill the student from the teacher (distill.losses); returns its best val accuracy.
    With distill.baseline, also trains the same student without the teacher into `baseline`."""
    from kd_lib.steps.task import task

    with task():
        from kd_lib.config import config_from_json
        from kd_lib.steps.distill import distill as run_step

        cfg = config_from_json(config_json)
        summary = run_step(cfg, pipeline_run_id, dataset.path, teacher.path, student.path, history.path, baseline.path)
        student.metadata.update({"mlflow_run_id": summary["run_id"], "best_epoch": summary["best_epoch"]})
        history.metadata.update({"epochs_run": summary["epochs_run"], "stopped_early": summary["stopped_early"]})
        return float(summary["best_val_accuracy"])
