"""The ``distill`` step: the student trained from the teacher with ``distill.losses``, and
optionally the same student without the teacher (the no-KD baseline)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from kd_lib.artifacts.dataset_dir import DatasetMeta, Splits
from kd_lib.compress import quantization
from kd_lib.config import ConfigError, LossTermConfig, PipelineConfig
from kd_lib.models.builders import build_model, count_parameters
from kd_lib.models.init_from_teacher import init_from_teacher
from kd_lib.steps.common import carry_tokenizer, model_spec
from kd_lib.steps.inputs import augment, load_teacher, model_params, open_dataset, pad_id, tensors, transfer_samples
from kd_lib.steps.training_run import checkpoint_dir, epoch_logger, launch_ranks, log_result, progress, recorder
from kd_lib.train import loop as training
from kd_lib.train import losses, ranks

# What the baseline directory holds when no baseline was trained (a KFP output always exists).
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
    ``distill.train.distributed.nproc_per_node > 1`` both train on that many processes: every
    rank runs this function, rank 0 alone records (``kd_lib.steps.training_run``).

    With a transfer set (``distill.transfer_source``, prepared into the dataset directory) the KD
    student trains on train + transfer samples, learning from the teacher alone on the
    unlabeled ones; the baseline trains on the labeled train split only.

    Returns:
        ``best_epoch``, ``best_val_accuracy``, ``epochs_run``, ``stopped_early``, the step's
        ``run_id`` and, with a baseline, ``baseline_best_val_accuracy``.
    """
    if ranks.should_launch(cfg.distill.train.distributed):
        return launch_ranks(
            cfg,
            "distill",
            pipeline_run_id,
            dataset_dir=dataset_dir,
            teacher_dir=teacher_dir,
            student_dir=student_dir,
            history_path=history_path,
            baseline_dir=baseline_dir,
        )
    main = ranks.is_main()
    with (
        recorder(cfg, pipeline_run_id, "distill") as run,
        progress("distill", cfg.distill.train.epochs) as bar,
        open_dataset(cfg, dataset_dir, transfer=True) as splits,
    ):
        meta = splits.meta
        _check_transfer(cfg, meta)
        objective = losses.build_objective(cfg.distill.losses)
        needs_teacher = objective.needs_teacher or cfg.student.init_from_teacher
        teacher = load_teacher(teacher_dir, meta) if needs_teacher else None
        student_augment = augment(cfg, meta, "distill")
        run.log_params(
            {
                "teacher_logit_cache": student_augment is None and not objective.needs_features,
                "baseline": cfg.distill.baseline,
            }
            | losses.as_params(cfg.distill.losses)
            | _transfer_params(meta)
        )

        result = _train_student(
            cfg,
            splits,
            teacher,
            objective,
            student_augment,
            student_dir,
            epoch_logger(run, bar),
            transfer_samples(splits),
        )
        params = model_params(cfg.student.model, meta)  # text data: + vocab_size, pad_id
        if main:
            quantization.save_model(
                result.model, model_spec(cfg.student.model, meta, "student", run.run_id, params), student_dir
            )
            carry_tokenizer(dataset_dir, meta, student_dir)
        run.log_params({"num_params": count_parameters(result.model)})
        summary = log_result(run, result, bar, history_path) | {"run_id": run.run_id}

        if baseline_dir is None:
            return summary
        if main:
            Path(baseline_dir).mkdir(parents=True, exist_ok=True)
        if cfg.distill.baseline:
            # Same seed, data, augmentation and loop, cross-entropy alone: what the teacher adds.
            # Mixup excepted: a mixed sample has no label to learn.
            ce_only = losses.build_objective([LossTermConfig(name="ce")])
            logger = epoch_logger(run, prefix="baseline.")
            base_augment = augment(cfg, meta, "distill", mixup=False)
            base = _train_student(cfg, splits, None, ce_only, base_augment, baseline_dir, logger)
            if main:
                spec = model_spec(cfg.student.model, meta, "baseline", run.run_id, params)
                quantization.save_model(base.model, spec, baseline_dir)
                carry_tokenizer(dataset_dir, meta, baseline_dir)
            run.log_metrics({"baseline.best_val_accuracy": base.best_val_accuracy})
            summary["baseline_best_val_accuracy"] = base.best_val_accuracy
        elif main:
            (Path(baseline_dir) / BASELINE_ABSENT).write_text("distill.baseline is false\n")
        return summary


def _check_transfer(cfg: PipelineConfig, meta: DatasetMeta) -> None:
    """The dataset holds the transfer set the config names (prepare_data read the same config).

    Raises:
        ConfigError: ``distill.transfer_source`` and the dataset's transfer set disagree.
    """
    wanted = cfg.distill.transfer_source
    held = meta.transfer.source if meta.transfer is not None else None
    if wanted != held:
        raise ConfigError(
            f"distill.transfer_source is {wanted!r} but the prepared dataset's transfer set is {held!r}",
            "re-run prepare_data with this config (the dataset and the distill step must share one config)",
        )


def _transfer_params(meta: DatasetMeta) -> dict[str, Any]:
    """The transfer set's MLflow params: its source, size and fingerprint (none without one)."""
    if meta.transfer is None:
        return {}
    return {f"transfer_{k}": v for k, v in meta.transfer.model_dump().items()}


def _train_student(
    cfg: PipelineConfig,
    splits: Splits,
    teacher: torch.nn.Module | None,
    objective: losses.Objective,
    student_augment: Any,
    output_dir: str | Path,
    on_epoch: Any,
    transfer: Any = None,
) -> training.TrainResult:
    """One student training run: same seed, hence same initial weights, for KD and baseline;
    ``transfer`` (the KD student's only): unlabeled samples learnt from the teacher alone."""
    torch.manual_seed(cfg.distill.train.seed)
    meta = splits.meta
    params = model_params(cfg.student.model, meta)  # text data: + vocab_size, pad_id
    student = build_model(cfg.student.model.arch, params, tuple(meta.input_shape), meta.num_classes)
    if cfg.student.init_from_teacher and teacher is not None:
        # DistilBERT init for the KD student only: the baseline (teacher None) starts from the
        # same random weights, so it measures all the teacher adds, initialization included.
        init_from_teacher(student, teacher)
    ckpt = checkpoint_dir(output_dir)
    try:
        result = training.distill(
            student,
            teacher,
            objective,
            *tensors(splits, "train"),
            *tensors(splits, "val"),
            cfg.distill.train,
            augment=student_augment,
            on_epoch=on_epoch,
            checkpoint_dir=ckpt,
            pad_id=pad_id(meta),
            x_transfer=transfer,
            num_workers=cfg.data.num_workers,
        )
    except ValueError as err:
        # A feature loss on layers that do not fit (an MLP under `at`, mismatched maps).
        raise ConfigError(f"distill.losses ({losses.describe(cfg.distill.losses)}): {err}") from None
    if ranks.is_main():
        shutil.rmtree(ckpt, ignore_errors=True)
    return result
