"""The ``quantize`` step: the deployment artifact. With ``quantize.scheme: auto`` every artifact
``quantize.candidates`` names is built and measured, and the best by ``quantize.select`` within
``gate.max_quantization_drop`` goes on; a named scheme is built as asked. With
``distill.baseline`` on, the fp32 model that goes on is the KD student, or (``distill.promote:
better``) the baseline when it is significantly more accurate."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from kd_lib.adapters.tracking import StepRun, step_run
from kd_lib.artifacts import ModelSpec, has_model, read_spec
from kd_lib.artifacts.dataset_dir import Splits
from kd_lib.artifacts.model_dir import SelectionRecord, write_selection
from kd_lib.compress import quantization
from kd_lib.config import PipelineConfig
from kd_lib.evaluate import candidates as selection
from kd_lib.evaluate import metrics as evaluation
from kd_lib.steps import candidates
from kd_lib.steps.common import StepError, carry_tokenizer, owns_parent
from kd_lib.steps.inputs import accuracy, augment, load_teacher, open_dataset, pad_id, tensors, transfer_samples
from kd_lib.train import loop as training
from kd_lib.train import losses
from kd_lib.train.inference import compute_logits


def quantize(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    student_dir: str | Path,
    quantized_dir: str | Path,
    teacher_dir: str | Path | None = None,
    onnx_dir: str | Path | None = None,
    baseline_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Build, measure and choose the deployment artifact of the fp32 student.

    The fp32 model is the KD student from ``student_dir``, or with ``distill.promote: better``
    the baseline from ``baseline_dir`` when the test split shows it significantly more
    accurate (``promotion`` in the spec says which and why). ``static_int8`` and
    ``onnx_static_int8`` calibrate on training batches; ``qat_int8`` fine-tunes with the KD loss
    against the teacher in ``teacher_dir``. Every candidate is saved, loaded back and measured
    (validation accuracy, bytes, p50 latency at each ``evaluate.batch_sizes``); only candidates
    within the gate's accuracy and size bars qualify. The measurements and the choice are logged
    and written beside the spec (``selection.json``). When no candidate qualifies, the torch fp32
    model is saved with ``found: false`` there, which fails the gate with that reason. With
    ``quantize.export_onnx`` the fp32 student and an ONNX Runtime counterpart of a torch scheme
    also go to ``onnx_dir``.

    Returns:
        ``scheme``, ``backend``, ``fp32_bytes``, ``quantized_bytes``, ``fp32_val_accuracy``,
        ``source_role``, ``auto_found`` and ``auto_reason`` (``onnx`` with an export).
    """
    qcfg = cfg.quantize
    transfer = cfg.distill.transfer_source is not None and "qat_int8" in _schemes(cfg)
    with (
        step_run(cfg, pipeline_run_id, "quantize") as run,
        open_dataset(cfg, dataset_dir, transfer=transfer) as splits,
    ):
        meta = splits.meta
        promotion = _promotion(cfg, splits, student_dir, baseline_dir)
        source_dir = baseline_dir if promotion["source_role"] == "baseline" else student_dir
        assert source_dir is not None
        if promotion.get("reason"):
            _tag(run, cfg, {"kdflow.promotion": promotion["reason"][:5000]})
        student, spec = quantization.load_model(source_dir)
        x_val, y_val = tensors(splits, "val")
        fp32_val = accuracy(student, x_val, y_val, pad_id(meta))
        calibration = _calibration_batches(splits, cfg)
        context = quantization.QuantizeContext(
            calibration=calibration,
            finetune=_qat_finetune(cfg, splits, teacher_dir, run),
            allow_fp32_layers=qcfg.allow_fp32_layers,
        )

        auto = qcfg.scheme == "auto"
        names = _schemes(cfg)
        # Torch fp32 is always measured: the reference no artifact may be slower than.
        measured = names if selection.REFERENCE in names else [selection.REFERENCE, *names]
        # Every candidate is saved with the spec it ships with, so the bytes measured are the
        # bytes registered; what varies run to run (measurements) goes to selection.json.
        shipped = spec | {
            "role": "quantized_student",
            "mlflow_run_id": run.run_id,
            "source_role": promotion["source_role"],
            "promotion": promotion,
            "class_names": _class_names(meta),
        }
        with tempfile.TemporaryDirectory(prefix="kdflow-candidates-") as tmp:
            built: dict[str, Path] = {}
            errors: dict[str, str] = {}
            for name in measured:
                try:
                    built[name] = candidates.build(
                        name, student, shipped, meta, context, Path(tmp) / name, None if auto else qcfg.backend
                    )
                except quantization.QuantizationError as err:
                    if not auto:
                        raise
                    errors[name] = str(err)
            rows = candidates.measure(measured, built, errors, cfg, meta, x_val, y_val, fp32_val)
            reference = rows[measured.index(selection.REFERENCE)]
            listed = [r for r in rows if r.name in names]
            if auto:
                max_bytes, size_rule = _size_limit(cfg, teacher_dir)
                chosen_set = selection.select(
                    listed, qcfg.select, cfg.gate.max_quantization_drop, reference, max_bytes, size_rule
                )
            else:
                chosen_set = selection.Selection(
                    chosen=names[0],
                    reason=f"quantize.scheme {names[0]} (one scheme named; nothing to choose from)",
                    candidates=[replace(listed[0], verdict="chosen")],
                    reference=reference,
                )
            scheme = chosen_set.chosen or selection.REFERENCE
            chosen_row = next(r for r in rows if r.name == scheme)
            selection_record = SelectionRecord(
                select=qcfg.select if auto else "named",
                found=chosen_set.found,
                chosen=chosen_set.chosen,
                reason=chosen_set.reason,
                threads=cfg.evaluate.threads,
                fp32_val_accuracy=fp32_val,
                candidates=[c.to_dict() for c in chosen_set.candidates],
                reference=reference.to_dict(),
            )
            shutil.copytree(built[scheme], quantized_dir, dirs_exist_ok=True)
            carry_tokenizer(dataset_dir, meta, quantized_dir)
            write_selection(quantized_dir, selection_record)

        run.log_text(chosen_set.table() + f"\n\n{chosen_set.reason}\n", "candidates.txt")
        run.log_dict([c.to_dict() for c in chosen_set.candidates], "candidates.json")
        for c in chosen_set.candidates:
            if c.built:
                run.log_metrics(
                    {
                        f"candidate.{c.name}.val_accuracy": c.val_accuracy or 0.0,
                        f"candidate.{c.name}.drop_points": c.drop_points or 0.0,
                        f"candidate.{c.name}.bytes": float(c.size_bytes or 0),
                    }
                    | {f"candidate.{c.name}.latency_b{bs}_p50_ms": ms for bs, ms in c.latency_ms.items()}
                )
        _tag(run, cfg, {"kdflow.quantize_choice": scheme})
        saved = read_spec(quantized_dir)
        if saved.fp32_layers:
            run.set_tags({"kdflow.fp32_layers": ", ".join(saved.fp32_layers)})

        info: dict[str, Any] = {
            "scheme": scheme,
            "backend": saved.backend or "",
            "fp32_bytes": evaluation.artifact_size_bytes(source_dir),
            "quantized_bytes": evaluation.artifact_size_bytes(quantized_dir),
            "fp32_val_accuracy": fp32_val,
            "source_role": promotion["source_role"],
            "auto_found": chosen_set.found,
            "auto_reason": chosen_set.reason,
        }
        run.log_params(
            {
                "scheme": scheme,
                "backend": info["backend"],
                "requested_scheme": qcfg.scheme,
                "select": qcfg.select if auto else "named",
                "source_role": info["source_role"],
                "versions": saved.versions or {},
            }
        )
        run.log_metrics(
            {
                "fp32_bytes": info["fp32_bytes"],
                "quantized_bytes": info["quantized_bytes"],
                "fp32_val_accuracy": fp32_val,
                "val_accuracy": chosen_row.val_accuracy or 0.0,
                "val_drop_points": chosen_row.drop_points or 0.0,
            }
        )
        if qcfg.export_onnx:
            if onnx_dir is None:
                raise StepError("quantize.export_onnx is true but no onnx_dir was given to the quantize step")
            quantized, _ = quantization.load_model(quantized_dir)
            info["onnx"] = _export_onnx(student, quantized, saved, splits, calibration, onnx_dir, run)
        return info


