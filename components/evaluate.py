from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def evaluate(
    config_json: str,
    pipeline_run_id: str,
    dataset: Input[Dataset],
    teacher: Input[Model],
    student: Input[Model],
    quantized: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
):
    """Test-split accuracy, macro-F1, size, parameters and latency of all three models."""
    from kd_lib import steps
    from kd_lib.config import config_from_json

    models = {"teacher": teacher.path, "student": student.path, "quantized": quantized.path}
    results = steps.evaluate(config_from_json(config_json), pipeline_run_id, dataset.path, models, evaluation.path)
    for role, row in results.items():
        for key in ("accuracy", "macro_f1", "size_bytes", "num_params", "latency_b1_p50_ms"):
            if key in row:
                metrics.log_metric(f"{role}_{key}", row[key])
