"""One function per DAG step: paths in, paths out, one nested MLflow run each.

These are what the KFP components call (and what tests call directly). Each reads its
inputs from artifact directories, does the work with the pure modules (data, models,
training, quantization, evaluation, gates) and writes its outputs to the directories it is
given. Nothing is passed through globals or shared paths.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import torch

from kd_lib.adapters import storage
from kd_lib.adapters.model_registry import (
    ModelRegistry,
    RegistryError,
    gate_tags,
    log_pyfunc,
    pip_requirements,
    registry_errors,
)
from kd_lib.adapters.tracking import (
    SELECTED_TAG,
    StepRun,
    client_for,
    find_parent_run,
    finish_pipeline_run,
    fluent_run,
    pipeline_record,
    step_run,
)
from kd_lib.compress import quantization
from kd_lib.config import ConfigError, LossTermConfig, PipelineConfig, config_from_json
from kd_lib.data import dataset as data_lib
from kd_lib.data.augment import augment_for
from kd_lib.errors import KdflowError
from kd_lib.evaluate import gates, sweep
from kd_lib.evaluate import metrics as evaluation
from kd_lib.models.builders import build_model, count_parameters, for_data
from kd_lib.report import render as report
from kd_lib.train import distributed, losses
from kd_lib.train import loop as training
from kd_lib.train.progress import EpochProgress


class StepError(KdflowError, RuntimeError):
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


def _checkpoint_dir(output_dir: str | Path) -> Path:
    """Beside the step's output (not inside it: the artifact's size is what the gate measures).

    Resuming needs this to survive the task: true for kfp.local and for KFP's retry of a task
    on a persistent volume; on ephemeral pod storage a preempted pod starts over (same seed,
    same result, only slower).
    """
    out = Path(output_dir)
    return out.with_name(out.name + ".checkpoint")


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
    progress.done(result.best_epoch, len(result.history), result.best_val_accuracy, result.stopped_early, result.keep)
    run.log_metrics({k: float(v) for k, v in summary.items()})
    run.log_dict(result.history, "history.json")
    if history_path is not None:
        _write_json(history_path, result.history)
    return summary


def _launch_ranks(cfg: PipelineConfig, step: str, pipeline_run_id: str, **paths: str | Path | None) -> dict[str, Any]:
    """Run ``step`` on ``<step>.train.distributed.nproc_per_node`` processes under torchrun.

    Each rank runs ``kd_lib.launch.worker``; rank 0 calls this same step function (so its MLflow
    run, checkpoints and outputs are the ones a single process makes) and its summary is
    returned here.
    """
    request = {
        "config_json": cfg.to_json(),
        "pipeline_run_id": pipeline_run_id,
        "paths": {k: str(Path(v).absolute()) if v is not None else None for k, v in paths.items()},
    }
    train_cfg = cfg.teacher.train if step == "train_teacher" else cfg.distill.train
    return distributed.launch_step(step, request, train_cfg.distributed)


def _owns_parent(cfg: PipelineConfig) -> bool:
    """Whether this step may write the parent run's record (gate table, tags).

    Not a sweep candidate's step: the candidates run side by side under one parent, and the
    select step writes the chosen one's record there.
    """
    return cfg.candidate is None


def _write_json(path: str | Path, obj: Any) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj))


def prepare_data(cfg: PipelineConfig, pipeline_run_id: str, dataset_dir: str | Path) -> dict[str, Any]:
    """Load, validate, split and fingerprint the data; write it to ``dataset_dir``.

    ``s3://`` sources are fetched with ``tracking.retry``'s attempts and timeouts.
    """
    with step_run(cfg, pipeline_run_id, "prepare_data") as run:
        splits = data_lib.prepare(cfg.data, retry=cfg.tracking.retry)
        data_lib.save_splits(splits, dataset_dir)
        meta = splits.meta
        params: dict[str, Any] = {
            "source": meta.source,
            "fingerprint": meta.fingerprint,
            "input_shape": meta.input_shape,
        }
        if meta.test_source:
            params["test_source"] = meta.test_source
        if meta.class_names:
            # A param for search and display (MLflow caps its length); the full list is in dataset_meta.json.
            params["class_names"] = ",".join(meta.class_names)[:500]
        run.log_params(params)
        run.log_metrics({f"n_{k}": v for k, v in meta.sizes.items()} | {"num_classes": meta.num_classes})
        run.set_tags({"kdflow.dataset_fingerprint": meta.fingerprint}, on_parent=True)
        run.log_dict(meta.__dict__, "dataset_meta.json")
        return meta.__dict__


def _augment(cfg: PipelineConfig, meta: data_lib.DatasetMeta, step: Literal["teacher", "distill"]) -> Any:
    try:
        return augment_for(cfg, step, tuple(meta.input_shape))
    except ValueError as err:
        raise ConfigError(str(err)) from None


def train_teacher(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    teacher_dir: str | Path,
    history_path: str | Path | None = None,
) -> dict[str, Any]:
    """Cross-entropy training of the teacher with early stopping; the best epoch is saved.

    The per-epoch history goes to the MLflow run and, when given, to ``history_path`` (JSON)
    for the report. With ``teacher.train.distributed.nproc_per_node > 1`` it trains on that
    many processes (torchrun, DDP); rank 0 records, as described in ``kd_lib.train.distributed``.
    """
    if distributed.should_launch(cfg.teacher.train.distributed):
        return _launch_ranks(
            cfg,
            "train_teacher",
            pipeline_run_id,
            dataset_dir=dataset_dir,
            teacher_dir=teacher_dir,
            history_path=history_path,
        )
    with (
        step_run(cfg, pipeline_run_id, "train_teacher") as run,
        EpochProgress("train_teacher", cfg.teacher.train.epochs) as progress,
    ):
        splits = data_lib.load_splits(dataset_dir)
        meta = splits.meta
        torch.manual_seed(cfg.teacher.train.seed)
        model = build_model(cfg.teacher.model.arch, cfg.teacher.model.params, tuple(meta.input_shape), meta.num_classes)
        run.log_params({"num_params": count_parameters(model)})
        ckpt = _checkpoint_dir(teacher_dir)
        result = training.train_supervised(
            model,
            *_tensors(splits, "train"),
            *_tensors(splits, "val"),
            cfg.teacher.train,
            on_epoch=_epoch_logger(run, progress),
            checkpoint_dir=ckpt,
            augment=_augment(cfg, meta, "teacher"),
        )
        quantization.save_model(result.model, _spec(cfg.teacher.model, meta, "teacher", run), teacher_dir)
        shutil.rmtree(ckpt, ignore_errors=True)
        return _log_result(run, result, progress, history_path) | {"run_id": run.run_id}


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3")."""
    rest = uri[len("models:/") :]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ConfigError(f"teacher.uri {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")


