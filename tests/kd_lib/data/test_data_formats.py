"""Every data format from small files written here, checked against the npz equivalent; every
user mistake a clear DataError naming the file, column or image. s3:// sources go through the
loopback S3 server (tests/kd_lib/conftest.py)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from kd_lib.adapters import storage
from kd_lib.artifacts.dataset_dir import SPLIT_NAMES, Splits, load_splits
from kd_lib.config import DataConfig, RetryConfig
from kd_lib.data import dataset as data
from kd_lib.data.normalization import denormalize, normalize
from kd_lib.errors import KdflowError
from tests.helpers import as_arrays
from tests.kd_lib.conftest import S3

CLASSES = ["cat", "dog", "fish"]


def _images(n_per_class: int = 8, channels: int = 1, hw: tuple[int, int] = (4, 5), seed: int = 0):
    """Pixel-valued images ``[N, C, H, W]`` (ints 0..255 as float32) ordered by class, and labels."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(CLASSES)), n_per_class).astype(np.int64)
    x = rng.integers(0, 256, size=(y.size, channels, *hw)).astype(np.float32)
    x[:, :, 0, 0] = y[:, None] * 100  # something per class to learn, not needed here but realistic
    return x, y


# How the prepare_data step downloads an s3:// source: the storage adapter with the retry config.
FETCH = partial(storage.fetch, retry=RetryConfig())


def _prepare(fetch: data.Fetch | None = None, **fields) -> Splits:
    """The splits as the steps read them, as arrays: image folders and tables are prepared as a
    manifest, saved, opened lazily (``kd_lib.data.lazy``) and read whole."""
    return as_arrays(data.prepare(DataConfig(**fields), fetch=fetch), fetch)


def _same(a: Splits, b: Splits) -> None:
    for name in SPLIT_NAMES:
        np.testing.assert_array_equal(a.x[name], b.x[name])
        np.testing.assert_array_equal(a.y[name], b.y[name])
    assert a.meta.fingerprint == b.meta.fingerprint
    assert a.meta.normalization == b.meta.normalization
    assert a.meta.input_shape == b.meta.input_shape


def _npz(path: Path, x: np.ndarray, y: np.ndarray) -> Path:
    np.savez(path, x=x, y=y)
    return path


def _table(x: np.ndarray, labels: np.ndarray | list) -> pd.DataFrame:
    flat = x.reshape(len(x), -1)
    df = pd.DataFrame(flat, columns=[f"p{i}" for i in range(flat.shape[1])])
    df.insert(0, "label", labels)
    return df


def _write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


def _pixel_table(x: np.ndarray, y: np.ndarray, path: Path) -> Path:
    flat = x.reshape(len(x), -1)
    if path.suffix == ".csv":
        pixels = [" ".join(str(int(v)) for v in row) for row in flat]
    else:
        pixels = [row.tolist() for row in flat]
    return _write(pd.DataFrame({"label": y, "pixels": pixels}), path)


def _folder(root: Path, x: np.ndarray, y: np.ndarray, suffix: str = ".png", names: list[str] = CLASSES) -> Path:
    """root/<class>/<i>.png, file names sorting in sample order."""
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        d = root / names[label]
        d.mkdir(parents=True, exist_ok=True)
        arr = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        Image.fromarray(arr.astype(np.uint8), mode="L" if img.shape[0] == 1 else "RGB").save(d / f"{i:04d}{suffix}")
    return root


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_feature_columns_give_the_npz_arrays(tmp_path: Path, suffix: str) -> None:
    x, y = _images()
    flat = x.reshape(len(x), -1)
    path = _write(_table(x, y), tmp_path / f"d{suffix}")
    _same(_prepare(source=str(path)), _prepare(source=str(_npz(tmp_path / "flat.npz", flat, y))))
    # image_shape turns the 20 pixel columns back into [1, 4, 5] images, as a CNN needs.
    images = _prepare(source=str(path), image_shape=[1, 4, 5])
    _same(images, _prepare(source=str(_npz(tmp_path / "img.npz", x, y))))
    assert images.meta.input_shape == [1, 4, 5]
    assert images.meta.class_names == []  # integer labels: names are derived later


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_pixel_column_gives_the_npz_arrays(tmp_path: Path, suffix: str) -> None:
    x, y = _images()
    path = _pixel_table(x, y, tmp_path / f"d{suffix}")
    got = _prepare(source=str(path), pixel_column="pixels", image_shape=[1, 4, 5])
    _same(got, _prepare(source=str(_npz(tmp_path / "img.npz", x, y))))


