"""Training on samples read lazily (an image folder's manifest): the same weights as on the
tensors of the same data, with or without DataLoader workers, with the teacher-logit cache in
memory or memory-mapped from disk, with a lazily read transfer set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from kd_lib.artifacts.dataset_dir import save_splits
from kd_lib.config import AugmentConfig, DataConfig, LossTermConfig, TrainConfig
from kd_lib.data import dataset as data
from kd_lib.data import lazy
from kd_lib.data.augment import make_augment
from kd_lib.train.loop import distill, train_supervised
from kd_lib.train.losses import build_objective

KD = [LossTermConfig(name="kd", weight=0.9, params={"temperature": 4.0}), LossTermConfig(name="ce", weight=0.1)]


@pytest.fixture(scope="module")
def folder_and_arrays(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """An image folder of 180 8x8 images in 3 classes, opened lazily, and the same data as tensors."""
    tmp = tmp_path_factory.mktemp("lazy_training")
    rng = np.random.default_rng(0)
    y = np.arange(180) % 3
    x = rng.integers(0, 120, size=(180, 1, 8, 8)).astype(np.float32)
    x[:, 0, y + 2, 2:6] += 120  # a bar whose row tells the class
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        (tmp / "imgs" / f"c{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].astype(np.uint8), mode="L").save(tmp / "imgs" / f"c{label}" / f"{i:03d}.png")
    for i in range(30):
        (tmp / "more").mkdir(exist_ok=True)
        Image.fromarray(x[i, 0].astype(np.uint8), mode="L").save(tmp / "more" / f"{i:03d}.png")
    np.savez(tmp / "d.npz", x=x, y=y)
    cfg = DataConfig(source=str(tmp / "imgs"))
    directory = save_splits(data.prepare(cfg, transfer_source=str(tmp / "more")), tmp / "dataset")
    opened = lazy.open_splits(directory, tmp / "scratch", transfer=True)
    arrays = data.prepare(DataConfig(source=str(tmp / "d.npz")))
    return opened, arrays


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _same(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _splits(opened, lazy_read: bool) -> tuple[Any, torch.Tensor, Any, torch.Tensor]:  # noqa: ANN001
    if lazy_read:
        return (
            opened.x["train"],
            torch.from_numpy(opened.y["train"]),
            opened.x["val"],
            torch.from_numpy(opened.y["val"]),
        )
    x, y, xv, yv = (np.asarray(v) for v in (opened.x["train"], opened.y["train"], opened.x["val"], opened.y["val"]))
    return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(xv), torch.from_numpy(yv)


def test_workers_and_lazy_reads_train_the_same_weights(folder_and_arrays, tmp_path: Path) -> None:  # noqa: ANN001
    opened, _ = folder_and_arrays
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01, seed=3)
    runs = {}
    for name, lazy_read, workers in (("tensors", False, 0), ("lazy", True, 0), ("workers", True, 2)):
        runs[name] = train_supervised(_model(0), *_splits(opened, lazy_read), cfg, num_workers=workers)
    _same(runs["tensors"].model, runs["lazy"].model)
    _same(runs["tensors"].model, runs["workers"].model)
    assert runs["workers"].history == [
        {**h, "seconds": runs["workers"].history[i]["seconds"]} for i, h in enumerate(runs["tensors"].history)
    ]


def test_mapped_logit_cache_and_augmentation_on_lazy_samples(folder_and_arrays, tmp_path: Path) -> None:  # noqa: ANN001
    opened, _ = folder_and_arrays
    teacher = train_supervised(_model(1), *_splits(opened, False), TrainConfig(epochs=3, batch_size=32, lr=0.01)).model
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01, seed=5)
    in_memory = distill(_model(2), teacher, build_objective(KD), *_splits(opened, True), cfg, num_workers=2)
    mapped = distill(
        _model(2),
        teacher,
        build_objective(KD),
        *_splits(opened, True),
        cfg,
        checkpoint_dir=tmp_path / "ckpt",
        logit_cache_budget_bytes=64,  # smaller than 126 samples x 3 logits: the cache goes to disk
    )
    _same(in_memory.model, mapped.model)
    cached = np.load(tmp_path / "ckpt" / "teacher_logits.npy")
    assert cached.shape == (len(opened.x["train"]), 3)
    with torch.no_grad():
        expected = teacher.eval()(opened.x["train"][:]).numpy()
    np.testing.assert_allclose(cached, expected, rtol=1e-5, atol=1e-6)
    # Augmentation runs the teacher live on each batch read by the workers; same weights as in process.
    crop = make_augment(AugmentConfig(random_crop_padding=1), (1, 8, 8))
    live = [
        distill(_model(2), teacher, build_objective(KD), *_splits(opened, True), cfg, augment=crop, num_workers=n)
        for n in (0, 2)
    ]
    _same(live[0].model, live[1].model)


def test_transfer_set_read_lazily_trains_like_its_tensors(folder_and_arrays) -> None:  # noqa: ANN001
    opened, _ = folder_and_arrays
    teacher = train_supervised(_model(1), *_splits(opened, False), TrainConfig(epochs=2, batch_size=32, lr=0.01)).model
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01, seed=7)
    as_tensors = torch.from_numpy(np.asarray(opened.transfer))
    eager = distill(_model(4), teacher, build_objective(KD), *_splits(opened, False), cfg, x_transfer=as_tensors)
    read_lazily = distill(
        _model(4), teacher, build_objective(KD), *_splits(opened, True), cfg, x_transfer=opened.transfer, num_workers=2
    )
    _same(eager.model, read_lazily.model)
    with pytest.raises(ValueError, match="both lazily or not"):
        distill(_model(4), teacher, build_objective(KD), *_splits(opened, True), cfg, x_transfer=as_tensors)
