"""One function per DAG step: paths in, paths out, one nested MLflow run each.

These are what the KFP components call (and what tests call directly). Each reads its
inputs from artifact directories, does the work with the pure modules (data, models,
training, quantization, evaluation, gates) and writes its outputs to the directories it is
given. Nothing is passed through globals or shared paths.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kd_lib import data as data_lib
from kd_lib import evaluation, gates, quantization, report, training
from kd_lib.config import PipelineConfig
from kd_lib.model_registry import ModelRegistry, gate_tags, log_pyfunc, pip_requirements
from kd_lib.models import build_model, count_parameters
from kd_lib.progress import EpochProgress
from kd_lib.tracking import StepRun, client_for, find_parent_run, finish_pipeline_run, pipeline_record, step_run


class StepError(RuntimeError):
    """A step was asked to do something its inputs do not allow (e.g. register a failed gate)."""


def _tensors(splits: data_lib.Splits, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(splits.x[name]), torch.from_numpy(splits.y[name])


def _spec(model_cfg: Any, meta: data_lib.DatasetMeta, role: str, run: StepRun) -> dict[str, Any]:
    return {
        "role": role,
        "arch": model_cfg.arch,
        "params": dict(model_cfg.params),
        "input_shape": list(meta.input_shape),
        "num_classes": meta.num_classes,
        "quantization": "none",
        "normalization": dict(meta.normalization),
        "dataset_fingerprint": meta.fingerprint,
        "mlflow_run_id": run.run_id,
    }


def _epoch_logger(run: StepRun, progress: EpochProgress):
    def log(row: dict[str, Any]) -> None:
        run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        progress(row)

    return log


def _log_result(
    run: StepRun, result: training.TrainResult, progress: EpochProgress, history_path: str | Path | None
) -> dict[str, Any]:
    summary = {
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
    }
    progress.done(result.best_epoch, len(result.history), result.best_val_accuracy, result.stopped_early)
    run.log_metrics({k: float(v) for k, v in summary.items()})
    run.log_dict(result.history, "history.json")
    if history_path is not None:
        _write_json(history_path, result.history)
    return summary


def _write_json(path: str | Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj))


def prepare_data(cfg: PipelineConfig, pipeline_run_id: str, dataset_dir: str | Path) -> dict[str, Any]:
    """Load, validate, split and fingerprint the data; write it to ``dataset_dir``."""
    with step_run(cfg, pipeline_run_id, "prepare_data") as run:
        splits = data_lib.prepare(cfg.data)
        data_lib.save_splits(splits, dataset_dir)
        meta = splits.meta
        run.log_params({"source": meta.source, "fingerprint": meta.fingerprint, "input_shape": meta.input_shape})
        run.log_metrics({f"n_{k}": v for k, v in meta.sizes.items()} | {"num_classes": meta.num_classes})
        run.set_tags({"kdflow.dataset_fingerprint": meta.fingerprint}, on_parent=True)
        run.log_dict(meta.__dict__, "dataset_meta.json")
        return meta.__dict__


def train_teacher(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    teacher_dir: str | Path,
    history_path: str | Path | None = None,
) -> dict[str, Any]:
    """Cross-entropy training of the teacher with early stopping; the best epoch is saved.

    The per-epoch history goes to the MLflow run and, when given, to ``history_path`` (JSON)
    for the report.
    """
    with (
        step_run(cfg, pipeline_run_id, "train_teacher") as run,
        EpochProgress("train_teacher", cfg.teacher.train.epochs) as progress,
    ):
        splits = data_lib.load_splits(dataset_dir)
        meta = splits.meta
        torch.manual_seed(cfg.teacher.train.seed)
        model = build_model(cfg.teacher.model.arch, cfg.teacher.model.params, tuple(meta.input_shape), meta.num_classes)
        run.log_params({"num_params": count_parameters(model)})
        result = training.train_supervised(
            model,
            *_tensors(splits, "train"),
            *_tensors(splits, "val"),
            cfg.teacher.train,
            on_epoch=_epoch_logger(run, progress),
        )
        quantization.save_model(result.model, _spec(cfg.teacher.model, meta, "teacher", run), teacher_dir)
        return _log_result(run, result, progress, history_path) | {"run_id": run.run_id}


def distill(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    teacher_dir: str | Path,
    student_dir: str | Path,
    history_path: str | Path | None = None,
) -> dict[str, Any]:
    """Hinton KD of the student from the teacher's logits (computed once, indexed by sample).

    The per-epoch history goes to the MLflow run and, when given, to ``history_path`` (JSON).
    """
    with (
        step_run(cfg, pipeline_run_id, "distill") as run,
        EpochProgress("distill", cfg.distill.train.epochs) as progress,
    ):
        splits = data_lib.load_splits(dataset_dir)
        meta = splits.meta
        x_train, y_train = _tensors(splits, "train")
        teacher_logits = None
        if cfg.distill.alpha > 0:
            teacher, _ = quantization.load_model(teacher_dir)
            teacher_logits = training.compute_logits(teacher, x_train)
        torch.manual_seed(cfg.distill.train.seed)
        student = build_model(cfg.student.model.arch, cfg.student.model.params, tuple(meta.input_shape), meta.num_classes)
        run.log_params(
            {"num_params": count_parameters(student), "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha}
        )
        result = training.distill(
            student,
            teacher_logits,
            x_train,
            y_train,
            *_tensors(splits, "val"),
            cfg.distill.train,
            temperature=cfg.distill.temperature,
            alpha=cfg.distill.alpha,
            on_epoch=_epoch_logger(run, progress),
        )
        quantization.save_model(result.model, _spec(cfg.student.model, meta, "student", run), student_dir)
        return _log_result(run, result, progress, history_path) | {"run_id": run.run_id}


def quantize(
    cfg: PipelineConfig, pipeline_run_id: str, student_dir: str | Path, quantized_dir: str | Path
) -> dict[str, Any]:
    """Apply ``quantize.scheme`` to the fp32 student and save the result."""
    with step_run(cfg, pipeline_run_id, "quantize") as run:
        student, spec = quantization.load_model(student_dir)
        quantized = quantization.quantize(student, cfg.quantize.scheme)
        spec = spec | {"quantization": cfg.quantize.scheme, "role": "quantized_student", "mlflow_run_id": run.run_id}
        out = quantization.save_model(quantized, spec, quantized_dir)
        saved = json.loads((Path(out) / "spec.json").read_text())
        info = {
            "scheme": cfg.quantize.scheme,
            "backend": saved.get("backend", ""),
            "fp32_bytes": evaluation.artifact_size_bytes(student_dir),
            "quantized_bytes": evaluation.artifact_size_bytes(quantized_dir),
        }
        run.log_params({"scheme": info["scheme"], "backend": info["backend"]})
        run.log_metrics({"fp32_bytes": info["fp32_bytes"], "quantized_bytes": info["quantized_bytes"]})
        return info


MODEL_ROLES = ("teacher", "student", "quantized")


def evaluate(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    model_dirs: dict[str, str | Path],
    evaluation_path: str | Path,
) -> dict[str, dict[str, Any]]:
    """Accuracy, macro-F1, artifact bytes, parameters and latency of each model on the test split.

    ``model_dirs`` maps each of MODEL_ROLES to a saved model directory. Writes the result
    (predictions included, and for each student ``vs_teacher``: where it disagrees with the
    teacher) as JSON to ``evaluation_path``.
    """
    with step_run(cfg, pipeline_run_id, "evaluate") as run:
        splits = data_lib.load_splits(dataset_dir)
        meta = splits.meta
        x_test, y_test = _tensors(splits, "test")
        results: dict[str, dict[str, Any]] = {}
        for role in MODEL_ROLES:
            model, spec = quantization.load_model(model_dirs[role])
            # Dynamic int8 packs Linear weights out of .parameters(): count on the fp32 architecture.
            fp32 = build_model(spec["arch"], spec["params"], tuple(spec["input_shape"]), spec["num_classes"])
            results[role] = evaluation.evaluate_model(
                model,
                x_test,
                y_test,
                spec["num_classes"],
                model_dirs[role],
                num_params=count_parameters(fp32),
                batch_sizes=tuple(cfg.evaluate.batch_sizes),
                warmup=cfg.evaluate.latency_warmup,
                iters=cfg.evaluate.latency_iters,
                threads=cfg.evaluate.threads,
            )
            results[role]["mlflow_run_id"] = spec.get("mlflow_run_id", "")
            results[role]["quantization"] = spec.get("quantization", "none")
            scalars = {k: v for k, v in results[role].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            run.log_metrics({f"{role}.{k}": v for k, v in scalars.items()})
        # Where each student departs from its teacher (same accuracy can hide different mistakes).
        teacher_pred = torch.tensor(results["teacher"]["predictions"])
        for role in ("student", "quantized"):
            vs = evaluation.agreement(teacher_pred, torch.tensor(results[role]["predictions"]), y_test, meta.num_classes)
            results[role]["vs_teacher"] = vs
            run.log_metrics({f"{role}.agreement_with_teacher": vs["agreement"]})
        _write_json(evaluation_path, results)
        run.log_dict(results, "evaluation.json")
        return results


def class_names(meta: data_lib.DatasetMeta | dict[str, Any]) -> list[str]:
    """The dataset's class names when it has them, else the class indices as strings."""
    fields = meta if isinstance(meta, dict) else meta.__dict__
    names = fields.get("class_names")
    return [str(n) for n in names] if names else [str(i) for i in range(int(fields["num_classes"]))]


