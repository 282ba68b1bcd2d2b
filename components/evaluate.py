from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def evaluate(
    config_json: str,
    pipeline_run_id: str,
    dataset: Input[Dataset],
    teacher: Input[Model],
    student: Input[Model],
    quantized: Input[Model],
    baseline: Input[Model],
    teacher_history: Input[Artifact],
    student_history: Input[Artifact],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[HTML],
    summary: Output[Markdown],
):
    """Test-split metrics of all three models (and the no-KD baseline when trained), shown in the
    KFP UI as scalars, a confusion matrix, an HTML compression report and a Markdown summary."""
    from kd_lib.steps.task import task

    with task():
        from kd_lib.config import config_from_json
        from kd_lib.steps.evaluate import evaluate as run_step
        from kd_lib.steps.evaluate import evaluation_report

        cfg = config_from_json(config_json)
        models = {
            "teacher": teacher.path,
            "student": student.path,
            "quantized": quantized.path,
            "baseline": baseline.path,
        }
        results = run_step(cfg, pipeline_run_id, dataset.path, models, evaluation.path)
        for role, row in results.items():
            for key in ("accuracy", "macro_f1", "size_bytes", "num_params", "latency_b1_p50_ms"):
                if key in row:
                    metrics.log_metric(f"{role}_{key}", row[key])
        histories = {"teacher": teacher_history.path, "student": student_history.path}
        data = evaluation_report(
            cfg, pipeline_run_id, dataset.path, evaluation.path, histories, report.path, summary.path
        )
        confusion.log_confusion_matrix(data.class_names, results["quantized"]["confusion_matrix"])
