from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def quantize(config_json: str, pipeline_run_id: str, student: Input[Model], quantized: Output[Model]) -> int:
    """Quantize the fp32 student with quantize.scheme; returns the artifact's bytes."""
    from kd_lib import steps
    from kd_lib.config import config_from_json

    info = steps.quantize(config_from_json(config_json), pipeline_run_id, student.path, quantized.path)
    quantized.metadata.update(info)
    return int(info["quantized_bytes"])