def _gate_decision(cfg: PipelineConfig, results: dict[str, dict[str, Any]]) -> gates.GateDecision:
    return gates.decide(results["quantized"], results["teacher"], cfg.gate, fp32_student=results["student"])


def evaluation_report(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    evaluation_path: str | Path,
    history_paths: dict[str, str | Path],
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
    results = json.loads(Path(evaluation_path).read_text())
    meta = json.loads((Path(dataset_dir) / data_lib.META_FILE).read_text())
    histories = {}
    for role, path in history_paths.items():
        text = Path(path).read_text() if Path(path).is_file() else ""
        if text.strip():
            histories[role] = json.loads(text)
    data = report.ReportData(
        name=cfg.name,
        evaluation=results,
        histories=histories,
        gate=_gate_decision(cfg, results).to_dict(),
        thresholds=cfg.gate.model_dump(),
        stage=report.STAGE_EVALUATE,
        run={"pipeline_run_id": pipeline_run_id, "dataset_fingerprint": meta.get("fingerprint", ""),
             "config_hash": cfg.config_hash()},
        config=cfg.model_dump(mode="json", exclude={"tracking"}),
        class_names=class_names(meta),
    )  # fmt: skip
    for path, text in ((html_path, report.render_html(data)), (markdown_path, report.render_markdown(data))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return data


def gate(
    cfg: PipelineConfig, pipeline_run_id: str, evaluation_path: str | Path, decision_path: str | Path
) -> gates.GateDecision:
    """Apply the thresholds to the quantized student; the table goes to MLflow either way."""
    with step_run(cfg, pipeline_run_id, "gate") as run:
        results = json.loads(Path(evaluation_path).read_text())
        decision = _gate_decision(cfg, results)
        Path(decision_path).parent.mkdir(parents=True, exist_ok=True)
        Path(decision_path).write_text(json.dumps(decision.to_dict()))
        table = decision.table()
        for on_parent in (False, True):
            run.log_text(table, "gate.txt", on_parent=on_parent)
            run.log_dict(decision.to_dict(), "gate.json", on_parent=on_parent)
        run.log_metrics({f"gate.{c.name}": c.value for c in decision.checks} | {"gate.passed": float(decision.passed)})
        parent_tags = {"kdflow.gate_status": "passed" if decision.passed else "failed"}
        if not decision.passed:
            parent_tags["kdflow.gate_failed_checks"] = ",".join(c.name for c in decision.failed())
            parent_tags |= {k: v for k, v in gate_tags(decision).items() if k.startswith("gate.")}
        run.set_tags(parent_tags, on_parent=True)
        return decision


def register(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    quantized_dir: str | Path,
    evaluation_path: str | Path,
    decision_path: str | Path,
) -> dict[str, str]:
    """Log the quantized student as a pyfunc, register it with its checks and lineage, promote it.

    Runs only under the gate's ``passed`` branch, and checks the decision again itself: a
    version is never created, and the alias never moved, for a candidate that failed.
    """
    decision = gates.GateDecision.from_dict(json.loads(Path(decision_path).read_text()))
    if not decision.passed:
        failed = ", ".join(c.name for c in decision.failed())
        raise StepError(f"refusing to register: the gate failed ({failed})")
    import mlflow  # the fluent API is needed only for log_model's active run

    with step_run(cfg, pipeline_run_id, "register") as run:
        meta = data_lib.load_splits(dataset_dir).meta
        results = json.loads(Path(evaluation_path).read_text())
        spec = json.loads((Path(quantized_dir) / "spec.json").read_text())
        client = client_for(cfg)
        mlflow.set_tracking_uri(client.tracking_uri)
        mlflow.set_registry_uri(client._registry_uri)
        with mlflow.start_run(run_id=run.run_id):
            source, model_id = log_pyfunc(quantized_dir, spec, pip_requirements())
        registry = ModelRegistry(client, cfg.registry.model_name)
        quantized = results["quantized"]
        tags = gate_tags(decision) | {
            "kdflow.dataset_fingerprint": meta.fingerprint,
            "kdflow.teacher_run_id": results["teacher"]["mlflow_run_id"],
            "kdflow.config_hash": cfg.config_hash(),
            "kdflow.pipeline_run_id": pipeline_run_id,
            "kdflow.mlflow_parent_run_id": run.parent_run_id,
            "kdflow.quantization": spec["quantization"],
            "kdflow.test_accuracy": f"{quantized['accuracy']:.6f}",
            "kdflow.size_bytes": str(quantized["size_bytes"]),
        }
        version = registry.register(source, run.run_id, tags, model_id=model_id)
        registry.promote(version, cfg.registry.alias)
        out = {"model_name": cfg.registry.model_name, "version": version, "alias": cfg.registry.alias}
        run.set_tags({"kdflow.registered_version": version, "kdflow.alias": cfg.registry.alias}, on_parent=True)
        run.log_params(out)
        return out


def final_report(
    cfg: PipelineConfig, parent_run_id: str, state: str | None = None, error: str | None = None
) -> report.ReportData:
    """The final report of a pipeline run, rebuilt from what MLflow recorded of it."""
    record = pipeline_record(client_for(cfg), parent_run_id)
    return report.from_pipeline_record(record, state=state, error=error)


def finalize(cfg: PipelineConfig, pipeline_run_id: str, state: str, error: str = "") -> str | None:
    """The DAG's exit handler: log the final report to the parent run, then close it.

    Runs whatever happened, so the report must never keep the parent run open: a report
    that cannot be built is logged as a tag and a warning, and the run is closed anyway.
    """
    client = client_for(cfg)
    parent = find_parent_run(client, cfg.tracking.experiment, pipeline_run_id)
    if parent is not None:
        try:
            data = final_report(cfg, parent, state=state, error=error)
            client.log_text(parent, report.render_html(data), "report.html")
            client.log_text(parent, report.render_markdown(data), "report.md")
        except Exception as err:  # noqa: BLE001 - the exit handler must close the run regardless
            print(f"warning: the final report could not be built: {type(err).__name__}: {err}", flush=True)
            client.set_tag(parent, "kdflow.report_error", f"{type(err).__name__}: {err}"[:5000])
    return finish_pipeline_run(cfg, pipeline_run_id, state, error)
