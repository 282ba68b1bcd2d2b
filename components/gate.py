from kfp import dsl
from kfp.dsl import Artifact, Input, Output

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def gate(config_json: str, pipeline_run_id: str, evaluation: Input[Artifact], decision: Output[Artifact]) -> bool:
    """Apply the gate thresholds; the returned flag drives the register branch."""
    from kd_lib import steps
    from kd_lib.config import config_from_json

    result = steps.gate(config_from_json(config_json), pipeline_run_id, evaluation.path, decision.path)
    decision.metadata.update({"passed": result.passed, "failed": [c.name for c in result.failed()]})
    return result.passed
