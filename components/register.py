from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def register(
    config_json: str,
    pipeline_run_id: str,
    dataset: Input[Dataset],
    quantized: Input[Model],
    evaluation: Input[Artifact],
    decision: Input[Artifact],
) -> str:
    """Register the gated student in the MLflow Model Registry and move the alias; returns the version."""
    from kd_lib.steps.task import task

    with task():
        from kd_lib.config import config_from_json
        from kd_lib.steps.register import register as run_step

        cfg = config_from_json(config_json)
        out = run_step(cfg, pipeline_run_id, dataset.path, quantized.path, evaluation.path, decision.path)
        return out["version"]
