from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def import_teacher(
    config_json: str, pipeline_run_id: str, dataset: Input[Dataset], teacher: Output[Model], history: Output[Artifact]
) -> float:
    """Bring in an already trained teacher (MLflow registry or checkpoint); returns its val accuracy."""
    from kd_lib.steps.task import task

    with task():
        from kd_lib.config import config_from_json
        from kd_lib.steps.import_teacher import import_teacher as run_step

        cfg = config_from_json(config_json)
        summary = run_step(cfg, pipeline_run_id, dataset.path, teacher.path, history.path)
        teacher.metadata.update({"mlflow_run_id": summary["run_id"], "imported_from": summary["imported_from"]})
        return float(summary["best_val_accuracy"])
