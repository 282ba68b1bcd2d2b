from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def train_teacher(
    config_json: str, pipeline_run_id: str, dataset: Input[Dataset], teacher: Output[Model], history: Output[Artifact]
) -> float:
    """Train the teacher with cross-entropy and early stopping; returns its best val accuracy."""
    from kd_lib.steps.task import task

    with task():
        from kd_lib.config import config_from_json
        from kd_lib.steps.train_teacher import train_teacher as run_step

        cfg = config_from_json(config_json)
        summary = run_step(cfg, pipeline_run_id, dataset.path, teacher.path, history.path)
        teacher.metadata.update({"mlflow_run_id": summary["run_id"], "best_epoch": summary["best_epoch"]})
        history.metadata.update({"epochs_run": summary["epochs_run"], "stopped_early": summary["stopped_early"]})
        return float(summary["best_val_accuracy"])