def test_label_names_and_chosen_feature_columns(tmp_path: Path) -> None:
    x, y = _images()
    df = _table(x, [CLASSES[i] for i in y])
    df["comment"] = "free text"  # not a feature: left out by naming the features
    df = df[["comment", "p3", "label", "p1"] + [c for c in df.columns if c.startswith("p") and c not in ("p1", "p3")]]
    path = _write(df, tmp_path / "named.csv")
    got = _prepare(source=str(path), feature_columns=["p1", "p3"])
    assert got.meta.class_names == CLASSES
    assert got.meta.input_shape == [2]
    ref = _prepare(source=str(_npz(tmp_path / "ref.npz", x.reshape(len(x), -1)[:, [1, 3]], y)))
    _same(got, ref)


def test_png_folder_gives_the_npz_arrays_and_class_names(tmp_path: Path) -> None:
    x, y = _images()
    got = _prepare(source=str(_folder(tmp_path / "imgs", x, y)))
    _same(got, _prepare(source=str(_npz(tmp_path / "img.npz", x, y))))
    assert got.meta.class_names == CLASSES
    assert got.meta.input_shape == [1, 4, 5]
    (tmp_path / "imgs" / "cat" / "notes.txt").write_text("not an image: ignored")
    _same(_prepare(source=str(tmp_path / "imgs")), got)


def test_jpeg_folder_reads_close_to_the_pixels(tmp_path: Path) -> None:
    x, y = _images(hw=(8, 8))
    x[:] = np.repeat(y * 100.0, x[0].size).reshape(x.shape)  # flat images: JPEG keeps them nearly exact
    loaded = data.read_source(str(_folder(tmp_path / "jpg", x, y, suffix=".jpg")), DataConfig(source="jpg/"), tmp_path)
    np.testing.assert_array_equal(loaded.y, y)
    np.testing.assert_allclose(loaded.x, x, atol=3)


def test_rgb_folder_is_normalized_per_channel_on_train_only(tmp_path: Path) -> None:
    x, y = _images(channels=3)
    x[:, 1] = x[:, 1] * 0.2 + 150  # channels with different scales
    x = np.round(x)
    got = _prepare(source=str(_folder(tmp_path / "rgb", x, y)), image_mode="RGB")
    assert got.meta.input_shape == [3, 4, 5]
    norm = got.meta.normalization
    mean, std = norm["mean"], norm["std"]
    assert isinstance(mean, list) and isinstance(std, list)  # per channel
    assert len(mean) == len(std) == 3
    train = got.x["train"]
    np.testing.assert_allclose(train.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=(0, 2, 3)), 1, atol=1e-3)
    # What the served model does to raw pixels is exactly what prepare did to the test split.
    raw_test = denormalize(got.x["test"], norm)
    np.testing.assert_allclose(normalize(raw_test, norm), got.x["test"], atol=1e-5)
    # Grayscale reading of the same folder: one channel, scalar statistics.
    gray = _prepare(source=str(tmp_path / "rgb"))
    assert gray.meta.input_shape == [1, 4, 5] and isinstance(gray.meta.normalization["mean"], float)


def test_served_model_applies_per_channel_normalization(tmp_path: Path) -> None:
    from mlflow.pyfunc import PythonModelContext

    from kd_lib.adapters.serving import KdflowPyfunc

    x, y = _images(channels=3)
    got = _prepare(source=str(_folder(tmp_path / "rgb", x, y)), image_mode="RGB")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(60, 3))
    served = KdflowPyfunc()
    served.model, served.spec = model.eval(), {"normalization": got.meta.normalization}
    raw = denormalize(got.x["test"], got.meta.normalization)
    with torch.no_grad():
        expected = model(torch.from_numpy(got.x["test"])).argmax(dim=1).numpy()
    context = PythonModelContext(artifacts={}, model_config={})  # predict reads nothing from it
    np.testing.assert_array_equal(served.predict(context, raw)["class_id"].to_numpy(), expected)


def test_image_size_resizes_images_of_different_sizes(tmp_path: Path) -> None:
    x, y = _images()
    root = _folder(tmp_path / "imgs", x, y)
    Image.fromarray(np.zeros((9, 7), np.uint8), mode="L").save(root / "dog" / "9999.png")
    odd = str(root / "dog" / "9999.png")
    with pytest.raises(data.DataError, match=f"{odd}: image is 9x7 \\(HxW\\) but .*cat/0000.png is 4x5.*image_size"):
        _prepare(source=str(root))
    got = _prepare(source=str(root), image_size=[6, 6])
    assert got.meta.input_shape == [1, 6, 6] and sum(got.meta.sizes.values()) == len(y) + 1


