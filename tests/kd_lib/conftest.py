"""Tiny shared fixtures for the kd_lib tests: a separable toy problem and a fast train config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from kd_lib.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_blobs(n_per_class: int, num_classes: int = 3, features: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian blobs around well separated centres: x [N, features] float32, y [N] int64."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes, features) * 4.0
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), features, generator=gen)
    order = torch.randperm(len(y), generator=gen)
    return x[order], y[order]


@pytest.fixture(scope="session")
def blobs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train [240, 8], y_train [240], x_val [90, 8], y_val [90]) with 3 classes."""
    x_train, y_train = make_blobs(80, seed=0)
    x_val, y_val = make_blobs(30, seed=1)
    return x_train, y_train, x_val, y_val


@pytest.fixture
def fast_cfg() -> TrainConfig:
    return TrainConfig(epochs=12, batch_size=32, lr=0.01, patience=12, seed=0, scheduler="none", device="cpu")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
