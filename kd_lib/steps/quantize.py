"""The ``quantize`` step: ``quantize.scheme`` applied to the fp32 student (``auto``: the first
scheme of ``quantize.auto_order`` that keeps the accuracy), optionally exported to ONNX."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kd_lib.adapters.tracking import StepRun, step_run
from kd_lib.artifacts import ModelSpec, read_spec
from kd_lib.artifacts.dataset_dir import Splits, load_splits
from kd_lib.compress import quantization
from kd_lib.config import PipelineConfig
from kd_lib.evaluate import metrics as evaluation
from kd_lib.steps.common import StepError, owns_parent
from kd_lib.steps.inputs import accuracy, augment, load_teacher, tensors
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
) -> dict[str, Any]:
    """Apply ``quantize.scheme`` to the fp32 student and save the result.

    ``static_int8`` calibrates on training batches of ``dataset_dir``; ``qat_int8`` fine-tunes
    with the KD loss against the teacher in ``teacher_dir``. ``scheme: auto`` tries
    ``quantize.auto_order`` and keeps the first scheme whose validation accuracy drop is within
    ``gate.max_quantization_drop``; every try is logged. When none passes, the fp32 student is
    saved with ``quantization_auto.found = false`` in its spec, which fails the gate with that
    reason. With ``quantize.export_onnx`` the fp32 and quantized ONNX files go to ``onnx_dir``.

    Returns:
        ``scheme``, ``backend``, ``fp32_bytes``, ``quantized_bytes``, ``fp32_val_accuracy``
        (``auto_found`` and ``auto_reason`` with ``auto``; ``onnx`` with an export).
    """
    qcfg = cfg.quantize
    with step_run(cfg, pipeline_run_id, "quantize") as run:
        splits = load_splits(dataset_dir)
        student, spec = quantization.load_model(student_dir)
        x_val, y_val = tensors(splits, "val")
        fp32_val = accuracy(student, x_val, y_val)
        calibration = _calibration_batches(splits, cfg)
        context = quantization.QuantizeContext(
            calibration=calibration,
            finetune=_qat_finetune(cfg, splits, teacher_dir, run),
            allow_fp32_layers=qcfg.allow_fp32_layers,
        )

        # Try the scheme (or, for auto, each in turn until one keeps the accuracy).
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
            val_acc = accuracy(model, x_val, y_val)
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
                run.set_tags({"kdflow.quantize_auto": "none passed"}, on_parent=owns_parent(cfg))
                chosen = ("none", quantization.quantize(student, "none"))
            else:
                reason = f"quantize.scheme auto: chose {chosen[0]} ({_try_summary(tries[-1])})"
                extra["quantization_auto"] = {"found": True, "chosen": chosen[0], "reason": reason, "tries": tries}
                run.set_tags({"kdflow.quantize_auto": chosen[0]}, on_parent=owns_parent(cfg))
            run.log_dict(tries, "auto_tries.json")

        # Save the chosen model with its spec.
        assert chosen is not None  # one scheme: it was chosen or it raised; auto: a scheme or "none"
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
        saved = read_spec(out)

        # Log.
        info: dict[str, Any] = {
            "scheme": scheme,
            "backend": saved.backend or "",
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
                "versions": saved.versions or {},
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


def _calibration_batches(splits: Splits, cfg: PipelineConfig) -> list[torch.Tensor]:
    """``quantize.calibration_batches`` batches of training samples, in a seeded random order."""
    x = torch.from_numpy(splits.x["train"])
    size = cfg.quantize.calibration_batch_size
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.distill.train.seed))
    order = order[: cfg.quantize.calibration_batches * size]
    return [x[order[i : i + size]] for i in range(0, len(order), size)]


def _qat_finetune(
    cfg: PipelineConfig, splits: Splits, teacher_dir: str | Path | None, run: StepRun
) -> Callable[[torch.nn.Module], None]:
    """The fine-tuning function of qat_int8: the distillation objective, quantize.qat_* settings.

    Feature terms (fitnets, at) are left out: their layers are wrapped in fake-quantize
    modules, and the logit terms carry the teacher's knowledge through this short phase.
    The terms used are logged as ``qat.objective``.
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
        run.log_params({"qat.objective": losses.describe(terms)})
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
        )
        run.log_dict(history, "qat_history.json")

    return finetune


def _try_summary(t: dict[str, Any]) -> str:
    if "error" in t:
        return f"{t['scheme']}: not applicable"
    return f"{t['scheme']}: drop {t['drop_points']:.2f} points"


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