def test_separate_test_source(tmp_path: Path) -> None:
    x, y = _images(n_per_class=10)
    xt, yt = _images(n_per_class=3, seed=1)
    train_csv = _write(_table(x, [CLASSES[i] for i in y]), tmp_path / "train.csv")
    test_csv = _write(_table(xt[:4], [CLASSES[i] for i in yt[:4]]), tmp_path / "test.csv")  # only cat and dog
    got = _prepare(source=str(train_csv), test_source=str(test_csv), val_fraction=0.2)
    assert got.meta.sizes == {"train": 24, "val": 6, "test": 4}
    assert got.meta.test_source == str(test_csv)
    assert got.meta.class_counts["test"] == [3, 1, 0]
    np.testing.assert_array_equal(got.y["test"], yt[:4])
    # The test set is normalized with the train split's statistics, never its own.
    raw_train = x.reshape(len(x), -1)
    idx, _, _ = data.stratified_split(y, 0.2, 0.0, 0)
    assert got.meta.normalization["mean"] == pytest.approx(float(raw_train[idx].mean()), rel=1e-6)
    np.testing.assert_allclose(denormalize(got.x["test"], got.meta.normalization), xt[:4].reshape(4, -1), atol=1e-3)
    # Another test file gives another fingerprint, even with the same train file.
    other = _write(_table(xt[4:8], [CLASSES[i] for i in yt[4:8]]), tmp_path / "test2.csv")
    assert _prepare(source=str(train_csv), test_source=str(other)).meta.fingerprint != got.meta.fingerprint


def test_test_class_missing_from_train_names_both_files(tmp_path: Path) -> None:
    x, y = _images()
    keep = y < 2
    train = _write(_table(x[keep], [CLASSES[i] for i in y[keep]]), tmp_path / "train.csv")
    test = _write(_table(x, [CLASSES[i] for i in y]), tmp_path / "test.csv")
    with pytest.raises(
        data.DataError, match=f"{test}: class\\(es\\) \\['fish'\\] are in the test set but not in the train set {train}"
    ):
        _prepare(source=str(train), test_source=str(test))
    # Integer labels and image folders say the same.
    train_ids = _write(_table(x[keep], y[keep]), tmp_path / "train_ids.csv")
    test_ids = _write(_table(x, y), tmp_path / "test_ids.csv")
    with pytest.raises(
        data.DataError, match=f"{test_ids}: class\\(es\\) \\[2\\] are in the test set but not in the train set"
    ):
        _prepare(source=str(train_ids), test_source=str(test_ids))
    folder_train = _folder(tmp_path / "ftrain", x[keep], y[keep])
    folder_test = _folder(tmp_path / "ftest", x, y)
    with pytest.raises(data.DataError, match=f"{folder_test}: class\\(es\\) \\['fish'\\].*{folder_train}"):
        _prepare(source=str(folder_train), test_source=str(folder_test))


# ------------------------------------------------------------------ s3://


def test_s3_sources_give_the_local_arrays(s3: S3, tmp_path: Path) -> None:
    x, y = _images()
    csv = _write(_table(x, y), tmp_path / "d.csv")
    parquet = _pixel_table(x, y, tmp_path / "d.parquet")
    folder = _folder(tmp_path / "imgs", x, y)
    for path, key in ((csv, "tables/d.csv"), (parquet, "tables/d.parquet"), (folder, "sets/imgs")):
        storage.put(path, s3.uri(key))
    _same(_prepare(FETCH, source=s3.uri("tables/d.csv")), _prepare(source=str(csv)))
    _same(
        _prepare(FETCH, source=s3.uri("tables/d.parquet"), pixel_column="pixels", image_shape=[1, 4, 5]),
        _prepare(source=str(parquet), pixel_column="pixels", image_shape=[1, 4, 5]),
    )
    remote = _prepare(FETCH, source=s3.uri("sets/imgs"))
    _same(remote, _prepare(source=str(folder)))
    assert remote.meta.class_names == CLASSES and remote.meta.source == s3.uri("sets/imgs")
    # Train and test files of the same name under different prefixes do not collide.
    storage.put(csv, s3.uri("test/d.csv"))
    both = _prepare(FETCH, source=s3.uri("tables/d.csv"), test_source=s3.uri("test/d.csv"))
    assert both.meta.sizes["test"] == len(y)


