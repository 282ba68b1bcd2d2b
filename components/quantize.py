from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def quantize(
    config_json: str,
    pipeline_run_id: str,
    dataset: Input[Dataset],
    teacher: Input[Model],
    student: Input[Model],
    baseline: Input[Model],
    quantized: Output[Model],
    onnx: Output[Model],
) -> int:
    """Build and measure the deployment candidates of the fp32 student (or of the baseline, when
    distill.promote sends it on) and keep the best (calibration data and, for QAT, the teacher
    come from the inputs); returns the artifact's bytes."""
    from kd_lib.steps.task import task

    with task():
        from kd_lib.config import config_from_json
        from kd_lib.steps.quantize import quantize as run_step

        info = run_step(
            config_from_json(config_json),
            pipeline_run_id,
            dataset.path,
            student.path,
            quantized.path,
            teacher_dir=teacher.path,
            onnx_dir=onnx.path,
            baseline_dir=baseline.path,
        )
        quantized.metadata.update({k: v for k, v in info.items() if k != "onnx"})
        onnx.metadata.update({"exported": "onnx" in info})
        return int(info["quantized_bytes"])
