"""The torch side the model steps share: a split as tensors, the teacher as this data needs
it, a model's accuracy, and a training step's augmentation."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from kd_lib.artifacts.dataset_dir import DatasetMeta, Splits
from kd_lib.compress import quantization
from kd_lib.config import ConfigError, PipelineConfig
from kd_lib.data.augment import augment_for
from kd_lib.evaluate import metrics as evaluation
from kd_lib.models.builders import for_data


def tensors(splits: Splits, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``name`` split (``train``, ``val``, ``test``) as ``([N, *input_shape] float32, [N] int64)``."""
    return torch.from_numpy(splits.x[name]), torch.from_numpy(splits.y[name])


def load_teacher(teacher_dir: str | Path, meta: DatasetMeta) -> torch.nn.Module:
    """The saved teacher, fed inputs renormalized to its own statistics (an imported one's may differ)."""
    model, spec = quantization.load_model(teacher_dir)
    return for_data(model, spec.get("normalization"), meta.normalization)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` [N, *input_shape] that ``model`` classifies as ``y`` [N]."""
    return evaluation.accuracy(evaluation.predict(model, x), y)


def augment(cfg: PipelineConfig, meta: DatasetMeta, step: Literal["teacher", "distill"]) -> Any:
    """The step's training augmentation, or None.

    Raises:
        ConfigError: the augmentation does not fit the data (a crop of flat vectors).
    """
    try:
        return augment_for(cfg, step, tuple(meta.input_shape))
    except ValueError as err:
        raise ConfigError(str(err)) from None