def import_teacher(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    teacher_dir: str | Path,
    history_path: str | Path | None = None,
) -> dict[str, Any]:
    """Bring an already trained teacher into the run instead of training one.

    ``teacher.source: mlflow`` downloads the kdflow model a registry URI points at (its own
    spec, normalization included: later steps feed it inputs renormalized to what it was
    trained on). ``teacher.source: checkpoint`` reads a ``state_dict`` file (local or
    ``s3://``) with ``weights_only=True`` into the architecture ``teacher.model``; it must
    expect inputs normalized like this run's (train-split mean/std). Either way the teacher
    is checked against the data (input shape, classes) and its validation accuracy logged.

    Raises:
        ConfigError: a malformed URI.
        StepError: the model is missing from the registry, does not fit the data, or the
            checkpoint does not fit ``teacher.model``.
    """
    with step_run(cfg, pipeline_run_id, "import_teacher") as run:
        splits = data_lib.load_splits(dataset_dir)
        meta = splits.meta
        uri = cfg.teacher.uri or ""
        run.log_params({"source": cfg.teacher.source, "uri": uri})
        with tempfile.TemporaryDirectory() as tmp:
            if cfg.teacher.source == "mlflow":
                name, alias, version = _parse_models_uri(uri)
                with registry_errors(run.client.tracking_uri, name, action="read", permission="READ"):
                    try:
                        version, model_dir = ModelRegistry(run.client, name).download_ref(tmp, alias, version)
                    except RegistryError as err:
                        raise StepError(f"teacher.uri: {err}") from None
                model, spec = quantization.load_model(model_dir)
                spec = dict(spec, role="teacher", mlflow_run_id=run.run_id, imported_from=f"models:/{name}/{version}")
                run.set_tags({"kdflow.teacher_source": f"models:/{name}/{version}"}, on_parent=True)
            else:
                local = storage.fetch(uri, tmp, cfg.tracking.retry)
                torch.manual_seed(0)
                model = build_model(
                    cfg.teacher.model.arch, cfg.teacher.model.params, tuple(meta.input_shape), meta.num_classes
                )
                try:
                    state = torch.load(local, map_location="cpu", weights_only=True)
                    model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
                except Exception as err:  # noqa: BLE001 (torch raises many types for a bad file)
                    raise StepError(
                        f"teacher.uri {uri}: not a state_dict of teacher.model {cfg.teacher.model.arch} "
                        f"{cfg.teacher.model.params} ({type(err).__name__}: {str(err)[:300]}); fix teacher.model or the file"
                    ) from None
                spec = _spec(cfg.teacher.model, meta, "teacher", run) | {"imported_from": uri}
                run.set_tags({"kdflow.teacher_source": uri}, on_parent=True)
        if list(spec["input_shape"]) != list(meta.input_shape) or int(spec["num_classes"]) != meta.num_classes:
            raise StepError(
                f"teacher {uri} takes input {spec['input_shape']} with {spec['num_classes']} classes, but the data has "
                f"{meta.input_shape} with {meta.num_classes}: use a teacher trained for this data"
            )
        quantization.save_model(model, spec, teacher_dir)
        x_val, y_val = _tensors(splits, "val")
        val_acc = _val_accuracy(for_data(model, spec.get("normalization"), meta.normalization), x_val, y_val)
        run.log_metrics({"best_val_accuracy": val_acc})
        if history_path is not None:
            _write_json(history_path, [])  # no training curve to show
        return {"best_val_accuracy": val_acc, "run_id": run.run_id, "imported_from": spec["imported_from"]}


