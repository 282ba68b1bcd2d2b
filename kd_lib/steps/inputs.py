"""The torch side the model steps share: a split as tensors, the teacher as this data needs
it, a model's accuracy, and a training step's augmentation."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from kd_lib.adapters import storage
from kd_lib.artifacts.dataset_dir import DatasetMeta, Splits
from kd_lib.compress import quantization
from kd_lib.config import ConfigError, PipelineConfig
from kd_lib.data import lazy
from kd_lib.data.augment import augment_for
from kd_lib.evaluate import metrics as evaluation
from kd_lib.models.builders import for_data, text_params


@contextmanager
def open_dataset(cfg: PipelineConfig, dataset_dir: str | Path, transfer: bool = False) -> Iterator[Splits]:
    """The prepared dataset for the length of a step: arrays, or for a manifest (image folders
    and tables) splits read lazily from their sources (``kd_lib.data.lazy``), ``s3://`` ones
    downloaded once into a scratch directory removed when the step ends."""
    with tempfile.TemporaryDirectory(prefix="kdflow-samples-") as scratch:
        fetch = partial(storage.fetch, retry=cfg.tracking.retry)
        yield lazy.open_splits(dataset_dir, scratch, fetch, transfer=transfer)


def tensors(splits: Splits, name: str) -> tuple[Any, torch.Tensor]:
    """The ``name`` split (``train``, ``val``, ``test``) as ``([N, *input_shape] float32, [N] int64)``
    (text data: ``x`` int64 token ids ``[N, max_length]``). ``x`` is a tensor, or for data read
    lazily a ``kd_lib.data.lazy.LazySamples`` indexed the same way."""
    return _samples(splits.x[name]), torch.from_numpy(splits.y[name])


def transfer_samples(splits: Splits) -> Any:
    """The transfer set's samples like ``tensors``' ``x`` (a tensor or lazy samples), or None."""
    return _samples(splits.transfer)


def _samples(x: Any) -> Any:
    """Arrays as a tensor sharing their memory; lazy samples (or None) as they are."""
    return torch.from_numpy(x) if isinstance(x, np.ndarray) else x


def load_teacher(teacher_dir: str | Path, meta: DatasetMeta) -> torch.nn.Module:
    """The saved teacher, fed inputs renormalized to its own statistics (an imported one's may differ)."""
    model, spec = quantization.load_model(teacher_dir)
    return for_data(model, spec.get("normalization"), meta.normalization)


def pad_id(meta: DatasetMeta) -> int | None:
    """Text data's padding id (batches are trimmed to their longest row); None for other data."""
    return meta.text.pad_id if meta.text is not None else None


def model_params(model_cfg: Any, meta: DatasetMeta) -> dict[str, Any]:
    """The params a model is built with on this data: the configured ones, plus on text data
    ``vocab_size`` and ``pad_id`` from ``meta.text`` (those its builder accepts). The spec
    records them (``kd_lib.steps.common.model_spec``), so a saved model rebuilds from it."""
    params = dict(model_cfg.params)
    if meta.text is not None:
        params |= text_params(model_cfg.arch, meta.text.vocab_size, meta.text.pad_id)
    return params


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, pad: int | None = None) -> float:
    """Fraction of ``x`` [N, *input_shape] that ``model`` classifies as ``y`` [N] (``pad``: text
    data's padding id, ``pad_id(meta)``)."""
    return evaluation.accuracy(evaluation.predict(model, x, pad_id=pad), y)


def augment(cfg: PipelineConfig, meta: DatasetMeta, step: Literal["teacher", "distill"], mixup: bool = True) -> Any:
    """The step's training augmentation, or None (``mixup=False``: without mixup, for the baseline).

    Raises:
        ConfigError: the augmentation does not fit the data (a crop of flat vectors).
    """
    try:
        return augment_for(cfg, step, tuple(meta.input_shape), mixup)
    except ValueError as err:
        raise ConfigError(str(err)) from None
