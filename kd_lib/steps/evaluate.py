"""The ``evaluate`` step: every model measured on the test split, and the report as it then stands."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kd_lib import report
from kd_lib.adapters.tracking import step_run
from kd_lib.artifacts import has_model, read_evaluation, read_history, write_evaluation
from kd_lib.artifacts.dataset_dir import DatasetMeta, read_meta
from kd_lib.artifacts.model_dir import SelectionRecord, read_selection
from kd_lib.compress import quantization
from kd_lib.config import PipelineConfig
from kd_lib.evaluate import metrics as evaluation
from kd_lib.models.builders import build_model, count_parameters
from kd_lib.steps.candidates import model_inputs
from kd_lib.steps.common import gate_decision
from kd_lib.steps.inputs import open_dataset, tensors

# The models every evaluation has; the no-KD baseline joins them when distill trained one.
MODEL_ROLES = ("teacher", "student", "quantized")


def evaluate(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    model_dirs: Mapping[str, str | Path],
    evaluation_path: str | Path,
) -> dict[str, dict[str, Any]]:
    """Accuracy, macro-F1, artifact bytes, parameters and latency of each model on the test split.

    ``model_dirs`` maps each of MODEL_ROLES (and optionally ``baseline``) to a saved model
    directory. Writes the result (predictions included, and for each student ``vs_teacher``:
    where it disagrees with the teacher) as JSON to ``evaluation_path``.

    Returns:
        Role -> its measurements, as written.
    """
    with step_run(cfg, pipeline_run_id, "evaluate") as run, open_dataset(cfg, dataset_dir) as splits:
        meta = splits.meta
        x_test, y_test = tensors(splits, "test")

        results: dict[str, dict[str, Any]] = {}
        roles = [*MODEL_ROLES, *(["baseline"] if has_model(model_dirs.get("baseline")) else [])]
        for role in roles:
            model, spec = quantization.load_model(model_dirs[role])
            # An imported teacher's own normalization, or an ONNX artifact's raw features.
            x_in = model_inputs(x_test, spec, meta)
            results[role] = evaluation.evaluate_model(
                model,
                x_in,
                y_test,
                spec["num_classes"],
                model_dirs[role],
                num_params=_num_params(model, spec),
                batch_sizes=tuple(cfg.evaluate.batch_sizes),
                warmup=cfg.evaluate.latency_warmup,
                iters=cfg.evaluate.latency_iters,
                threads=cfg.evaluate.threads,
            )
            results[role]["mlflow_run_id"] = spec.get("mlflow_run_id", "")
            results[role]["quantization"] = spec.get("quantization", "none")
            results[role]["backend"] = spec.get("backend", "none")
            results[role]["latency_threads"] = cfg.evaluate.threads
            results[role] |= _deployment_fields(spec, read_selection(model_dirs[role]))
            scalars = {
                k: v for k, v in results[role].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            run.log_metrics({f"{role}.{k}": v for k, v in scalars.items()})

        # Where each student departs from its teacher (same accuracy can hide different mistakes).
        teacher_pred = torch.tensor(results["teacher"]["predictions"])
        if "baseline" in results:
            # What the teacher bought: same student, same everything, with and without KD; and
            # whether this test split is large enough to tell (paired test on the same samples).
            paired = evaluation.paired_gain(
                torch.tensor(results["student"]["predictions"]),
                torch.tensor(results["baseline"]["predictions"]),
                y_test,
            )
            results["student"]["kd_gain_points"] = paired["gain_points"]
            results["student"]["kd_gain"] = paired
            run.log_metrics({"kd_gain_points": paired["gain_points"], "kd_gain_p_value": paired["p_value"]})
        for role in ("student", "quantized"):
            vs = evaluation.agreement(
                teacher_pred, torch.tensor(results[role]["predictions"]), y_test, meta.num_classes
            )
            results[role]["vs_teacher"] = vs
            run.log_metrics({f"{role}.agreement_with_teacher": vs["agreement"]})

        write_evaluation(evaluation_path, results)
        run.log_dict(results, "evaluation.json")
        return results


def _num_params(model: torch.nn.Module, spec: Mapping[str, Any]) -> int:
    """Parameters of a model as its fp32 architecture has them.

    Dynamic int8 packs Linear weights out of ``.parameters()``, so a kdflow model is counted on
    its architecture rebuilt from the spec. An imported ONNX teacher (``arch: onnx``) has no
    architecture to rebuild: its graph's weight initializers are counted.
    """
    if spec["arch"] == "onnx":
        # lazy: onnx loads only for an imported ONNX teacher
        from kd_lib.compress.onnx_runtime import OrtModule, weight_count

        if isinstance(model, OrtModule):  # what load_model returns for an ONNX artifact
            return weight_count(model.model_bytes)
    fp32 = build_model(spec["arch"], spec["params"], tuple(spec["input_shape"]), spec["num_classes"])
    return count_parameters(fp32)


def _deployment_fields(spec: Mapping[str, Any], selection: SelectionRecord | None) -> dict[str, Any]:
    """What the quantize step recorded about a quantized model: the candidates it measured, the
    choice and why (``selection.json``), and which fp32 model went on (KD student or baseline)
    and why (the spec's ``promotion``)."""
    fields: dict[str, Any] = {}
    if selection is not None:
        fields["candidates"] = list(selection.candidates)
        if selection.select != "named":  # one scheme asked for: nothing was chosen, nothing to check
            fields["quantization_auto_found"] = selection.found
            fields["quantization_auto_reason"] = selection.reason
    promotion = spec.get("promotion")
    if isinstance(promotion, dict):
        fields["source_role"] = str(promotion.get("source_role", "student"))
        fields["promotion_reason"] = str(promotion.get("reason", ""))
        if "kd_significantly_worse" in promotion:
            fields["kd_significantly_worse"] = bool(promotion["kd_significantly_worse"])
    return fields


def class_names(meta: DatasetMeta | Mapping[str, Any]) -> list[str]:
    """The dataset's class names when it has them, else the class indices as strings."""
    fields = meta.model_dump() if isinstance(meta, DatasetMeta) else meta
    names = fields.get("class_names")
    return [str(n) for n in names] if names else [str(i) for i in range(int(fields["num_classes"]))]


def evaluation_report(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    evaluation_path: str | Path,
    history_paths: Mapping[str, str | Path],
    html_path: str | Path,
    markdown_path: str | Path,
) -> report.ReportData:
    """The report as the evaluate step knows it: measurements, curves, matrices and gate checks.

    The checks are the gate's own pure ``decide`` on the same measurements, so they are what
    the gate step will find; the decision and the registered version come later and are in
    the final report that ``finalize`` logs to the MLflow parent run.

    Args:
        history_paths: ``teacher`` / ``student`` -> the JSON history a training step wrote;
            a missing or empty file (an imported teacher) leaves that curve out.
    """
    results = read_evaluation(evaluation_path)
    meta = read_meta(dataset_dir)
    histories = {}
    for role, path in history_paths.items():
        rows = read_history(path, missing_ok=True).to_list()
        if rows:
            histories[role] = rows
    data = report.ReportData(
        name=cfg.name,
        evaluation=results.to_dict(),
        histories=histories,
        gate=gate_decision(cfg, results).to_dict(),
        thresholds=cfg.gate.model_dump(),
        stage=report.STAGE_EVALUATE,
        run={
            "pipeline_run_id": pipeline_run_id,
            "dataset_fingerprint": meta.fingerprint,
            "config_hash": cfg.config_hash(),
        },
        config=cfg.model_dump(mode="json", exclude={"tracking"}),
        class_names=class_names(meta),
    )
    for path, text in ((html_path, report.render_html(data)), (markdown_path, report.render_markdown(data))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return data