def _tag(run: StepRun, cfg: PipelineConfig, tags: dict[str, str]) -> None:
    """Tag the step's run and, unless this is a sweep candidate's step, the parent run."""
    run.set_tags(tags)
    if owns_parent(cfg):
        run.set_tags(tags, on_parent=True)


def _size_limit(cfg: PipelineConfig, teacher_dir: str | Path | None) -> tuple[float | None, str]:
    """The largest artifact the gate's size checks accept: ``max_size_mb`` and, against the
    teacher's bytes, ``min_compression_ratio``; the tighter one, and a phrase naming it."""
    limits = [(cfg.gate.max_size_mb * 1e6, f"gate.max_size_mb {cfg.gate.max_size_mb:g}")]
    if has_model(teacher_dir):
        assert teacher_dir is not None
        teacher_bytes = evaluation.artifact_size_bytes(teacher_dir)
        limits.append(
            (
                teacher_bytes / cfg.gate.min_compression_ratio,
                f"gate.min_compression_ratio {cfg.gate.min_compression_ratio:g} of the teacher's {teacher_bytes} bytes",
            )
        )
    return min(limits)


def _class_names(meta: Any) -> list[str]:
    names = meta.class_names
    return [str(n) for n in names] if names else [str(i) for i in range(meta.num_classes)]


