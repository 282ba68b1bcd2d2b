from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def gate(
    config_json: str,
    pipeline_run_id: str,
    dataset: Input[Dataset],
    evaluation: Input[Artifact],
    decision: Output[Artifact],
) -> str:
    """Apply the gate (and champion comparison); returns the action: promote, challenger or reject."""
    from kd_lib.steps.task import task

    with task():
        from kd_lib.config import config_from_json
        from kd_lib.steps.gate import gate as run_step

        cfg = config_from_json(config_json)
        result, action = run_step(cfg, pipeline_run_id, dataset.path, evaluation.path, decision.path)
        decision.metadata.update(
            {"passed": result.passed, "action": action, "failed": [c.name for c in result.failed()]}
        )
        return action
