"""A transfer set (``distill.transfer_source``): unlabeled samples read in every format of the data
without labels, encoded like the train split (its tokenizer, its normalization), saved beside the
splits with their count and fingerprint, and every mistake a DataError naming the file."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tokenizers import Tokenizer

from kd_lib.adapters import storage
from kd_lib.artifacts.dataset_dir import META_FILE, TRANSFER_KEY, load_splits, save_splits
from kd_lib.config import DataConfig, RetryConfig
from kd_lib.data import dataset as data
from kd_lib.data import text as text_lib
from kd_lib.data.normalization import normalize
from tests.helpers import as_arrays
from tests.kd_lib.conftest import S3

WORDS = {"pos": ["great", "lovely", "superb", "fun"], "neg": ["awful", "dull", "bad", "grim"]}
FETCH = partial(storage.fetch, retry=RetryConfig())


def _texts(n_per_class: int, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_per_class):
        for label, words in WORDS.items():
            rows.append({"text": f"The film was {' '.join(rng.choice(words, size=2 + i % 3))}", "label": label})
    return rows


def _write_rows(rows: list[dict], path: Path) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def _text_cfg(source: Path) -> DataConfig:
    return DataConfig(source=str(source), text_column="text", max_length=12, vocab_size=120, tokenizer="train")


# ------------------------------------------------------------------ text


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_text_transfer_is_tokenized_with_the_train_tokenizer(tmp_path: Path, suffix: str) -> None:
    source = _write_rows(_texts(20, 0), tmp_path / "train.csv")
    # Unlabeled texts with a word no labeled text has: the tokenizer must not learn it.
    unlabeled = [{"text": f"{r['text']} quokka"} for r in _texts(6, 1)]
    transfer = _write_rows(unlabeled, tmp_path / f"transfer{suffix}")
    plain = data.prepare(_text_cfg(source))
    splits = data.prepare(_text_cfg(source), transfer_source=str(transfer))

    # The splits and the tokenizer are those of the same data without a transfer set ...
    assert splits.tokenizer == plain.tokenizer and splits.tokenizer is not None
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(splits.x[name], plain.x[name])
    tokenizer = Tokenizer.from_str(splits.tokenizer)
    assert "quokka" not in tokenizer.get_vocab()
    # ... and the transfer texts are their ids under it, row for row.
    assert splits.transfer is not None and splits.transfer.dtype == np.int64
    expected = text_lib.encode(tokenizer, [r["text"] for r in unlabeled], 12)
    np.testing.assert_array_equal(splits.transfer, expected)
    assert splits.meta.transfer is not None
    assert (splits.meta.transfer.source, splits.meta.transfer.size) == (str(transfer), 12)
    assert splits.meta.sizes == plain.meta.sizes  # the transfer samples are no split
    # The data's identity covers the transfer set: other texts, other fingerprints.
    assert splits.meta.fingerprint != plain.meta.fingerprint
    other = _write_rows([{"text": "The film was bad"}] + unlabeled[1:], tmp_path / f"other{suffix}")
    changed = data.prepare(_text_cfg(source), transfer_source=str(other))
    assert changed.meta.transfer is not None
    assert changed.meta.transfer.fingerprint != splits.meta.transfer.fingerprint
    assert changed.meta.fingerprint != splits.meta.fingerprint


def test_text_labels_in_a_transfer_file_are_ignored(tmp_path: Path) -> None:
    source = _write_rows(_texts(20, 0), tmp_path / "train.csv")
    rows = _texts(5, 2)
    labeled = _write_rows(rows, tmp_path / "labeled.csv")
    # Even labels of a class the data does not have: they are not read.
    bare = _write_rows([{"text": r["text"], "label": "unknown-class"} for r in rows], tmp_path / "bare.csv")
    a = data.prepare(_text_cfg(source), transfer_source=str(labeled))
    b = data.prepare(_text_cfg(source), transfer_source=str(bare))
    assert a.transfer is not None and b.transfer is not None
    np.testing.assert_array_equal(a.transfer, b.transfer)
    assert a.meta.transfer == b.meta.transfer.model_copy(update={"source": str(labeled)})  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"body": "a text"}], r"no text column 'text'; the file has columns \['body'\]"),
        ([{"text": "fine"}, {"text": "fine too"}, {"text": "  "}], r"text column 'text', data row 2: empty text"),
        ([{"text": "fine"}, {"text": 7}], r"text column 'text', data row 1: not a string \(7\)"),
    ],
)
def test_bad_text_transfer_files_name_file_row_and_column(tmp_path: Path, rows: list, message: str) -> None:
    source = _write_rows(_texts(20, 0), tmp_path / "train.csv")
    transfer = _write_rows(rows, tmp_path / "transfer.jsonl")
    with pytest.raises(data.DataError, match=message) as err:
        data.prepare(_text_cfg(source), transfer_source=str(transfer))
    assert str(transfer) in str(err.value)


def test_empty_or_missing_text_transfer_file_is_named(tmp_path: Path) -> None:
    source = _write_rows(_texts(20, 0), tmp_path / "train.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    with pytest.raises(data.DataError, match=f"{empty}: the file has no rows"):
        data.prepare(_text_cfg(source), transfer_source=str(empty))
    with pytest.raises(data.DataError, match=f"{tmp_path / 'nowhere.csv'}: no such file"):
        data.prepare(_text_cfg(source), transfer_source=str(tmp_path / "nowhere.csv"))


# ------------------------------------------------------------------ images


def _images(n: int, seed: int, hw: tuple[int, int] = (4, 5)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.int64) % 3
    return rng.integers(0, 256, size=(n, 1, *hw)).astype(np.float32), y


def test_npz_transfer_is_normalized_with_the_train_statistics(tmp_path: Path) -> None:
    x, y = _images(30, 0)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    # Transfer samples on another scale: normalizing with their own statistics would be visible.
    raw = _images(7, 1)[0] * 0.25 + 40.0
    np.savez(tmp_path / "transfer.npz", x=raw)  # no y: unlabeled
    cfg = DataConfig(source=str(tmp_path / "data.npz"))
    plain = data.prepare(cfg)
    splits = data.prepare(cfg, transfer_source=str(tmp_path / "transfer.npz"))
    assert splits.meta.normalization == plain.meta.normalization  # stats from the train split alone
    mean, std = float(splits.meta.normalization["mean"]), float(splits.meta.normalization["std"])  # type: ignore[arg-type]
    train_raw = x[data.stratified_split(y, 0.15, 0.15, 0)[0]]
    assert mean == pytest.approx(float(train_raw.mean()), rel=1e-5)
    assert splits.transfer is not None and splits.transfer.dtype == np.float32
    np.testing.assert_allclose(splits.transfer, (raw - mean) / std, rtol=1e-5, atol=1e-5)
    assert splits.meta.transfer is not None
    assert splits.meta.transfer.size == 7
    assert splits.meta.transfer.fingerprint == data.fingerprint(raw, np.full(7, data.NO_LABEL, dtype=np.int64))
    assert splits.meta.fingerprint not in (plain.meta.fingerprint, splits.meta.transfer.fingerprint)
    # An npz with labels: they are ignored.
    np.savez(tmp_path / "labeled.npz", x=raw, y=np.arange(7))
    again = data.prepare(cfg, transfer_source=str(tmp_path / "labeled.npz"))
    np.testing.assert_array_equal(again.transfer, splits.transfer)


def _table(x: np.ndarray, labels: np.ndarray | None) -> pd.DataFrame:
    flat = x.reshape(len(x), -1)
    df = pd.DataFrame(flat, columns=[f"p{i}" for i in range(flat.shape[1])])
    if labels is not None:
        df.insert(0, "label", labels)
    return df


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_table_transfer_needs_the_feature_columns_only(tmp_path: Path, suffix: str) -> None:
    x, y = _images(30, 0)
    raw = _images(6, 1)[0]
    write = (lambda df, p: df.to_csv(p, index=False)) if suffix == ".csv" else (lambda df, p: df.to_parquet(p))
    write(_table(x, y), tmp_path / f"data{suffix}")
    write(_table(raw, None), tmp_path / f"bare{suffix}")
    write(_table(raw, np.zeros(6, dtype=np.int64)), tmp_path / f"labeled{suffix}")
    cfg = DataConfig(source=str(tmp_path / f"data{suffix}"), image_shape=[1, 4, 5])
    bare = as_arrays(data.prepare(cfg, transfer_source=str(tmp_path / f"bare{suffix}")))
    labeled = as_arrays(data.prepare(cfg, transfer_source=str(tmp_path / f"labeled{suffix}")))
    assert bare.transfer is not None and bare.transfer.shape == (6, 1, 4, 5)
    np.testing.assert_allclose(bare.transfer, normalize(raw, bare.meta.normalization), rtol=1e-6)
    np.testing.assert_array_equal(bare.transfer, labeled.transfer)
    # A feature column missing from the transfer file is named with the columns it has.
    write(_table(raw, None).drop(columns=["p3"]), tmp_path / f"short{suffix}")
    with pytest.raises(data.DataError, match=r"short.*no feature column\(s\) \['p3'"):
        data.prepare(
            DataConfig(source=str(tmp_path / f"data{suffix}"), feature_columns=[f"p{i}" for i in range(20)]),
            transfer_source=str(tmp_path / f"short{suffix}"),
        )


def _save(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img[0].astype(np.uint8), mode="L").save(path)


def test_image_folder_transfer_with_or_without_class_folders(tmp_path: Path) -> None:
    x, y = _images(24, 0)
    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        _save(img, tmp_path / "data" / f"c{label}" / f"{i:03d}.png")
    raw = _images(5, 1)[0]
    for i, img in enumerate(raw):
        _save(img, tmp_path / "flat" / f"{i:03d}.png")
        # The same images under class folders of names the data does not have: ignored, read in path order.
        _save(img, tmp_path / "nested" / ("a" if i < 2 else "b") / f"{i:03d}.png")
    (tmp_path / "flat" / "README.txt").write_text("not an image")
    _save(raw[0], tmp_path / "flat" / ".thumbnails" / "000.png")  # a hidden folder is no sample
    cfg = DataConfig(source=str(tmp_path / "data"))
    flat = as_arrays(data.prepare(cfg, transfer_source=str(tmp_path / "flat")))
    nested = as_arrays(data.prepare(cfg, transfer_source=str(tmp_path / "nested")))
    assert flat.transfer is not None and flat.transfer.shape == (5, 1, 4, 5)
    np.testing.assert_allclose(flat.transfer, normalize(raw, flat.meta.normalization), rtol=1e-6)
    np.testing.assert_array_equal(flat.transfer, nested.transfer)
    assert flat.meta.class_names == ["c0", "c1", "c2"]
    (tmp_path / "none").mkdir()
    with pytest.raises(data.DataError, match=f"{tmp_path / 'none'}: no PNG/JPEG images"):
        data.prepare(cfg, transfer_source=str(tmp_path / "none"))
    _save(np.zeros((1, 6, 6)), tmp_path / "flat" / "999.png")
    with pytest.raises(data.DataError, match=r"flat/999.png: image is 6x6 \(HxW\) but .*flat/000.png is 4x5"):
        data.prepare(cfg, transfer_source=str(tmp_path / "flat"))


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.zeros(3)}, r"missing array\(s\) \['x'\]; found \['y'\]"),
        ({"x": np.zeros((3, 1, 4, 4), np.float32)}, r"samples have shape \[1, 4, 4\] but those of .* \[1, 4, 5\]"),
        ({"x": np.full((2, 1, 4, 5), np.nan, np.float32)}, r"NaN/inf value\(s\) \(first in sample 0\)"),
        ({"x": np.zeros((0, 1, 4, 5), np.float32)}, "the dataset is empty"),
        ({"x": np.array(["a", "b"])}, "expected real numbers"),
    ],
)
def test_bad_npz_transfer_files_are_named(tmp_path: Path, arrays: dict, message: str) -> None:
    x, y = _images(30, 0)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    np.savez(tmp_path / "transfer.npz", **arrays)
    with pytest.raises(data.DataError, match=message) as err:
        data.prepare(DataConfig(source=str(tmp_path / "data.npz")), transfer_source=str(tmp_path / "transfer.npz"))
    assert str(tmp_path / "transfer.npz") in str(err.value)


def test_s3_transfer_source_is_fetched(s3: S3, tmp_path: Path) -> None:
    source = _write_rows(_texts(20, 0), tmp_path / "train.csv")
    transfer = _write_rows([{"text": r["text"]} for r in _texts(4, 3)], tmp_path / "t.jsonl")
    storage.put(transfer, s3.uri("unlabeled/t.jsonl"))
    remote = data.prepare(_text_cfg(source), fetch=FETCH, transfer_source=s3.uri("unlabeled/t.jsonl"))
    local = data.prepare(_text_cfg(source), transfer_source=str(transfer))
    np.testing.assert_array_equal(remote.transfer, local.transfer)
    assert remote.meta.transfer is not None and remote.meta.transfer.source == s3.uri("unlabeled/t.jsonl")
    assert remote.meta.transfer.fingerprint == local.meta.transfer.fingerprint  # type: ignore[union-attr]


# ------------------------------------------------------------------ the dataset directory


def test_dataset_directory_keeps_the_transfer_set_for_whoever_asks(tmp_path: Path) -> None:
    x, y = _images(30, 0)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    np.savez(tmp_path / "transfer.npz", x=_images(4, 1)[0])
    cfg = DataConfig(source=str(tmp_path / "data.npz"))
    splits = data.prepare(cfg, transfer_source=str(tmp_path / "transfer.npz"))
    save_splits(splits, tmp_path / "ds")
    with np.load(tmp_path / "ds" / "splits.npz") as npz:
        assert TRANSFER_KEY in npz.files
    assert json.loads((tmp_path / "ds" / META_FILE).read_text())["transfer"]["size"] == 4
    again = load_splits(tmp_path / "ds", transfer=True)
    assert again.meta == splits.meta
    np.testing.assert_array_equal(again.transfer, splits.transfer)
    # Steps that do not train the student leave the transfer samples on disk.
    assert load_splits(tmp_path / "ds").transfer is None
    # Without a transfer set, meta.json has no transfer key (as before the field existed).
    save_splits(data.prepare(cfg), tmp_path / "plain")
    assert "transfer" not in json.loads((tmp_path / "plain" / META_FILE).read_text())
    assert load_splits(tmp_path / "plain", transfer=True).transfer is None