def _load_teacher(teacher_dir: str | Path, meta: data_lib.DatasetMeta) -> torch.nn.Module:
    model, spec = quantization.load_model(teacher_dir)
    return for_data(model, spec.get("normalization"), meta.normalization)


BASELINE_ABSENT = "NOT_TRAINED"


def distill(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    teacher_dir: str | Path,
    student_dir: str | Path,
    history_path: str | Path | None = None,
    baseline_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Distill the student from the teacher with ``distill.losses``.

    The teacher's logits are cached (computed once, indexed by sample) unless augmentation or
    a feature loss needs it live. The per-epoch history (with each loss term) goes to the
    MLflow run and, when given, to ``history_path`` (JSON). With ``distill.baseline`` the same
    student is also trained without the teacher into ``baseline_dir`` (otherwise that
    directory only gets a ``NOT_TRAINED`` marker, so a KFP artifact always exists). With
    ``distill.train.distributed.nproc_per_node > 1`` both train on that many processes.
    """
    if distributed.should_launch(cfg.distill.train.distributed):
        return _launch_ranks(
            cfg,
            "distill",
            pipeline_run_id,
            dataset_dir=dataset_dir,
            teacher_dir=teacher_dir,
            student_dir=student_dir,
            history_path=history_path,
            baseline_dir=baseline_dir,
        )
    with (
        step_run(cfg, pipeline_run_id, "distill") as run,
        EpochProgress("distill", cfg.distill.train.epochs) as progress,
    ):
        splits = data_lib.load_splits(dataset_dir)
        meta = splits.meta
        objective = losses.build_objective(cfg.distill.losses)
        teacher = _load_teacher(teacher_dir, meta) if objective.needs_teacher else None
        augment = _augment(cfg, meta, "distill")
        run.log_params(
            {"teacher_logit_cache": augment is None and not objective.needs_features, "baseline": cfg.distill.baseline}
            | losses.as_params(cfg.distill.losses)
        )
        result = _train_student(cfg, splits, teacher, objective, augment, student_dir, _epoch_logger(run, progress))
        quantization.save_model(result.model, _spec(cfg.student.model, meta, "student", run), student_dir)
        run.log_params({"num_params": count_parameters(result.model)})
        summary = _log_result(run, result, progress, history_path) | {"run_id": run.run_id}
        if baseline_dir is not None:
            Path(baseline_dir).mkdir(parents=True, exist_ok=True)
            if cfg.distill.baseline:
                ce_only = losses.build_objective([LossTermConfig(name="ce")])
                base = _train_student(cfg, splits, None, ce_only, augment, baseline_dir, _baseline_logger(run))
                quantization.save_model(base.model, _spec(cfg.student.model, meta, "baseline", run), baseline_dir)
                run.log_metrics({"baseline.best_val_accuracy": base.best_val_accuracy})
                summary["baseline_best_val_accuracy"] = base.best_val_accuracy
            else:
                (Path(baseline_dir) / BASELINE_ABSENT).write_text("distill.baseline is false\n")
        return summary


def _train_student(
    cfg: PipelineConfig,
    splits: data_lib.Splits,
    teacher: torch.nn.Module | None,
    objective: losses.Objective,
    augment: Any,
    output_dir: str | Path,
    on_epoch: Any,
) -> training.TrainResult:
    """One student training run: same seed, hence same initial weights, for KD and baseline."""
    torch.manual_seed(cfg.distill.train.seed)
    meta = splits.meta
    student = build_model(cfg.student.model.arch, cfg.student.model.params, tuple(meta.input_shape), meta.num_classes)
    try:
        result = training.distill(
            student,
            teacher,
            objective,
            *_tensors(splits, "train"),
            *_tensors(splits, "val"),
            cfg.distill.train,
            augment=augment,
            on_epoch=on_epoch,
            checkpoint_dir=_checkpoint_dir(output_dir),
        )
    except ValueError as err:
        # A feature loss on layers that do not fit (an MLP under `at`, mismatched maps).
        raise ConfigError(f"distill.losses ({losses.describe(cfg.distill.losses)}): {err}") from None
    shutil.rmtree(_checkpoint_dir(output_dir), ignore_errors=True)
    return result


def _baseline_logger(run: StepRun):
    def log(row: dict[str, Any]) -> None:
        run.log_metrics({f"baseline.{k}": v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    return log


def _calibration_batches(splits: data_lib.Splits, cfg: PipelineConfig) -> list[torch.Tensor]:
    """``quantize.calibration_batches`` batches of training samples, in a seeded random order."""
    x = torch.from_numpy(splits.x["train"])
    size = cfg.quantize.calibration_batch_size
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.distill.train.seed))
    order = order[: cfg.quantize.calibration_batches * size]
    return [x[order[i : i + size]] for i in range(0, len(order), size)]


def _qat_finetune(cfg: PipelineConfig, splits: data_lib.Splits, teacher_dir: str | Path | None, run: StepRun):
    """The fine-tuning function of qat_int8: the distillation objective, quantize.qat_* settings.

    Feature terms (fitnets, at) are left out: their layers are wrapped in fake-quantize
    modules, and the logit terms carry the teacher's knowledge through this short phase.
    The terms used are logged as ``qat.objective``.
    """

    def finetune(model: torch.nn.Module) -> None:
        x_train, y_train = _tensors(splits, "train")
        terms = [t for t in cfg.distill.losses if not losses.LOSSES.get(t.name).needs_features]
        terms = terms or [t.model_copy(update={"name": "ce", "params": {}}) for t in cfg.distill.losses[:1]]
        objective = losses.build_objective(terms)
        teacher = None
        if objective.needs_teacher:
            if teacher_dir is None:
                raise StepError("qat_int8 fine-tunes with the KD loss and needs the teacher; pass teacher_dir")
            teacher = _load_teacher(teacher_dir, splits.meta)
        run.log_params({"qat.objective": losses.describe(terms)})
        train_cfg = cfg.distill.train.model_copy(update={"epochs": cfg.quantize.qat_epochs, "lr": cfg.quantize.qat_lr})
        history = training.kd_finetune(
            model,
            teacher,
            objective,
            x_train,
            y_train,
            train_cfg,
            augment=_augment(cfg, splits.meta, "distill"),
            on_epoch=lambda row: run.log_metrics({"qat.train_loss": row["train_loss"]}, step=int(row["epoch"])),
        )
        run.log_dict(history, "qat_history.json")

    return finetune


def _val_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return evaluation.accuracy(evaluation.predict(model, x), y)


def quantize(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    student_dir: str | Path,
    quantized_dir: str | Path,
    teacher_dir: str | Path | None = None,
    onnx_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Apply ``quantize.scheme`` to the fp32 student and save the result.

    ``static_int8`` calibrates on training batches of ``dataset_dir``; ``qat_int8`` fine-tunes
    with the KD loss against the teacher in ``teacher_dir``. ``scheme: auto`` tries
    ``quantize.auto_order`` and keeps the first scheme whose validation accuracy drop is within
    ``gate.max_quantization_drop``; every try is logged. When none passes, the fp32 student is
    saved with ``quantization_auto.found = false`` in its spec, which fails the gate with that
    reason. With ``quantize.export_onnx`` the fp32 and quantized ONNX files go to ``onnx_dir``.
    """
    qcfg = cfg.quantize
    with step_run(cfg, pipeline_run_id, "quantize") as run:
        splits = data_lib.load_splits(dataset_dir)
        student, spec = quantization.load_model(student_dir)
        x_val, y_val = _tensors(splits, "val")
        fp32_val = _val_accuracy(student, x_val, y_val)
        calibration = _calibration_batches(splits, cfg)
        context = quantization.QuantizeContext(
            calibration=calibration,
            finetune=_qat_finetune(cfg, splits, teacher_dir, run),
            allow_fp32_layers=qcfg.allow_fp32_layers,
        )
        auto = qcfg.scheme == "auto"
        candidates = list(qcfg.auto_order) if auto else [qcfg.scheme]
        # The backend override names one scheme's backend, so it cannot apply to a list of schemes.
        backend = None if auto else qcfg.backend
        tries: list[dict[str, Any]] = []
        chosen: tuple[str, torch.nn.Module] | None = None
        for scheme in candidates:
            try:
                model = quantization.quantize(student, scheme, context, backend)
            except quantization.QuantizationError as err:
                if not auto:
                    raise
                tries.append({"scheme": scheme, "passed": False, "error": str(err)})
                run.log_metrics({f"auto.{scheme}.passed": 0.0})
                continue
            val_acc = _val_accuracy(model, x_val, y_val)
            drop = round((fp32_val - val_acc) * 100, 9)
            with tempfile.TemporaryDirectory() as tmp:
                tried = quantization.save_model(model, spec | {"quantization": scheme, "backend": backend}, tmp)
                size = evaluation.artifact_size_bytes(tried)
            passed = drop <= cfg.gate.max_quantization_drop
            tries.append(
                {
                    "scheme": scheme,
                    "backend": quantization.get_quantizer(scheme, backend).backend,
                    "val_accuracy": val_acc,
                    "drop_points": drop,
                    "bytes": size,
                    "passed": passed,
                }
            )
            if auto:
                run.log_metrics(
                    {
                        f"auto.{scheme}.val_accuracy": val_acc,
                        f"auto.{scheme}.drop_points": drop,
                        f"auto.{scheme}.bytes": size,
                        f"auto.{scheme}.passed": float(passed),
                    }
                )
            if passed or not auto:
                chosen = (scheme, model)
                break

        extra: dict[str, Any] = {}
        if auto:
            if chosen is None:
                reason = (
                    f"quantize.scheme auto: none of {', '.join(candidates)} kept the validation accuracy drop "
                    f"within gate.max_quantization_drop = {cfg.gate.max_quantization_drop} points "
                    f"({'; '.join(_try_summary(t) for t in tries)}); the fp32 student was kept"
                )
                extra["quantization_auto"] = {"found": False, "chosen": None, "reason": reason, "tries": tries}
                run.set_tags({"kdflow.quantize_auto": "none passed"}, on_parent=_owns_parent(cfg))
                chosen = ("none", quantization.quantize(student, "none"))
            else:
                reason = f"quantize.scheme auto: chose {chosen[0]} ({_try_summary(tries[-1])})"
                extra["quantization_auto"] = {"found": True, "chosen": chosen[0], "reason": reason, "tries": tries}
                run.set_tags({"kdflow.quantize_auto": chosen[0]}, on_parent=_owns_parent(cfg))
            run.log_dict(tries, "auto_tries.json")
        scheme, quantized = chosen
        used_backend = backend if scheme == qcfg.scheme else None
        chosen_try = next((t for t in tries if t["scheme"] == scheme), None)
        spec = (
            spec
            | extra
            | {
                "quantization": scheme,
                "backend": used_backend,
                "role": "quantized_student",
                "mlflow_run_id": run.run_id,
                "fp32_layers": quantization.fp32_layers(student, scheme, used_backend),
                "validation": {
                    "fp32_accuracy": fp32_val,
                    **(
                        {"accuracy": chosen_try["val_accuracy"], "drop_points": chosen_try["drop_points"]}
                        if chosen_try
                        else {}
                    ),
                },
            }
        )
        if scheme in ("static_int8", "qat_int8"):
            spec["calibration"] = {"batches": len(calibration), "batch_size": qcfg.calibration_batch_size}
        if spec["fp32_layers"]:
            run.set_tags({"kdflow.fp32_layers": ", ".join(spec["fp32_layers"])})
        out = quantization.save_model(quantized, spec, quantized_dir)
        saved = json.loads((Path(out) / "spec.json").read_text())
        info = {
            "scheme": scheme,
            "backend": saved.get("backend", ""),
            "fp32_bytes": evaluation.artifact_size_bytes(student_dir),
            "quantized_bytes": evaluation.artifact_size_bytes(quantized_dir),
            "fp32_val_accuracy": fp32_val,
        }
        if auto:
            info["auto_found"] = extra["quantization_auto"]["found"]
            info["auto_reason"] = extra["quantization_auto"]["reason"]
        run.log_params(
            {
                "scheme": scheme,
                "backend": info["backend"],
                "requested_scheme": qcfg.scheme,
                "versions": saved.get("versions", {}),
            }
        )
        run.log_metrics(
            {
                "fp32_bytes": info["fp32_bytes"],
                "quantized_bytes": info["quantized_bytes"],
                "fp32_val_accuracy": fp32_val,
            }
            | (
                {"val_accuracy": chosen_try["val_accuracy"], "val_drop_points": chosen_try["drop_points"]}
                if chosen_try
                else {}
            )
        )
        if qcfg.export_onnx:
            if onnx_dir is None:
                raise StepError("quantize.export_onnx is true but no onnx_dir was given to the quantize step")
            info["onnx"] = _export_onnx(student, quantized, saved, splits, calibration, onnx_dir, run)
        return info


def _try_summary(t: dict[str, Any]) -> str:
    if "error" in t:
        return f"{t['scheme']}: not applicable"
    return f"{t['scheme']}: drop {t['drop_points']:.2f} points"


def _export_onnx(
    student: torch.nn.Module,
    quantized: torch.nn.Module,
    spec: dict[str, Any],
    splits: data_lib.Splits,
    calibration: list[torch.Tensor],
    onnx_dir: str | Path,
    run: StepRun,
) -> dict[str, Any]:
    """Export fp32 (+ the onnxruntime-quantized counterpart) and check both on the test split."""
    from kd_lib.compress import onnx_export

    out = Path(onnx_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_test, y_test = _tensors(splits, "test")
    fp32_path = onnx_export.export_fp32(student, spec["input_shape"], out / "student_fp32.onnx")
    q_path, how = onnx_export.quantize_onnx(
        fp32_path, out / "student_quantized.onnx", spec["quantization"], calibration
    )
    report: dict[str, Any] = {"quantized_onnx": how}
    pairs = [("fp32", fp32_path, student)] + ([("quantized", q_path, quantized)] if q_path else [])
    for name, path, torch_model in pairs:
        onnx_logits = onnx_export.run_onnx(path, x_test)
        torch_logits = training.compute_logits(torch_model, x_test)
        onnx_pred = onnx_logits.argmax(1)
        report[name] = {
            "file": Path(path).name,
            "bytes": Path(path).stat().st_size,
            "test_accuracy": evaluation.accuracy(onnx_pred, y_test),
            "torch_test_accuracy": evaluation.accuracy(torch_logits.argmax(1), y_test),
            "agreement_with_torch": evaluation.accuracy(onnx_pred, torch_logits.argmax(1)),
            "max_abs_logit_diff": float((onnx_logits - torch_logits).abs().max()),
        }
    # The fp32 export must be the same function as the torch model; anything else is an exporter bug.
    if report["fp32"]["max_abs_logit_diff"] > 1e-3:
        raise StepError(
            f"the fp32 ONNX export disagrees with torch on the test split (max |logit diff| "
            f"{report['fp32']['max_abs_logit_diff']:.3g}); not shipping it"
        )
    (out / "onnx_check.json").write_text(json.dumps(report, indent=2))
    run.log_dict(report, "onnx_check.json")
    run.log_artifacts(out, "onnx")
    run.log_metrics({f"onnx.{k}.test_accuracy": v["test_accuracy"] for k, v in report.items() if isinstance(v, dict)})
    return report


MODEL_ROLES = ("teacher", "student", "quantized")


def _has_model(directory: str | Path | None) -> bool:
    return directory is not None and (Path(directory) / quantization.SPEC_FILE).is_file()


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
        # The no-KD baseline is optional: evaluated when distill trained one.
        roles = [*MODEL_ROLES, *(["baseline"] if _has_model(model_dirs.get("baseline")) else [])]
        for role in roles:
            model, spec = quantization.load_model(model_dirs[role])
            model = for_data(model, spec.get("normalization"), meta.normalization)  # an imported teacher's own
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
            results[role]["backend"] = spec.get("backend", "none")
            auto = spec.get("quantization_auto")
            if isinstance(auto, dict):
                results[role]["quantization_auto_found"] = bool(auto.get("found"))
                results[role]["quantization_auto_reason"] = str(auto.get("reason", ""))
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
        _write_json(evaluation_path, results)
        run.log_dict(results, "evaluation.json")
        return results


def _champion_metrics(cfg: PipelineConfig, splits: data_lib.Splits, run: StepRun) -> dict[str, Any] | None:
    """The current champion measured on THIS run's test split (same data, same yardstick)."""
    registry = ModelRegistry(run.client, cfg.registry.model_name)
    version = registry.alias_version(cfg.registry.alias)
    if version is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = registry.download_version(version, tmp)
        model, spec = quantization.load_model(model_dir)
        size = evaluation.artifact_size_bytes(model_dir)
    meta = splits.meta
    if list(spec["input_shape"]) != list(meta.input_shape) or spec["num_classes"] != meta.num_classes:
        raise StepError(
            f"champion {cfg.registry.model_name} v{version} takes input {spec['input_shape']} with "
            f"{spec['num_classes']} classes, this data {meta.input_shape} with {meta.num_classes}: they cannot be "
            "compared; register under a new registry.model_name or set gate.champion_policy=ignore"
        )
    model = for_data(model, spec.get("normalization"), meta.normalization)  # the champion's own statistics
    x_test, y_test = _tensors(splits, "test")
    accuracy = evaluation.accuracy(evaluation.predict(model, x_test), y_test)
    return {"version": version, "accuracy": accuracy, "size_bytes": size}


def class_names(meta: data_lib.DatasetMeta | dict[str, Any]) -> list[str]:
    """The dataset's class names when it has them, else the class indices as strings."""
    fields = meta if isinstance(meta, dict) else meta.__dict__
    names = fields.get("class_names")
    return [str(n) for n in names] if names else [str(i) for i in range(int(fields["num_classes"]))]


def _gate_decision(
    cfg: PipelineConfig, results: dict[str, dict[str, Any]], champion: dict[str, Any] | None = None
) -> gates.GateDecision:
    return gates.decide(
        results["quantized"], results["teacher"], cfg.gate, fp32_student=results["student"], champion=champion
    )


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
        run={
            "pipeline_run_id": pipeline_run_id,
            "dataset_fingerprint": meta.get("fingerprint", ""),
            "config_hash": cfg.config_hash(),
        },
        config=cfg.model_dump(mode="json", exclude={"tracking"}),
        class_names=class_names(meta),
    )
    for path, text in ((html_path, report.render_html(data)), (markdown_path, report.render_markdown(data))):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    return data


def gate(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    evaluation_path: str | Path,
    decision_path: str | Path,
) -> tuple[gates.GateDecision, str]:
    """Apply the thresholds (and the champion comparison) to the quantized student.

    Returns the decision and the action the DAG takes: ``promote``, ``challenger`` or
    ``reject``. The table goes to MLflow either way (to the parent run too, unless this is a
    sweep candidate: then the decision file also names the candidate and its quantize run,
    which is how the select step pairs it with the candidate's other outputs).
    """
    with step_run(cfg, pipeline_run_id, "gate") as run:
        results = json.loads(Path(evaluation_path).read_text())
        champion = None
        if cfg.gate.champion_policy != "ignore":
            champion = _champion_metrics(cfg, data_lib.load_splits(dataset_dir), run)
            if champion:
                run.log_metrics(
                    {"champion.accuracy": champion["accuracy"], "champion.size_bytes": champion["size_bytes"]}
                )
                run.set_tags({"kdflow.champion_version": champion["version"]})
        decision = _gate_decision(cfg, results, champion)
        action = decision.action(cfg.registry.keep_rejected)
        Path(decision_path).parent.mkdir(parents=True, exist_ok=True)
        record = decision.to_dict() | {"action": action}
        if cfg.candidate:
            record |= {"candidate": cfg.candidate, "quantized_run_id": results["quantized"].get("mlflow_run_id", "")}
        Path(decision_path).write_text(json.dumps(record))
        run.log_metrics({f"gate.{c.name}": c.value for c in decision.checks} | {"gate.passed": float(decision.passed)})
        _log_gate(run, decision, action, decision.table(), on_parent=_owns_parent(cfg))
        return decision, action


def _log_gate(run: StepRun, decision: gates.GateDecision, action: str, table: str, on_parent: bool) -> None:
    """The gate's table and JSON on the step's run and, with ``on_parent``, its record on the
    parent run (tags and failed checks included)."""
    for parent in (False, True) if on_parent else (False,):
        run.log_text(table, "gate.txt", on_parent=parent)
        run.log_dict(decision.to_dict(), "gate.json", on_parent=parent)
    parent_tags = {"kdflow.gate_status": "passed" if decision.passed else "failed", "kdflow.gate_action": action}
    if not decision.passed:
        parent_tags["kdflow.gate_failed_checks"] = ",".join(c.name for c in decision.failed())
        parent_tags |= {k: v for k, v in gate_tags(decision).items() if k.startswith("gate.")}
    run.set_tags(parent_tags, on_parent=on_parent)


def _candidate_outputs(
    evaluation_paths: list[str | Path], decision_paths: list[str | Path], quantized_dirs: list[str | Path]
) -> dict[str, dict[str, Any]]:
    """Candidate name -> its evaluation, decision and quantized model directory.

    The three lists come from ``dsl.Collected`` and nothing promises they share an order, so
    they are paired by content: the gate's decision names its candidate and the quantize run
    whose model it judged; the evaluation and the model's spec carry that run id too.
    """
    evaluations = {}
    for path in evaluation_paths:
        results = json.loads(Path(path).read_text())
        evaluations[results["quantized"]["mlflow_run_id"]] = (results, Path(path))
    models = {json.loads((Path(d) / "spec.json").read_text())["mlflow_run_id"]: Path(d) for d in quantized_dirs}
    out: dict[str, dict[str, Any]] = {}
    for path in decision_paths:
        decision = json.loads(Path(path).read_text())
        name, run_id = decision.get("candidate"), decision.get("quantized_run_id")
        if not name or run_id not in evaluations or run_id not in models:
            raise StepError(
                f"decision {path} does not name a candidate whose evaluation and quantized model were collected "
                f"(candidate {name!r}, quantize run {run_id!r}); the select step takes the outputs of one sweep's candidates"
            )
        results, evaluation_path = evaluations[run_id]
        out[name] = {
            "decision": decision,
            "decision_path": Path(path),
            "evaluation": results,
            "evaluation_path": evaluation_path,
            "quantized_dir": models[run_id],
        }
    return out


def select(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    candidate_configs: list[str],
    evaluation_paths: list[str | Path],
    decision_paths: list[str | Path],
    quantized_dirs: list[str | Path],
    quantized_dir: str | Path,
    evaluation_path: str | Path,
    decision_path: str | Path,
    summary_path: str | Path | None = None,
) -> tuple[sweep.Selection, str]:
    """Gather a sweep's candidates, choose the one to register, and hand it on.

    The rule is ``kd_lib.evaluate.sweep.select``: the smallest candidate that passes every gate, ties
    by accuracy then batch-1 latency, the Pareto front reported. The chosen candidate's
    quantized model, evaluation and decision are copied to ``quantized_dir``,
    ``evaluation_path`` and ``decision_path`` (what register takes); when none passes, those
    hold placeholders and the decision (one failed check per candidate) says why.

    Logged to this step's run and to the parent run: ``sweep.json`` (every candidate with its
    front membership and failed checks), ``sweep.md``, ``sweep.txt`` and ``sweep_front.png``;
    the parent also gets the chosen candidate's gate record (``gate.json``, status tags) and
    the tag ``kdflow.sweep_selected`` (the name, or ``none``).

    Args:
        cfg: The base config (with its ``sweep`` section).
        candidate_configs: The candidates' config JSONs, in sweep order (what the DAG fanned out).
        evaluation_paths, decision_paths, quantized_dirs: Every candidate's evaluate, gate and
            quantize outputs, in any order.
        summary_path: Where to write the Markdown table (with the plot inlined), if given.

    Returns:
        The selection, and the config JSON of the chosen candidate (the base config's when
        none was chosen).

    Raises:
        StepError: the outputs do not match the candidates.
    """
    configs = {c.candidate: c for c in map(config_from_json, candidate_configs)}
    with step_run(cfg, pipeline_run_id, "select") as run:
        outputs = _candidate_outputs(evaluation_paths, decision_paths, quantized_dirs)
        if set(outputs) != set(configs):
            raise StepError(
                f"the sweep has candidates {sorted(configs, key=str)} but results for {sorted(outputs)}; "
                "every candidate must run distill, quantize, evaluate and gate"
            )
        results = []
        for index, (name, candidate) in enumerate(configs.items()):
            info = {
                "student": f"{candidate.student.model.arch} {candidate.student.model.params}",
                "scheme": candidate.quantize.scheme,
                "temperature": next(
                    (
                        t.params.get("temperature")
                        for t in candidate.distill.losses
                        if t.name in sweep.TEMPERATURE_LOSSES
                    ),
                    None,
                ),
            }
            out = outputs[name]
            results.append(sweep.result_from(str(name), index, out["evaluation"], out["decision"], info))
        selection = sweep.select(results)
        summary = selection.to_dict()
        table = sweep.table_text(summary)
        print(table, flush=True)  # the task's log: the why, right where the run ends
        png = sweep.plot_front(summary)
        markdown = sweep.table_markdown(summary, base64.b64encode(png).decode("ascii"))

        decision = selection.decision()
        chosen = selection.chosen
        Path(decision_path).parent.mkdir(parents=True, exist_ok=True)
        Path(evaluation_path).parent.mkdir(parents=True, exist_ok=True)
        if chosen is not None:
            picked = outputs[chosen.name]
            shutil.copytree(picked["quantized_dir"], quantized_dir, dirs_exist_ok=True)
            shutil.copyfile(picked["evaluation_path"], evaluation_path)
            shutil.copyfile(picked["decision_path"], decision_path)
        else:
            # KFP uploads every declared output: leave files that say why they are empty.
            Path(quantized_dir).mkdir(parents=True, exist_ok=True)
            (Path(quantized_dir) / "NO_CANDIDATE.txt").write_text(selection.headline() + "\n")
            _write_json(evaluation_path, {})
            _write_json(decision_path, decision.to_dict() | {"action": selection.action})
        if summary_path is not None:
            Path(summary_path).parent.mkdir(parents=True, exist_ok=True)
            Path(summary_path).write_text(markdown)

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "sweep.json").write_text(json.dumps(summary, indent=2))
            (Path(tmp) / "sweep.md").write_text(markdown)
            (Path(tmp) / "sweep.txt").write_text(table + "\n")
            (Path(tmp) / "sweep_front.png").write_bytes(png)
            run.log_artifacts(tmp)
            run.client.log_artifacts(run.parent_run_id, tmp)
        passed = sum(r.decision.passed for r in results)
        run.log_metrics(
            {"sweep.candidates": len(results), "sweep.passed": passed, "sweep.on_front": len(selection.front)}
        )
        run.log_params({"chosen": chosen.name if chosen else "none", "action": selection.action, "rule": sweep.RULE})
        gate_table = table if chosen is None else decision.table()
        _log_gate(run, decision, selection.action, gate_table, on_parent=True)
        run.set_tags({SELECTED_TAG: chosen.name if chosen else "none"}, on_parent=True)
        chosen_config = configs[chosen.name].to_json() if chosen is not None else cfg.to_json()
        return selection, chosen_config