def _promotion(
    cfg: PipelineConfig, splits: Splits, student_dir: str | Path, baseline_dir: str | Path | None
) -> dict[str, Any]:
    """Which fp32 model goes on, and why: the KD student unless ``distill.promote: better`` and the
    baseline is significantly more accurate on the test split (exact McNemar test)."""
    if not has_model(baseline_dir):
        return {"source_role": "student", "reason": ""}
    assert baseline_dir is not None
    x_test, y_test = tensors(splits, "test")
    kd_model, _ = quantization.load_model(student_dir)
    base_model, _ = quantization.load_model(baseline_dir)
    paired = evaluation.paired_gain(
        evaluation.predict(kd_model, x_test), evaluation.predict(base_model, x_test), y_test
    )
    gain = f"KD gain {paired['gain_points']:+.2f} points, exact McNemar p = {paired['p_value']:.3g}"
    worse = bool(paired["significant"]) and paired["gain_points"] < 0
    if worse and cfg.distill.promote == "better":
        role = "baseline"
        reason = (
            f"the baseline (same student, no teacher) is significantly more accurate on the test split ({gain}); "
            "distill.promote: better sent the baseline on instead of the KD student"
        )
    elif worse:
        role = "student"
        reason = (
            f"the baseline is significantly more accurate on the test split ({gain}); distill.promote: kd keeps "
            "the KD student, and the gate fails on it"
        )
    else:
        role = "student"
        reason = f"the KD student goes on ({gain}; the baseline is not significantly better)"
    return {
        "source_role": role,
        "reason": reason,
        "policy": cfg.distill.promote,
        "kd_gain_points": paired["gain_points"],
        "p_value": paired["p_value"],
        "kd_significantly_worse": worse,
    }