def test_s3_errors_name_the_uri(s3: S3, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_bytes(b"label,a\n1,2,3,4\n\x00\xff")
    storage.put(bad, s3.uri("bad.csv"))
    with pytest.raises(data.DataError, match=f"{s3.uri('bad.csv')}: not a readable csv file"):
        _prepare(FETCH, source=s3.uri("bad.csv"))
    with pytest.raises(storage.StorageError, match=f"{s3.uri('absent.csv')}: no such key"):
        _prepare(FETCH, source=s3.uri("absent.csv"))
    x, y = _images()
    _folder(tmp_path / "imgs", x, y)
    (tmp_path / "imgs" / "dog" / "0010.png").write_bytes(b"\x89PNG broken")
    storage.put(tmp_path / "imgs", s3.uri("imgs"))
    with pytest.raises(data.DataError, match=f"{s3.uri('imgs/dog/0010.png')}: not a readable image"):
        _prepare(FETCH, source=s3.uri("imgs/"))


def test_s3_source_without_a_fetcher_is_a_clear_error(tmp_path: Path) -> None:
    # The data layer downloads nothing itself: a remote source needs the caller's fetch.
    with pytest.raises(KdflowError, match=r"s3://bucket/d\.csv: a remote source") as err:
        _prepare(source="s3://bucket/d.csv")
    assert isinstance(err.value, data.DataError) and "fetch=" in err.value.fix
    with pytest.raises(data.DataError, match="a remote source"):
        data.read_source("s3://bucket/imgs/", DataConfig(source="s3://bucket/imgs/"), tmp_path)


# ------------------------------------------------------------------ errors


def test_corrupt_tables_name_the_file(tmp_path: Path) -> None:
    csv = tmp_path / "broken.csv"
    csv.write_bytes(b"label,a\n1,2,3,4\n" + bytes(range(256)))
    with pytest.raises(data.DataError, match=f"{csv}: not a readable csv file"):
        _prepare(source=str(csv))
    parquet = tmp_path / "broken.parquet"
    parquet.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(data.DataError, match=f"{parquet}: not a readable parquet file"):
        _prepare(source=str(parquet))
    with pytest.raises(data.DataError, match="absent.parquet: no such file"):
        _prepare(source=str(tmp_path / "absent.parquet"))


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    x, y = _images()
    root = _folder(tmp_path / "imgs", x, y)
    bad = root / "fish" / "0020.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    with pytest.raises(data.DataError, match=f"{bad}: not a readable image"):
        _prepare(source=str(root))
    bad.write_bytes(b"plain text named .png")
    with pytest.raises(data.DataError, match=f"{bad}: not a readable image"):
        _prepare(source=str(root))


def test_missing_label_column_lists_the_columns(tmp_path: Path) -> None:
    x, y = _images()
    path = _write(_table(x, y).rename(columns={"label": "target"}), tmp_path / "d.csv")
    with pytest.raises(data.DataError, match=r"no label column 'label'; the file has columns \['target', 'p0'"):
        _prepare(source=str(path))
    assert _prepare(source=str(path), label_column="target").meta.num_classes == 3
    with pytest.raises(data.DataError, match=r"no feature column\(s\) \['p99'\]; .*Set data.feature_columns"):
        _prepare(source=str(path), label_column="target", feature_columns=["p1", "p99"])
    with pytest.raises(data.DataError, match=r"no pixel column 'pixels'; .*Set data.pixel_column"):
        _prepare(source=str(path), label_column="target", pixel_column="pixels", image_shape=[1, 4, 5])


def test_non_numeric_feature_column_is_named(tmp_path: Path) -> None:
    x, y = _images()
    df = _table(x, y)
    df["colour"] = "red"
    path = _write(df, tmp_path / "d.parquet")
    with pytest.raises(
        data.DataError, match=f"{path}: feature column 'colour' is not numeric.*'red'.*data.feature_columns"
    ):
        _prepare(source=str(path))
    df["colour"] = np.nan
    df.loc[3, "p2"] = np.nan
    with pytest.raises(data.DataError, match=r"feature column\(s\) \['p2', 'colour'\] have empty cells"):
        _prepare(source=str(_write(df, tmp_path / "holes.csv")))


def test_bad_labels_are_named(tmp_path: Path) -> None:
    x, y = _images()
    df = _table(x, y.astype(float))
    df.loc[2, "label"] = 0.5
    with pytest.raises(data.DataError, match="label column 'label' holds non-integer numbers"):
        _prepare(source=str(_write(df, tmp_path / "half.csv")))
    df.loc[2, "label"] = np.nan
    with pytest.raises(data.DataError, match="label column 'label' is empty in 1 row\\(s\\) \\(first: data row 2\\)"):
        _prepare(source=str(_write(df, tmp_path / "hole.csv")))


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_pixel_count_must_match_image_shape(tmp_path: Path, suffix: str) -> None:
    x, y = _images()
    path = _pixel_table(x, y, tmp_path / f"d{suffix}")
    with pytest.raises(
        data.DataError,
        match=r"pixel column 'pixels' has 20 values in data row 0 but data.image_shape \[1, 4, 4\] needs 16",
    ):
        _prepare(source=str(path), pixel_column="pixels", image_shape=[1, 4, 4])
    with pytest.raises(data.DataError, match=r"samples have 21 features but data.image_shape \[1, 4, 5\] needs 20"):
        _prepare(source=str(_write(_table(x, y).assign(extra=1.0), tmp_path / f"wide{suffix}")), image_shape=[1, 4, 5])


def test_pixel_cells_must_be_numbers(tmp_path: Path) -> None:
    x, y = _images()
    path = _pixel_table(x, y, tmp_path / "d.csv")
    df = pd.read_csv(path)
    df.loc[5, "pixels"] = "1 2 three"
    with pytest.raises(data.DataError, match="pixel column 'pixels', data row 5: not a list of numbers"):
        _prepare(source=str(_write(df, path)), pixel_column="pixels", image_shape=[1, 4, 5])


def test_folder_layout_errors(tmp_path: Path) -> None:
    x, y = _images()
    root = _folder(tmp_path / "imgs", x, y)
    (root / "zebra").mkdir()
    (root / "zebra" / "README.txt").write_text("no images yet")
    with pytest.raises(data.DataError, match=f"{root / 'zebra'}: class folder has no PNG/JPEG images"):
        _prepare(source=str(root))
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(flat / "a.png")
    with pytest.raises(
        data.DataError, match=f"{flat}: no class sub-folders; lay the images out as {flat}/<class name>/"
    ):
        _prepare(source=str(flat))
    with pytest.raises(data.DataError, match="no such directory"):
        _prepare(source=str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"source": "d.csv", "pixel_column": "px"}, "pixel_column 'px' needs image_shape"),
        (
            {"source": "d.csv", "pixel_column": "px", "image_shape": [1, 2, 2], "feature_columns": ["a"]},
            "either pixel_column",
        ),
        ({"source": "d.csv", "feature_columns": ["label", "a"]}, "also listed in feature_columns"),
        ({"source": "d.npz", "feature_columns": ["a"]}, "apply to .csv and .parquet"),
        ({"source": "imgs/", "image_shape": [1, 4, 4]}, "already holds images"),
        ({"source": "digits", "image_shape": [1, 8, 8]}, "already holds images"),
        ({"source": "d.csv", "image_size": [8, 8]}, "apply to an image folder"),
        ({"source": "d.npz", "image_mode": "RGB"}, "apply to an image folder"),
        ({"source": "d.csv", "test_source": "t.parquet"}, "must have the format of source"),
        ({"source": "digits", "test_source": "t.npz"}, "test_source needs a source"),
        ({"source": "d.csv", "image_shape": [1, 0, 4]}, "at least 1"),
        ({"source": "d.csv", "image_shape": [4, 4]}, "at least 3 items"),
        ({"source": "gs://bucket/d.csv"}, "only local paths and s3://"),
        ({"source": "s3://"}, "no bucket"),
    ],
)
def test_incompatible_options_are_config_errors(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        DataConfig(**fields)


def test_prepare_data_step_fetches_from_s3_and_logs_class_names(s3: S3, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from kd_lib.steps.evaluate import class_names
    from kd_lib.steps.prepare_data import prepare_data
    from tests.helpers import experiment_id, tiny_config

    x, y = _images(channels=3)
    storage.put(_folder(tmp_path / "imgs", x, y), s3.uri("imgs"))
    cfg = tiny_config(
        tmp_path,
        data={"source": s3.uri("imgs/"), "image_mode": "RGB"},
        tracking={"retry": {"max_attempts": 2, "timeout_s": 5.0}},
    )
    meta = prepare_data(cfg, "pipe-s3", tmp_path / "dataset")
    assert meta["class_names"] == CLASSES and meta["input_shape"] == [3, 4, 5]
    assert class_names(load_splits(tmp_path / "dataset").meta) == CLASSES
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.search_runs(
        [experiment_id(client, cfg.tracking.experiment)],
        filter_string="tags.`kdflow.step` = 'prepare_data'",
    )[0]
    assert run.data.params["class_names"] == "cat,dog,fish"
    assert run.data.params["source"] == s3.uri("imgs/")
    logged = client.download_artifacts(run.info.run_id, "dataset_meta.json", str(tmp_path / "art"))
    assert '"class_names"' in Path(logged).read_text()
