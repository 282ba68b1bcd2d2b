"""The ``train_teacher`` step: cross-entropy training of the teacher, the best epoch saved."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kd_lib.compress import quantization
from kd_lib.config import PipelineConfig
from kd_lib.models.builders import build_model, count_parameters
from kd_lib.steps.common import carry_tokenizer, model_spec
from kd_lib.steps.import_teacher import huggingface_teacher
from kd_lib.steps.inputs import augment, model_params, open_dataset, pad_id, tensors
from kd_lib.steps.training_run import checkpoint_dir, epoch_logger, launch_ranks, log_result, progress, recorder
from kd_lib.train import loop as training
from kd_lib.train import ranks


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
    many processes (torchrun, DDP): every rank runs this function, rank 0 alone records
    (``kd_lib.steps.training_run``).

    Returns:
        ``best_epoch``, ``best_val_accuracy``, ``epochs_run``, ``stopped_early`` and the step's ``run_id``.
    """
    train_cfg = cfg.teacher.train
    if ranks.should_launch(train_cfg.distributed):
        return launch_ranks(
            cfg,
            "train_teacher",
            pipeline_run_id,
            dataset_dir=dataset_dir,
            teacher_dir=teacher_dir,
            history_path=history_path,
        )
    with (
        recorder(cfg, pipeline_run_id, "train_teacher") as run,
        progress("train_teacher", train_cfg.epochs) as bar,
        open_dataset(cfg, dataset_dir) as splits,
    ):
        meta = splits.meta
        torch.manual_seed(train_cfg.seed)  # the initial weights: the same on every rank
        if cfg.teacher.source == "huggingface":  # teacher.fine_tune: the imported model is the starting point
            with tempfile.TemporaryDirectory() as tmp:
                model, spec = huggingface_teacher(cfg, dataset_dir, meta, tmp, run.run_id)
        else:
            params = model_params(cfg.teacher.model, meta)  # text data: + vocab_size, pad_id
            model = build_model(cfg.teacher.model.arch, params, tuple(meta.input_shape), meta.num_classes)
            spec = model_spec(cfg.teacher.model, meta, "teacher", run.run_id, params)
        run.log_params({"num_params": count_parameters(model)})

        ckpt = checkpoint_dir(teacher_dir)
        result = training.train_supervised(
            model,
            *tensors(splits, "train"),
            *tensors(splits, "val"),
            train_cfg,
            on_epoch=epoch_logger(run, bar),
            checkpoint_dir=ckpt,
            augment=augment(cfg, meta, "teacher"),
            pad_id=pad_id(meta),
            num_workers=cfg.data.num_workers,
        )

        if ranks.is_main():
            quantization.save_model(result.model, spec, teacher_dir)
            carry_tokenizer(dataset_dir, meta, teacher_dir)
            shutil.rmtree(ckpt, ignore_errors=True)
        return log_result(run, result, bar, history_path) | {"run_id": run.run_id}
