"""A prepared dataset directory: ``splits.npz`` (the arrays) + ``meta.json`` (what they are).

``prepare_data`` writes it (``kd_lib.data.dataset.prepare`` makes the Splits); every later
step reads it. ``splits.npz`` holds ``x_{train,val,test}`` float32 ``[N, *input_shape]``
(normalized with the train split's statistics) and ``y_{train,val,test}`` int64 ``[N]``; it
is read with ``allow_pickle=False``. ``meta.json`` is ``DatasetMeta`` as indented JSON.

Text data (``data.text_column``): ``x_*`` are int64 token ids ``[N, max_length]``, right-padded,
not normalized; ``meta.text`` (``TextMeta``) says how, and the directory also holds the
tokenizer that made them, ``tokenizer.json`` (``kd_lib.data.text``).

A transfer set (``distill.transfer_source``: unlabeled samples the student learns from the
teacher alone) adds ``x_transfer`` ``[M, *input_shape]``, encoded like ``x_train`` (the train
split's normalization, or its tokenizer) and without labels; ``meta.transfer`` (``TransferMeta``)
says where it came from.

Image folders and image tables (``.csv`` / ``.parquet`` without ``data.text_column``) are not
copied: their directory holds ``manifest.npz`` instead of ``splits.npz``, the sample ids of each
split (a folder's files by path relative to its root, a table's rows by number) and their labels
(``ids_{split}``, ``y_{split}``; ``ids_transfer`` for a transfer set), and ``meta.manifest``
(``ManifestMeta``) says where the samples are and how to decode them; the steps read them lazily
(``kd_lib.data.lazy``). The manifest grows with the number of samples, not their size.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kd_lib.artifacts.base import Int, Number, Str, describe, read_json, write_json
from kd_lib.artifacts.errors import ArtifactError
from kd_lib.artifacts.model_dir import TOKENIZER_FILE

SPLITS_FILE = "splits.npz"
MANIFEST_FILE = "manifest.npz"
META_FILE = "meta.json"
SPLIT_NAMES = ("train", "val", "test")
# splits.npz key of text data's raw test strings (``Splits.test_texts``).
TEST_TEXTS_KEY = "text_test"
# splits.npz key of the transfer set's samples (``Splits.transfer``).
TRANSFER_KEY = "x_transfer"
_FIX = "re-run the prepare_data step"


class TextMeta(BaseModel):
    """How the token ids of a text dataset were made.

    Attributes:
        tokenizer_file: The tokenizer in the dataset directory (``tokenizer.json``).
        pad_id: The id rows are right-padded with (a model masks it out).
        max_length: Ids per row, special tokens included (the input shape is ``[max_length]``).
        vocab_size: Ids the tokenizer can produce: a model's embedding rows.
        tokenizer_origin: ``trained`` (on the train split), ``teacher`` (the teacher's own) or
            ``file`` (``data.tokenizer``).
    """

    model_config = ConfigDict(extra="forbid")

    tokenizer_file: Str = TOKENIZER_FILE
    pad_id: Int = Field(ge=0)
    max_length: Int = Field(ge=1)
    vocab_size: Int = Field(ge=1)
    tokenizer_origin: Literal["trained", "teacher", "file"]


class TransferMeta(BaseModel):
    """Where a transfer set came from (``distill.transfer_source``).

    Attributes:
        source: ``distill.transfer_source`` as configured.
        size: Number of transfer samples.
        fingerprint: sha256 of the samples as read (before encoding).
    """

    model_config = ConfigDict(extra="forbid")

    source: Str
    size: Int = Field(ge=1)
    fingerprint: Str


class ManifestMeta(BaseModel):
    """Where the samples of a dataset read lazily are, and how each is decoded.

    Attributes:
        kind: ``folder`` (one image file per sample) or ``table`` (one row of a ``.csv`` /
            ``.parquet`` file per sample).
        sources: Split name (and ``transfer``) -> the source its ids point into, as configured
            (a local path or ``s3://`` URI: ``data.source``, ``data.test_source`` or
            ``distill.transfer_source``).
        image_mode: Folders: ``L`` or ``RGB`` (``data.image_mode``).
        image_size: Folders: ``[H, W]`` every image is resized to, or None.
        label_column: Tables: the label column (not part of the samples).
        pixel_column: Tables: the one column of flattened pixels, or None.
        feature_columns: Tables: the feature columns in order (resolved when the file was read).
        image_shape: Tables: ``[C, H, W]`` the flat features are reshaped to, or None.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["folder", "table"]
    sources: dict[str, Str]
    image_mode: Literal["L", "RGB"] = "L"
    image_size: list[Int] | None = None
    label_column: Str = "label"
    pixel_column: Str | None = None
    feature_columns: list[Str] | None = None
    image_shape: list[Int] | None = None


@dataclass
class Manifest:
    """The samples of a lazily read dataset: ``ids[name]`` (file paths relative to the source
    root, or int64 row numbers) and ``y[name]`` int64 labels, for each of SPLIT_NAMES (and
    ``transfer``, without labels), plus ``meta.manifest``'s description of where they are."""

    ids: dict[str, np.ndarray]
    y: dict[str, np.ndarray]


class DatasetMeta(BaseModel):
    """What later steps (and the registered model) need to know about the data.

    Attributes:
        source: ``data.source`` as configured.
        fingerprint: sha256 of the arrays (and of the test file's, with ``test_source``, and
            the transfer set's, with ``transfer``): the data's identity.
        num_classes: Number of classes.
        input_shape: One sample's shape.
        sizes: Split name -> number of samples.
        class_counts: Split name -> samples per class.
        normalization: ``{"mean": m, "std": s}`` of the train split: floats, or one per
            channel for colour images.
        class_names: Index -> name (image sub-folders, or label names in a table); empty
            when labels are ids.
        test_source: ``data.test_source``, when the test split came from its own file.
        text: Text data only: the tokenizer and padding of the token ids (``TextMeta``).
        transfer: With a transfer set only: its source, size and fingerprint (``TransferMeta``).
        manifest: Lazily read data only (image folders and tables): where the samples are
            (``ManifestMeta``); the directory then holds ``manifest.npz``, not ``splits.npz``.
    """

    model_config = ConfigDict(extra="forbid")

    source: Str
    fingerprint: Str
    num_classes: Int
    input_shape: list[Int]
    sizes: dict[str, Int]
    class_counts: dict[str, list[Int]]
    normalization: dict[str, Number | list[Number]] = Field(default_factory=dict)
    class_names: list[Str] = Field(default_factory=list)
    test_source: Str | None = None
    text: TextMeta | None = None
    transfer: TransferMeta | None = None
    manifest: ManifestMeta | None = None


@dataclass
class Splits:
    """Normalized train/val/test arrays plus their metadata: ``x[name]`` float32
    ``[N, *input_shape]`` (text: int64 token ids ``[N, max_length]``), ``y[name]`` int64 ``[N]``
    for each of SPLIT_NAMES; ``tokenizer``: text data's ``tokenizer.json`` content;
    ``test_texts``: text data's raw test strings (``x["test"]`` is their ids), what a served text
    model is given when the registered version is verified; ``transfer``: the transfer set's
    unlabeled samples ``[M, *input_shape]``, encoded like ``x["train"]`` (``meta.transfer``).

    Data read lazily (``meta.manifest`` set) holds no arrays: ``manifest`` says which samples each
    split has, and ``kd_lib.data.lazy.open_splits`` fills ``x`` (and ``transfer``) with views that
    read them on demand."""

    x: dict[str, Any]
    y: dict[str, np.ndarray]
    meta: DatasetMeta
    tokenizer: str | None = None
    test_texts: list[str] | None = None
    transfer: Any = None
    manifest: Manifest | None = None


def _not_prepared(directory: Path, detail: str) -> ArtifactError:
    return ArtifactError(f"{directory}: not a prepared kdflow dataset ({detail})", _FIX)


def save_splits(splits: Splits, directory: str | Path) -> Path:
    """Write ``splits.npz`` (``manifest.npz`` for data read lazily) and ``meta.json`` into
    ``directory`` (a KFP Dataset artifact)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if (splits.manifest is None) != (splits.meta.manifest is None):
        raise ValueError("lazily read data needs both its sample ids (Splits.manifest) and meta.manifest")
    if splits.manifest is not None:
        _save_manifest(splits.manifest, d / MANIFEST_FILE)
        absent = {name for name in ("text", "transfer") if getattr(splits.meta, name) is None}
        write_json(d / META_FILE, splits.meta.model_dump(exclude=absent), indent=2)
        return d
    arrays: dict[str, Any] = {f"x_{n}": splits.x[n] for n in SPLIT_NAMES} | {f"y_{n}": splits.y[n] for n in SPLIT_NAMES}
    if splits.test_texts is not None:  # a unicode array: read back with allow_pickle=False
        arrays[TEST_TEXTS_KEY] = np.asarray(splits.test_texts, dtype=np.str_)
    if (splits.transfer is None) != (splits.meta.transfer is None):
        raise ValueError("a transfer set needs both its samples (Splits.transfer) and meta.transfer")
    if splits.transfer is not None:
        arrays[TRANSFER_KEY] = splits.transfer
    np.savez(d / SPLITS_FILE, **arrays)
    if splits.meta.text is not None:
        if splits.tokenizer is None:
            raise ValueError("text splits need their tokenizer (Splits.tokenizer) to be saved")
        (d / splits.meta.text.tokenizer_file).write_text(splits.tokenizer, encoding="utf-8")
    # A dataset without text (or transfer set) writes meta.json exactly as before the field existed.
    absent = {name for name in ("text", "transfer", "manifest") if getattr(splits.meta, name) is None}
    write_json(d / META_FILE, splits.meta.model_dump(exclude=absent or None), indent=2)
    return d


def _save_manifest(manifest: Manifest, path: Path) -> None:
    # Compressed: sorted relative paths ("cat/0001.png") and row numbers shrink several-fold.
    arrays: dict[str, Any] = {f"ids_{n}": np.asarray(v) for n, v in manifest.ids.items()} | {
        f"y_{n}": np.asarray(v, dtype=np.int64) for n, v in manifest.y.items()
    }
    np.savez_compressed(path, **arrays)


def tokenizer_path(directory: str | Path, meta: DatasetMeta | None = None) -> Path | None:
    """The ``tokenizer.json`` of a prepared text dataset directory; None for other data.

    Raises:
        ArtifactError: the data is text and the file is missing (named).
    """
    d = Path(directory)
    meta = meta if meta is not None else read_meta(d)
    if meta.text is None:
        return None
    path = d / meta.text.tokenizer_file
    if not path.is_file():
        raise _not_prepared(d, f"{path}: missing; a text dataset holds the tokenizer its ids were made with")
    return path


def read_meta(directory: str | Path) -> DatasetMeta:
    """``meta.json`` of a prepared dataset directory, without loading the arrays.

    Raises:
        ArtifactError: it is missing, not JSON, or a field is missing or of the wrong type (named).
    """
    d = Path(directory)
    try:
        raw = read_json(d / META_FILE)
        return DatasetMeta.model_validate(raw)
    except ArtifactError as err:
        raise _not_prepared(d, err.cause) from None
    except ValidationError as err:
        raise _not_prepared(d, f"{d / META_FILE}: {describe(err)}") from None


def load_splits(directory: str | Path, transfer: bool = False) -> Splits:
    """Inverse of ``save_splits``. Data read lazily comes back as its ``manifest`` and labels with
    ``x`` empty: ``kd_lib.data.lazy.open_splits`` opens it.

    Args:
        directory: The prepared dataset directory.
        transfer: Also read the transfer set's samples (``Splits.transfer``, when ``meta.transfer``
            says there are some); only the distill step trains on them, so the others skip them.

    Raises:
        ArtifactError: a file is missing or corrupt, naming it (and the field of ``meta.json``).
    """
    d = Path(directory)
    meta = read_meta(d)
    if meta.manifest is not None:
        manifest = _load_manifest(d, meta, transfer)
        return Splits(x={}, y={n: manifest.y[n] for n in SPLIT_NAMES}, meta=meta, manifest=manifest)
    try:
        with np.load(d / SPLITS_FILE, allow_pickle=False) as npz:
            xs = {n: npz[f"x_{n}"] for n in SPLIT_NAMES}
            ys = {n: npz[f"y_{n}"] for n in SPLIT_NAMES}
            texts = npz[TEST_TEXTS_KEY].tolist() if TEST_TEXTS_KEY in npz.files else None
            x_transfer = npz[TRANSFER_KEY] if transfer and meta.transfer is not None else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise _not_prepared(d, f"{d / SPLITS_FILE}: {err}") from None
    return Splits(x=xs, y=ys, meta=meta, test_texts=texts, transfer=x_transfer)


def _load_manifest(d: Path, meta: DatasetMeta, transfer: bool) -> Manifest:
    names = SPLIT_NAMES + (("transfer",) if transfer and meta.transfer is not None else ())
    try:
        with np.load(d / MANIFEST_FILE, allow_pickle=False) as npz:
            ids = {n: npz[f"ids_{n}"] for n in names}
            ys = {n: npz[f"y_{n}"] for n in names if n != "transfer"}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise _not_prepared(d, f"{d / MANIFEST_FILE}: {err}") from None
    for n in SPLIT_NAMES:
        if len(ids[n]) != len(ys[n]) or len(ys[n]) != meta.sizes.get(n, -1):
            raise _not_prepared(
                d,
                f"{d / MANIFEST_FILE}: split {n!r} has {len(ids[n])} ids and {len(ys[n])} labels, "
                f"{META_FILE} says {meta.sizes.get(n)} samples",
            )
    return Manifest(ids=ids, y=ys)