def _calibration_batches(splits: Splits, cfg: PipelineConfig) -> list[torch.Tensor]:
    """``quantize.calibration_batches`` batches of training samples, in a seeded random order."""
    x, _ = tensors(splits, "train")
    size = cfg.quantize.calibration_batch_size
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.distill.train.seed))
    order = order[: cfg.quantize.calibration_batches * size]
    return [x[order[i : i + size]] for i in range(0, len(order), size)]


def _schemes(cfg: PipelineConfig) -> list[str]:
    """The schemes this quantize step builds: ``quantize.candidates`` under auto, else the scheme."""
    return list(cfg.quantize.candidates) if cfg.quantize.scheme == "auto" else [cfg.quantize.scheme]


def _qat_finetune(
    cfg: PipelineConfig, splits: Splits, teacher_dir: str | Path | None, run: StepRun
) -> Callable[[torch.nn.Module], None]:
    """The fine-tuning function of qat_int8: the distillation objective, quantize.qat_* settings.

    Feature terms (fitnets, at, hidden_mse, attention_kl) are left out: their layers are
    wrapped in fake-quantize modules, and the logit terms carry the teacher's knowledge through
    this short phase. The transfer set (``distill.transfer_source``), when the dataset holds
    one, is learnt from the teacher here as in distill. The terms used are logged as
    ``qat.objective``, the transfer samples' count as ``qat.transfer_size``.
    """

    def finetune(model: torch.nn.Module) -> None:
        x_train, y_train = tensors(splits, "train")
        terms = [t for t in cfg.distill.losses if not losses.LOSSES.get(t.name).needs_features]
        terms = terms or [t.model_copy(update={"name": "ce", "params": {}}) for t in cfg.distill.losses[:1]]
        objective = losses.build_objective(terms)
        teacher = None
        if objective.needs_teacher:
            if teacher_dir is None:
                raise StepError("qat_int8 fine-tunes with the KD loss and needs the teacher; pass teacher_dir")
            teacher = load_teacher(teacher_dir, splits.meta)
        transfer = transfer_samples(splits) if objective.needs_teacher else None
        run.log_params(
            {"qat.objective": losses.describe(terms), "qat.transfer_size": 0 if transfer is None else len(transfer)}
        )
        train_cfg = cfg.distill.train.model_copy(update={"epochs": cfg.quantize.qat_epochs, "lr": cfg.quantize.qat_lr})
        history = training.kd_finetune(
            model,
            teacher,
            objective,
            x_train,
            y_train,
            train_cfg,
            augment=augment(cfg, splits.meta, "distill"),
            on_epoch=lambda row: run.log_metrics({"qat.train_loss": row["train_loss"]}, step=int(row["epoch"])),
            x_transfer=transfer,
        )
        run.log_dict(history, "qat_history.json")

    return finetune


def _export_onnx(
    student: torch.nn.Module,
    quantized: torch.nn.Module,
    spec: ModelSpec,
    splits: Splits,
    calibration: list[torch.Tensor],
    onnx_dir: str | Path,
    run: StepRun,
) -> dict[str, Any]:
    """Export fp32 (+ the onnxruntime-quantized counterpart) and check both on the test split."""
    # lazy: the ONNX exporter loads only when quantize.export_onnx asks for it
    from kd_lib.compress import onnx_export

    out = Path(onnx_dir)
    out.mkdir(parents=True, exist_ok=True)
    x_test, y_test = tensors(splits, "test")
    fp32_path = onnx_export.export_fp32(student, spec.input_shape, out / "student_fp32.onnx")
    q_path, how = onnx_export.quantize_onnx(fp32_path, out / "student_quantized.onnx", spec.quantization, calibration)
    report: dict[str, Any] = {"quantized_onnx": how}
    pairs = [("fp32", fp32_path, student)] + ([("quantized", q_path, quantized)] if q_path else [])
    for name, path, torch_model in pairs:
        onnx_logits = onnx_export.run_onnx(path, x_test)
        torch_logits = compute_logits(torch_model, x_test)
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
