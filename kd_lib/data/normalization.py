"""The input normalization: train-split statistics, and the transform every model input gets.

``prepare_data`` computes the statistics on the train split (``normalization_stats``) and
normalizes every split with them; they travel in the dataset's metadata and in each model's
``spec.json``, so the served model applies the very same transform to raw inputs. numpy only,
so serving can import it without the data loaders and their dependencies.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _per_channel(x: np.ndarray) -> bool:
    return x.ndim == 4 and x.shape[1] > 1


def sample_sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample sums of ``x`` ``[N, ...]``'s values and of their squares, float64 ``[N, K]``:
    K is the number of channels of a colour image batch ``[N, C, H, W]`` (C > 1), else 1.

    Summed over any subset of samples they give that subset's statistics (``stats_from_sums``),
    so a source read chunk by chunk needs one pass for the statistics of a split chosen later.
    """
    k = x.shape[1] if _per_channel(x) else 1
    flat = np.asarray(x).reshape(len(x), k, -1).astype(np.float64)
    return flat.sum(axis=2), np.square(flat).sum(axis=2)


def stats_from_sums(sums: np.ndarray, sumsq: np.ndarray, values_per_sample: int) -> dict[str, float | list[float]]:
    """Mean and std (population) from ``sample_sums`` of some samples; ``values_per_sample`` is
    the number of values each sample's row sums over (per channel: H * W). A zero std becomes 1.0."""
    count = len(sums) * values_per_sample
    mean = sums.sum(axis=0) / count
    std = np.sqrt(np.maximum(sumsq.sum(axis=0) / count - mean**2, 0.0))
    if sums.shape[1] > 1:
        return {"mean": [float(m) for m in mean], "std": [float(s) or 1.0 for s in std]}
    return {"mean": float(mean[0]), "std": float(std[0]) or 1.0}


def normalization_stats(x_train: np.ndarray) -> dict[str, float | list[float]]:
    """Mean and std of the training samples ``x_train`` ``[N, ...]``.

    One scalar pair for features and grayscale images; one value per channel for images with
    several channels (``[N, C, H, W]``, C > 1), where channels have different scales (RGB).
    A zero std (a constant input) becomes 1.0 so normalizing never divides by zero. Computed
    from ``sample_sums`` in chunks: the same numbers a source read chunk by chunk gets.
    """
    parts = [sample_sums(x_train[i : i + 4096]) for i in range(0, len(x_train), 4096)]
    sums, sumsq = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return stats_from_sums(sums, sumsq, values_per_sample(x_train.shape[1:]))


def values_per_sample(sample_shape: tuple[int, ...] | list[int]) -> int:
    """How many values one row of ``sample_sums`` adds up for a sample of this shape."""
    size = int(np.prod(sample_shape))
    return size // sample_shape[0] if len(sample_shape) == 3 and sample_shape[0] > 1 else size


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
