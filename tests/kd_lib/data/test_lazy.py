"""Image folders and tables prepared as a manifest and read lazily (kd_lib.data.lazy, .stream):
the same samples as an .npz of the same data, a dataset artifact that holds no samples, reads
that name what went wrong, and an s3:// source downloaded once per step."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from kd_lib.adapters import storage
from kd_lib.artifacts.dataset_dir import MANIFEST_FILE, SPLIT_NAMES, SPLITS_FILE, load_splits, save_splits
from kd_lib.artifacts.errors import ArtifactError
from kd_lib.config import DataConfig, RetryConfig
from kd_lib.data import dataset as data
from kd_lib.data import lazy
from kd_lib.data.normalization import normalization_stats, sample_sums, stats_from_sums, values_per_sample
from tests.kd_lib.conftest import S3


def _images(n: int = 60, channels: int = 1, hw: tuple[int, int] = (6, 7), seed: int = 0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3, dtype=np.int64), n // 3)  # by class: a folder lists its files in this order
    x = rng.integers(0, 256, size=(n, channels, *hw)).astype(np.float32)
    return x, y


def _folder(root: Path, x: np.ndarray, y: np.ndarray) -> Path:
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = root / f"class{label}"
        d.mkdir(parents=True, exist_ok=True)
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        Image.fromarray(arr.astype(np.uint8), mode="L" if img.shape[0] == 1 else "RGB").save(d / f"{i:04d}.png")
    return root


def _parquet(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    pd.DataFrame({"label": y, "pixels": [row.tolist() for row in x.reshape(len(x), -1)]}).to_parquet(path)
    return path


def _opened(cfg: DataConfig, tmp: Path, fetch=None, transfer: str | None = None):  # noqa: ANN001, ANN202
    directory = save_splits(data.prepare(cfg, fetch=fetch, transfer_source=transfer), tmp / "dataset")
    return directory, lazy.open_splits(directory, tmp / "scratch", fetch, transfer=transfer is not None)


@pytest.mark.parametrize("kind", ["folder", "parquet", "csv"])
def test_manifest_reads_the_samples_of_the_npz(tmp_path: Path, kind: str) -> None:
    x, y = _images(channels=3 if kind == "folder" else 1)
    if kind == "folder":
        cfg = DataConfig(source=str(_folder(tmp_path / "imgs", x, y)), image_mode="RGB")
    elif kind == "parquet":
        cfg = DataConfig(
            source=str(_parquet(tmp_path / "d.parquet", x, y)), pixel_column="pixels", image_shape=[1, 6, 7]
        )
    else:
        frame = pd.DataFrame(x.reshape(len(x), -1), columns=[f"p{i}" for i in range(42)]).assign(label=y)
        frame.to_csv(tmp_path / "d.csv", index=False)
        cfg = DataConfig(source=str(tmp_path / "d.csv"), image_shape=[1, 6, 7])
    np.savez(tmp_path / "d.npz", x=x, y=y)
    reference = data.prepare(DataConfig(source=str(tmp_path / "d.npz")))
    directory, opened = _opened(cfg, tmp_path)
    # The artifact is ids and labels: no samples, no splits.npz.
    assert sorted(p.name for p in directory.iterdir()) == ["manifest.npz", "meta.json"]
    assert opened.meta.manifest is not None and opened.meta.manifest.kind == ("folder" if kind == "folder" else "table")
    # Same samples, same fingerprint, same statistics as the in-memory path.
    assert opened.meta.fingerprint == reference.meta.fingerprint
    assert opened.meta.normalization == reference.meta.normalization
    for name in SPLIT_NAMES:
        samples = opened.x[name]
        assert isinstance(samples, lazy.LazySamples) and samples.shape == reference.x[name].shape
        np.testing.assert_array_equal(np.asarray(samples), reference.x[name])
        np.testing.assert_array_equal(opened.y[name], reference.y[name])
    # Indexed like a tensor: positions as a tensor, a list, a slice, an int, negative ones.
    train, ref = opened.x["train"], torch.from_numpy(reference.x["train"])
    idx = torch.tensor([5, 0, 5, len(train) - 1])
    assert torch.equal(train[idx], ref[idx]) and train[idx].dtype == torch.float32
    assert torch.equal(train[2:9:3], ref[2:9:3]) and torch.equal(train[-1], ref[-1])
    assert train[[]].shape == (0, *ref.shape[1:])
    with pytest.raises(IndexError):
        train[len(train)]
    # A torch Dataset of single samples: any DataLoader reads it.
    assert torch.equal(torch.cat(list(torch.utils.data.DataLoader(train, batch_size=16))), ref)


def test_manifest_is_a_small_fraction_of_the_samples(tmp_path: Path) -> None:
    x, y = _images(n=600, hw=(28, 28))
    directory, opened = _opened(DataConfig(source=str(_folder(tmp_path / "imgs", x, y))), tmp_path)
    decoded = x.nbytes  # what splits.npz held before: every sample as float32
    written = sum(p.stat().st_size for p in directory.iterdir())
    assert (directory / MANIFEST_FILE).is_file() and not (directory / SPLITS_FILE).exists()
    assert written < 0.01 * decoded, (written, decoded)
    assert load_splits(directory).x == {}  # nothing decoded until a step opens it
    assert sum(len(opened.x[n]) for n in SPLIT_NAMES) == 600


def test_a_sample_changed_after_prepare_is_named(tmp_path: Path) -> None:
    x, y = _images()
    root = _folder(tmp_path / "imgs", x, y)
    _, opened = _opened(DataConfig(source=str(root)), tmp_path)
    test = opened.x["test"]
    name = str(load_splits(tmp_path / "dataset").manifest.ids["test"][0])  # type: ignore[union-attr]
    (root / name).unlink()
    with pytest.raises(data.DataError, match=f"{root}/{name}: no such image .*re-run prepare_data"):
        test[0]
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(root / name)
    with pytest.raises(data.DataError, match=f"{root}/{name}: image is 3x3 \\(HxW\\) but .*as prepared is 6x7"):
        test[0]
    (root / name).write_bytes(b"not a png")
    with pytest.raises(data.DataError, match=f"{root}/{name}: not a readable image"):
        test[:2]


def test_a_table_shorter_than_its_manifest_is_named(tmp_path: Path) -> None:
    x, y = _images()
    path = _parquet(tmp_path / "d.parquet", x, y)
    directory = save_splits(
        data.prepare(DataConfig(source=str(path), pixel_column="pixels", image_shape=[1, 6, 7])), tmp_path / "ds"
    )
    _parquet(path, x[:10], y[:10])
    with pytest.raises(data.DataError, match=f"{path}: the manifest names row .* but the table has 10 rows"):
        lazy.open_splits(directory, tmp_path / "scratch")


def test_transfer_set_of_a_folder_is_read_lazily_too(tmp_path: Path) -> None:
    x, y = _images()
    extra = _images(n=9, seed=1)[0]
    for i, img in enumerate(extra):
        (tmp_path / "unlabeled").mkdir(exist_ok=True)
        Image.fromarray(img[0].astype(np.uint8), mode="L").save(tmp_path / "unlabeled" / f"{i}.png")
    cfg = DataConfig(source=str(_folder(tmp_path / "imgs", x, y)))
    _, opened = _opened(cfg, tmp_path, transfer=str(tmp_path / "unlabeled"))
    assert isinstance(opened.transfer, lazy.LazySamples) and len(opened.transfer) == 9
    norm = opened.meta.normalization
    expected = (extra[np.argsort([str(i) for i in range(9)])] - norm["mean"]) / norm["std"]  # files in name order
    np.testing.assert_allclose(np.asarray(opened.transfer), expected, rtol=1e-5)
    both = lazy.Concat(opened.x["train"], opened.transfer)
    assert len(both) == len(opened.x["train"]) + 9
    picked = both[torch.tensor([len(both) - 1, 0])]
    assert torch.allclose(picked[0], torch.from_numpy(expected[-1].astype(np.float32)))
    assert torch.equal(picked[1], opened.x["train"][0])


def test_s3_sources_are_downloaded_once_per_step(s3: S3, tmp_path: Path) -> None:
    x, y = _images()
    storage.put(_folder(tmp_path / "imgs", x, y), s3.uri("lazy/imgs"))
    storage.put(_parquet(tmp_path / "d.parquet", x, y), s3.uri("lazy/d.parquet"))
    calls: list[str] = []

    def fetch(uri: str, scratch: Path) -> Path:
        calls.append(uri)
        return storage.fetch(uri, scratch, retry=RetryConfig())

    for source, extra in ((s3.uri("lazy/imgs"), {}), (s3.uri("lazy/d.parquet"), {"pixel_column": "pixels"})):
        shape = {"image_shape": [1, 6, 7]} if extra else {}
        cfg = DataConfig(source=source, **extra, **shape)
        local = data.prepare(
            DataConfig(source=str(tmp_path / ("imgs" if not extra else "d.parquet")), **extra, **shape)
        )
        work = tmp_path / f"work_{source.rsplit('/', 1)[-1]}"
        directory = save_splits(data.prepare(cfg, fetch=partial(storage.fetch, retry=RetryConfig())), work / "ds")
        calls.clear()
        opened = lazy.open_splits(directory, work / "scratch", fetch)
        for name in SPLIT_NAMES:
            np.asarray(opened.x[name])
        assert calls == [source]  # train, val and test share one download
        assert opened.meta.fingerprint == local.meta.fingerprint


def test_statistics_from_per_sample_sums_are_those_of_the_subset() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(50, 20, size=(40, 3, 4, 4)).astype(np.float32)
    x[:, 1] = x[:, 1] * 0.1 + 7
    sums, sumsq = sample_sums(x)
    subset = np.array([1, 4, 9, 30, 31])
    got = stats_from_sums(sums[subset], sumsq[subset], values_per_sample(x.shape[1:]))
    np.testing.assert_allclose(got["mean"], x[subset].mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(got["std"], x[subset].std(axis=(0, 2, 3)), rtol=1e-5)
    flat = normalization_stats(x[:, :1].reshape(40, -1))
    assert flat["mean"] == pytest.approx(float(x[:, 0].mean()), rel=1e-6)
    assert flat["std"] == pytest.approx(float(x[:, 0].std()), rel=1e-5)
    assert normalization_stats(np.ones((5, 3), np.float32))["std"] == 1.0  # constant input: no division by zero


def test_a_broken_manifest_is_named_with_the_fix(tmp_path: Path) -> None:
    x, y = _images()
    directory = save_splits(data.prepare(DataConfig(source=str(_folder(tmp_path / "imgs", x, y)))), tmp_path / "ds")
    meta = json.loads((directory / "meta.json").read_text())
    meta["sizes"]["train"] += 1
    (directory / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"manifest.npz: split 'train' has \d+ ids .* meta.json says") as err:
        load_splits(directory)
    assert "re-run the prepare_data step" in err.value.fix
    (directory / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match="manifest.npz"):
        load_splits(directory)