def register(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    quantized_dir: str | Path,
    evaluation_path: str | Path,
    decision_path: str | Path,
) -> dict[str, str]:
    """Log the quantized student as a pyfunc, register it with its checks and lineage, promote it.

    Runs only under the gate's non-``reject`` branch and re-derives the action itself:
    ``promote`` registers a ``validation_status=passed`` version and then converges the
    champion alias onto the best passed version (race-safe); ``challenger`` registers a
    ``rejected`` version under the challenger alias, never champion. Re-running the same
    pipeline run reuses its version instead of creating a duplicate.
    """
    decision = gates.GateDecision.from_dict(json.loads(Path(decision_path).read_text()))
    action = decision.action(cfg.registry.keep_rejected)
    if action == "reject":
        failed = ", ".join(c.name for c in decision.failed())
        raise StepError(f"refusing to register: the gate failed ({failed})")

    with step_run(cfg, pipeline_run_id, "register") as run:
        meta = data_lib.load_splits(dataset_dir).meta
        results = json.loads(Path(evaluation_path).read_text())
        spec = json.loads((Path(quantized_dir) / "spec.json").read_text())
        client = run.client
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
        if cfg.candidate:
            tags["kdflow.candidate"] = cfg.candidate
        with registry_errors(client.tracking_uri, cfg.registry.model_name):
            version = registry.find_by_tag("kdflow.pipeline_run_id", pipeline_run_id)
            reused = version is not None
            if not reused:
                # MLflow resolves a models:/m-... source through its global store, so
                # registration happens inside the same scoped fluent state as log_model.
                with fluent_run(client, run.run_id):
                    source, model_id = log_pyfunc(quantized_dir, spec, pip_requirements(spec))
                    version = registry.register(source, run.run_id, tags, model_id=model_id)
            if action == "promote":
                alias, champion = cfg.registry.alias, registry.converge(cfg.registry.alias, cfg.registry.ranking)
            else:
                alias, champion = cfg.registry.challenger_alias, registry.alias_version(cfg.registry.alias)
                registry.set_alias(alias, version, require_passed=False)
        out = {
            "model_name": cfg.registry.model_name,
            "version": version,
            "alias": alias,
            "champion": champion or "",
            "reused": str(reused).lower(),
        }
        run.set_tags(
            {"kdflow.registered_version": version, "kdflow.alias": alias, "kdflow.champion": champion or ""},
            on_parent=True,
        )
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
