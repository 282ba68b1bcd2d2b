"""The input normalization: train-split statistics, and the transform every model input gets.

``prepare_data`` computes the statistics on the train split (``normalization_stats``) and
normalizes every split with them; they travel in the dataset's metadata and in each model's
``spec.json``, so the served model applies the very same transform to raw inputs. numpy only,
so serving can import it without the data loaders and their dependencies.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def normalization_stats(x_train: np.ndarray) -> dict[str, float | list[float]]:
    """Mean and std of the training samples ``x_train`` ``[N, ...]``.

    One scalar pair for features and grayscale images; one value per channel for images with
    several channels (``[N, C, H, W]``, C > 1), where channels have different scales (RGB).
    A zero std (a constant input) becomes 1.0 so normalizing never divides by zero.
    """
    if x_train.ndim == 4 and x_train.shape[1] > 1:
        mean = x_train.mean(axis=(0, 2, 3), dtype=np.float64)
        std = x_train.std(axis=(0, 2, 3), dtype=np.float64)
        return {"mean": [float(m) for m in mean], "std": [float(s) or 1.0 for s in std]}
    return {"mean": float(x_train.mean()), "std": float(x_train.std()) or 1.0}


def _stat(value: float | list[float], ndim: int) -> np.ndarray:
    # A per-channel list becomes [C, 1, 1] so it broadcasts over [N, C, H, W].
    arr = np.asarray(value, dtype=np.float32)
    return arr.reshape(-1, *([1] * (ndim - 2))) if arr.ndim == 1 else arr


def normalize(x: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """``(x - mean) / std`` with ``norm`` from ``normalization_stats`` (scalar or per channel);
    an empty ``norm`` is the identity. ``x``: ``[N, *input_shape]``; returns float32."""
    x = np.asarray(x, dtype=np.float32)
    mean, std = _stat(norm.get("mean", 0.0), x.ndim), _stat(norm.get("std", 1.0), x.ndim)
    return ((x - mean) / std).astype(np.float32)


def denormalize(x: np.ndarray, norm: dict[str, Any]) -> np.ndarray:
    """Inverse of ``normalize``: back to the values of the source data."""
    x = np.asarray(x, dtype=np.float32)
    mean, std = _stat(norm.get("mean", 0.0), x.ndim), _stat(norm.get("std", 1.0), x.ndim)
    return (x * std + mean).astype(np.float32)
