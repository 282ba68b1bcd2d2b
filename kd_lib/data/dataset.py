"""Load, validate, split and fingerprint a classification dataset.

Sources (``data.source``, and optionally ``data.test_source``), each a local path or an
``s3://`` URI, which the caller's ``fetch`` downloads (the prepare_data step passes
``kd_lib.adapters.storage.fetch``; this layer imports no storage client):

- ``digits``: scikit-learn's builtin 8x8 digits;
- ``mnist14``: 5,000 MNIST digits shrunk to 14x14, shipped in the package
  (``kd_lib/data/samples/``, where its README says where they come from);
- ``.npz`` with arrays ``x`` ``[N, ...]`` and ``y`` ``[N]``;
- ``.csv`` / ``.parquet``: a label column (class ids or class names) plus numeric feature
  columns, or one column of flattened pixels reshaped by ``data.image_shape``;
- a directory (or s3 prefix) with one sub-folder of PNG/JPEG images per class;
- text (``data.text_column`` set): a ``.csv``, ``.parquet`` or ``.jsonl`` file with a text
  column and a label column, or a labelled text file shipped in the package (``movie_toy``,
  ``kd_lib/data/samples/``). The texts are tokenized (``kd_lib.data.text``) into int64 ids
  ``[N, max_length]`` with a tokenizer trained on the train split (or the teacher's, or a file).

A transfer set (``distill.transfer_source``) is read by the same loaders without labels
(``read_source(..., labeled=False)``): an ``.npz`` with ``x`` alone, a table without its label
column, a folder of images (class sub-folders optional, ignored), texts without labels.

Image folders and image tables (``.csv`` / ``.parquet`` without a text column) are not loaded
into memory by ``prepare``: one streaming pass (``kd_lib.data.stream.scan``) checks them and
computes the fingerprint and the train split's statistics, and the result is a manifest of
sample ids per split (``Splits.manifest``) that the steps read lazily (``kd_lib.data.lazy``).
``read_source`` still reads any source whole, for callers that want the arrays.

Arrays on disk and between steps are numpy; ``x`` is float32 ``[N, *input_shape]`` (images
as ``[N, C, H, W]``), ``y`` is int64 ``[N]``. Nothing here is pickled: npz files are read with
``allow_pickle=False``. pandas, pyarrow and Pillow are imported only by the loaders that
need them. The train-split normalization (what the served model applies too) is
``kd_lib.data.normalization``; the prepared dataset directory is ``kd_lib.artifacts.dataset_dir``.
"""

from __future__ import annotations

import hashlib
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from kd_lib.artifacts.dataset_dir import (
    SPLIT_NAMES,
    DatasetMeta,
    Manifest,
    ManifestMeta,
    Splits,
    TextMeta,
    TransferMeta,
)
from kd_lib.config import DataConfig, source_kind
from kd_lib.data import stream
from kd_lib.data import text as text_lib
from kd_lib.data.errors import DataError
from kd_lib.data.normalization import normalization_stats, normalize, stats_from_sums, values_per_sample

if TYPE_CHECKING:
    import pandas as pd
    from tokenizers import Tokenizer

IMAGE_SUFFIXES = stream.IMAGE_SUFFIXES
# The labels of samples read without them (``read_source(..., labeled=False)``: a transfer set).
NO_LABEL = stream.NO_LABEL
# (remote URI, scratch directory for the download) -> the local file or directory it became.
Fetch = Callable[[str, Path], Path]


@dataclass
class Labeled:
    """One source read into arrays: ``x`` float32 ``[N, ...]``, ``y`` int64 ``[N]`` (``NO_LABEL``
    for a source read without labels), and the class names ``y`` indexes (empty when the labels
    were integer class ids already)."""

    x: np.ndarray
    y: np.ndarray
    class_names: list[str] = field(default_factory=list)
    texts: list[str] | None = None  # text data: the N texts (``x`` is then empty until tokenized)


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    # scikit-learn ships the 1,797 8x8 digits inside the wheel: no download.
    from sklearn.datasets import load_digits  # lazy: scikit-learn only for the builtin digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :]  # [N, 1, 8, 8], values 0..16
    return x, bunch.target.astype(np.int64)


def _load_npz(path: Path, origin: str, labeled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{origin}: no such file; set data.source to an existing .npz file or 'digits'")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files and (labeled or k == "x")]
            if missing:
                how = "features as 'x' and labels as 'y' (np.savez(path, x=..., y=...))"
                raise DataError(
                    f"{origin}: missing array(s) {missing}; found {sorted(npz.files)}. "
                    f"Save {how if labeled else 'the unlabeled samples as x (np.savez(path, x=...))'}"
                )
            x = npz["x"]
            # Labels an unlabeled read finds are ignored (a transfer set may be labeled data with its labels hidden).
            y = npz["y"] if labeled else np.full(len(x) if x.ndim else 0, NO_LABEL, dtype=np.int64)
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise DataError(f"{origin}: not a readable .npz file ({err}); re-export it with np.savez") from None
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{origin}: labels 'y' have dtype {y.dtype}; expected integer class ids 0..num_classes-1")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
        raise DataError(f"{origin}: features 'x' have dtype {x.dtype}; expected real numbers")
    return x.astype(np.float32), y.astype(np.int64)


def _read_table(path: Path, kind: str, origin: str) -> pd.DataFrame:
    # lazy: pandas and pyarrow only for CSV / parquet sources (the served model imports neither).
    import pandas as pd
    import pyarrow

    if not path.is_file():
        raise DataError(f"{origin}: no such file; set data.source (or data.test_source) to an existing .{kind} file")
    try:
        if kind == "jsonl":
            # dtype=False: a text of digits stays a string, a label stays as written.
            return pd.read_json(path, lines=True, dtype=False)
        return pd.read_csv(path) if kind == "csv" else pd.read_parquet(path, engine="pyarrow")
    except (ValueError, OSError, pyarrow.ArrowException) as err:
        # pandas' and pyarrow's parse errors are ValueErrors (UnicodeDecodeError included).
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{origin}: not a readable {kind} file ({first}); re-export it as {kind}") from None


def _load_text_table(path: Path, kind: str, cfg: DataConfig, origin: str, labeled: bool = True) -> Labeled:
    """A CSV/parquet/JSON Lines table of texts: ``cfg.text_column`` plus ``cfg.label_column``
    (without ``labeled``: the texts alone, a label column ignored)."""
    assert cfg.text_column is not None  # text mode
    df = _read_table(path, kind, origin)
    columns = [str(c) for c in df.columns]
    df.columns = columns
    roles = (("text", cfg.text_column), ("label", cfg.label_column)) if labeled else (("text", cfg.text_column),)
    for role, name in roles:
        if name not in columns:
            raise DataError(
                f"{origin}: no {role} column {name!r}; the file has columns {columns}. Set data.{role}_column "
                "to the right name"
            )
    if len(df) == 0:
        raise DataError(f"{origin}: the file has no rows")
    texts: list[str] = []
    for row, value in enumerate(df[cfg.text_column].tolist()):
        if not isinstance(value, str):
            raise DataError(
                f"{origin}: text column {cfg.text_column!r}, data row {row}: not a string ({value!r}); "
                "every row needs a text"
            )
        if not value.strip():
            raise DataError(
                f"{origin}: text column {cfg.text_column!r}, data row {row}: empty text; fill in or drop the row"
            )
        texts.append(value)
    if not labeled:
        return Labeled(np.empty((len(texts), 0), dtype=np.int64), np.full(len(texts), NO_LABEL, np.int64), [], texts)
    y, names = stream.table_labels(df[cfg.label_column], cfg.label_column, origin)
    return Labeled(np.empty((len(texts), 0), dtype=np.int64), y, names, texts)


def sample_path(name: str, suffix: str = ".csv") -> Path:
    """The file of a labelled sample shipped in the package: texts (``TEXT_SAMPLES``) are a
    ``.csv``, images (``IMAGE_SAMPLES``) an ``.npz``."""
    return Path(__file__).resolve().parent / "samples" / f"{name}{suffix}"


def is_remote(source: str) -> bool:
    """Whether ``source`` is a URI to download (``s3://...``) rather than a local path."""
    return "://" in source


def local_path(source: str, scratch: str | Path, fetch: Fetch | None) -> Path:
    """Where ``source`` can be read: a local path as it is, a remote one fetched into ``scratch``."""
    if not is_remote(source):
        return Path(source).expanduser()
    if fetch is None:
        raise DataError(
            f"{source}: a remote source, and nothing was given to download it with",
            "pass fetch= to prepare (the prepare_data step passes kd_lib.adapters.storage.fetch), "
            "or download the data and point data.source at the local copy",
        )
    return fetch(source, Path(scratch))


def read_source(
    source: str, cfg: DataConfig, scratch: str | Path, fetch: Fetch | None = None, labeled: bool = True
) -> Labeled:
    """Read one source (``cfg.source``, ``cfg.test_source`` or a transfer set) into arrays, without validating.

    Args:
        source: ``'digits'``, a shipped sample (``'mnist14'``, ``'movie_toy'``), a local path, or an
            ``s3://`` URI (fetched into ``scratch``).
        cfg: how to read it (label/feature/pixel columns, image shape, size and mode).
        scratch: a directory for downloads; the caller removes it.
        fetch: downloads a remote source (``Fetch``); needed only for one.
        labeled: False reads samples without labels (a transfer set): an ``.npz`` needs only
            ``x``, a table no label column, a folder of images no class sub-folders; labels
            found are ignored and ``y`` is ``NO_LABEL``.

    Raises:
        DataError: the file is missing, unreadable, or not laid out as ``cfg`` says (naming it),
            or the source is remote and no ``fetch`` was given.
        Exception: whatever ``fetch`` raises for a source it cannot download
            (``kd_lib.adapters.storage.StorageError`` in a pipeline).
    """
    kind = source_kind(source)
    if kind == "digits":
        return Labeled(*_load_digits())
    if kind == "image_sample":
        return Labeled(*_load_npz(sample_path(source, ".npz"), source, labeled))
    if cfg.text_column is not None:
        if kind == "text_sample":
            return _load_text_table(sample_path(source), "csv", cfg, source, labeled)
        if kind not in ("csv", "parquet", "jsonl"):
            raise DataError(f"{source}: text data (data.text_column) is read from a .csv, .parquet or .jsonl file")
        return _load_text_table(local_path(source, scratch, fetch), kind, cfg, source, labeled)
    local = local_path(source, scratch, fetch)
    if local.is_dir() and kind == "unknown":
        kind = "folder"
    if kind == "npz":
        x, y = _load_npz(local, source, labeled)
        return Labeled(stream.reshape(x, cfg.image_shape, source), y)
    if kind in ("csv", "parquet", "folder"):
        scanned = _scan(kind, local, source, cfg, labeled, keep=True)
        assert scanned.x is not None
        return Labeled(scanned.x, scanned.y, scanned.class_names)
    raise DataError(
        f"data.source={source!r}: unsupported source; use 'digits', a .npz, .csv or .parquet file, "
        "or a directory of class sub-folders of images"
    )


# Sources read lazily by the steps (image folders and image tables): prepare_data scans them once
# and writes a manifest, not the decoded samples. "unknown" is a directory with a dotted name.
STREAMED_KINDS = ("folder", "csv", "parquet", "unknown")


def _scan(
    kind: str,
    local: Path,
    source: str,
    cfg: DataConfig,
    labeled: bool,
    keep: bool = False,
    columns: stream.TableColumns | None = None,
) -> stream.Scanned:
    """One pass over an image folder or table (``stream.scan``) read as ``cfg`` says."""
    if kind == "unknown":
        if not local.is_dir():
            raise DataError(
                f"data.source={source!r}: unsupported source; use 'digits', a .npz, .csv or .parquet file, "
                "or a directory of class sub-folders of images"
            )
        kind = "folder"
    spec = columns or stream.TableColumns(cfg.label_column, cfg.pixel_column, cfg.feature_columns, cfg.image_shape)
    return stream.scan(kind, local, source, labeled, cfg.image_mode, cfg.image_size, spec, keep)


def load_source(
    source: str, cfg: DataConfig | None = None, fetch: Fetch | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``source`` into ``(x [N, ...] float32, y [N] int64)`` without validating."""
    with tempfile.TemporaryDirectory(prefix="kdflow-data-") as scratch:
        got = read_source(source, cfg or DataConfig(), scratch, fetch)
    return got.x, got.y


def _align_test(train: Labeled, test: Labeled, source: str, test_source: str) -> Labeled:
    """Express the test labels in the train set's class ids; a class train lacks is an error."""
    if train.class_names or test.class_names:
        if not (train.class_names and test.class_names):
            raise DataError(
                f"{test_source} and {source}: one labels classes by name, the other by integer id; use one kind in both"
            )
        ids = {n: i for i, n in enumerate(train.class_names)}
        unknown = sorted(set(test.class_names) - set(ids))
        if unknown:
            raise DataError(
                f"{test_source}: class(es) {unknown[:10]} are in the test set but not in the train set {source}; "
                "add training samples for them or remove them from the test set"
            )
        remap = np.array([ids[n] for n in test.class_names], dtype=np.int64)
        return Labeled(test.x, remap[test.y], list(train.class_names), test.texts)
    unknown_ids = sorted({int(c) for c in np.unique(test.y)} - {int(c) for c in np.unique(train.y)})
    if unknown_ids:
        raise DataError(
            f"{test_source}: class(es) {unknown_ids[:10]} are in the test set but not in the train set {source}; "
            "add training samples for them or remove them from the test set"
        )
    return test


def validate(x: np.ndarray, y: np.ndarray, num_classes: int | None, origin: str) -> int:
    """Check shapes, finiteness and label range; return the number of classes.

    Raises:
        DataError: naming ``origin`` and what is wrong.
    """
    if x.ndim < 2:
        raise DataError(f"{origin}: 'x' has shape {x.shape}; expected [N, features] or [N, C, H, W]")
    if y.ndim != 1:
        raise DataError(f"{origin}: 'y' has shape {y.shape}; expected a flat vector of N labels")
    if x.shape[0] != y.shape[0]:
        raise DataError(f"{origin}: shape mismatch, {x.shape[0]} samples in 'x' but {y.shape[0]} labels in 'y'")
    _check_samples(x, origin)
    return _label_count(y, num_classes, origin)


def _check_samples(x: np.ndarray, origin: str) -> None:
    """Samples ``x`` ``[N, ...]``: at least one, each with features, all finite (``validate``'s part without labels)."""
    if x.ndim < 2:
        raise DataError(f"{origin}: 'x' has shape {x.shape}; expected [N, features] or [N, C, H, W]")
    if x.shape[0] == 0:
        raise DataError(f"{origin}: the dataset is empty")
    if x[0].size == 0:
        raise DataError(f"{origin}: 'x' has shape {x.shape}: samples have no features")
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.argwhere(bad.reshape(x.shape[0], -1).any(axis=1))[0, 0])
        raise DataError(
            f"{origin}: 'x' contains {int(bad.sum())} NaN/inf value(s) (first in sample {first}); "
            "clean or drop those samples"
        )


def _label_count(y: np.ndarray, num_classes: int | None, origin: str) -> int:
    """The number of classes (``num_classes``, or inferred), after checking every label is in range."""
    inferred = int(y.max()) + 1
    n = num_classes if num_classes is not None else inferred
    out_of_range = (y < 0) | (y >= n)
    if out_of_range.any():
        labels = sorted({int(v) for v in y[out_of_range][:10]})
        raise DataError(
            f"{origin}: {int(out_of_range.sum())} label(s) outside 0..{n - 1} (e.g. {labels}); "
            "fix the labels or set data.num_classes"
        )
    return n


def _first_missing(present: np.ndarray, num_classes: int, limit: int = 10) -> list[int]:
    """The first ``limit`` class ids in ``0..num_classes-1`` absent from ``present``, found
    without building the whole range: one stray label of 3e9 must not allocate 3e9 ids."""
    have, missing = set(present.tolist()), []
    for c in range(num_classes):  # stops after at most len(present) + limit ids
        if c not in have:
            missing.append(c)
            if len(missing) == limit:
                break
    return missing


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 over the samples' float32 bytes, their shape and the labels: changes if any sample
    or label does, and equals the fingerprint of the same samples read chunk by chunk
    (``kd_lib.data.stream.Fingerprint``)."""
    fp = stream.Fingerprint()
    for i in range(0, len(x), 4096):
        fp.update(x[i : i + 4096])
    return fp.hexdigest(list(x.shape[1:]), y)


def stratified_split(
    y: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded per-class split into train/val/test index arrays (each sorted).

    Every class keeps its proportion in each split; a class too small to appear in all
    splits is an error rather than a silently missing class. ``test_fraction=0`` (the test
    set comes from elsewhere) leaves the test indices empty.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    need = 3 if test_fraction > 0 else 2
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        if idx.size < need:
            splits = "train/val/test" if need == 3 else "train/val"
            raise DataError(f"class {int(cls)} has {idx.size} sample(s); at least {need} are needed to split {splits}")
        idx = rng.permutation(idx)
        n_test = max(1, int(round(idx.size * test_fraction))) if test_fraction > 0 else 0
        n_val = max(1, int(round(idx.size * val_fraction)))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    train, val, test = (np.sort(np.concatenate(parts[name])) for name in SPLIT_NAMES)
    return train, val, test


def _check_all_present(y: np.ndarray, num_classes: int, origin: str) -> None:
    present = np.unique(y)
    if present.size < num_classes:
        missing = _first_missing(present, num_classes)
        more = num_classes - present.size - len(missing)
        raise DataError(
            f"{origin}: class(es) {missing}{f' and {more} more' if more else ''} have no samples; "
            "fix the data or data.num_classes"
        )


# Which tokenizer encodes text data: "teacher" / "file" (loaded) or "trained" (None: train one).
_TokenizerChoice = tuple[Literal["trained", "teacher", "file"], "Tokenizer | None"]


def _text_tokenizer(cfg: DataConfig, scratch: Path, fetch: Fetch | None, teacher: Path | None) -> _TokenizerChoice:
    """``data.tokenizer`` resolved: the teacher's (``auto`` with one), a file's, or None to train one."""
    if cfg.tokenizer == "auto" and teacher is not None:
        return "teacher", text_lib.load_tokenizer(teacher)
    if cfg.tokenizer in ("auto", "train"):
        return "trained", None
    return "file", text_lib.load_tokenizer(local_path(cfg.tokenizer, scratch, fetch))


def _with_transfer_fingerprint(fp: str, transfer: TransferMeta | None) -> str:
    """The data's fingerprint covering the transfer set too: two sha256s in one."""
    return fp if transfer is None else hashlib.sha256(f"{fp}:transfer:{transfer.fingerprint}".encode()).hexdigest()


def _prepare_text(
    cfg: DataConfig,
    train: Labeled,
    test: Labeled | None,
    choice: _TokenizerChoice,
    transfer: tuple[str, Labeled] | None = None,
) -> Splits:
    """Split, tokenize and describe text data (``prepare`` with ``data.text_column`` set)."""
    assert train.texts is not None
    texts, y = train.texts, train.y
    num_classes = _label_count(y, cfg.num_classes, cfg.source)
    _check_all_present(y, num_classes, cfg.source)
    fp = text_lib.text_fingerprint(texts, y)
    if test is None:
        idx = dict(zip(SPLIT_NAMES, stratified_split(y, cfg.val_fraction, cfg.test_fraction, cfg.seed), strict=True))
        split_texts = {name: [texts[i] for i in ids] for name, ids in idx.items()}
        ys = {name: y[ids] for name, ids in idx.items()}
    else:
        assert cfg.test_source is not None and test.texts is not None
        test = _align_test(train, test, cfg.source, cfg.test_source)
        assert test.texts is not None
        _label_count(test.y, num_classes, cfg.test_source)
        train_idx, val_idx, _ = stratified_split(y, cfg.val_fraction, 0.0, cfg.seed)
        split_texts = {"train": [texts[i] for i in train_idx], "val": [texts[i] for i in val_idx], "test": test.texts}
        ys = {"train": y[train_idx], "val": y[val_idx], "test": test.y}
        fp = hashlib.sha256(f"{fp}:{text_lib.text_fingerprint(test.texts, test.y)}".encode()).hexdigest()
    origin, tokenizer = choice
    if tokenizer is None:
        tokenizer = text_lib.train_tokenizer(split_texts["train"], cfg.vocab_size)  # train split only: no leakage
    xs = {name: text_lib.encode(tokenizer, split_texts[name], cfg.max_length) for name in SPLIT_NAMES}
    x_transfer, transfer_meta = None, None
    if transfer is not None:
        transfer_source, unlabeled = transfer
        assert unlabeled.texts is not None
        # The train split's tokenizer: the transfer texts never shape the vocabulary.
        x_transfer = text_lib.encode(tokenizer, unlabeled.texts, cfg.max_length)
        transfer_fp = text_lib.text_fingerprint(unlabeled.texts, unlabeled.y)
        transfer_meta = TransferMeta(source=transfer_source, size=len(unlabeled.texts), fingerprint=transfer_fp)
    meta = DatasetMeta(
        source=cfg.source,
        fingerprint=_with_transfer_fingerprint(fp, transfer_meta),
        num_classes=num_classes,
        input_shape=[cfg.max_length],
        sizes={name: int(ys[name].size) for name in SPLIT_NAMES},
        class_counts={name: np.bincount(ys[name], minlength=num_classes).tolist() for name in SPLIT_NAMES},
        normalization={},
        class_names=list(train.class_names),
        test_source=cfg.test_source,
        text=TextMeta(
            pad_id=text_lib.pad_id(tokenizer),
            max_length=cfg.max_length,
            vocab_size=text_lib.vocabulary_size(tokenizer),
            tokenizer_origin=origin,
        ),
        transfer=transfer_meta,
    )
    return Splits(
        x=xs,
        y=ys,
        meta=meta,
        tokenizer=tokenizer.to_str(pretty=True),
        test_texts=split_texts["test"],
        transfer=x_transfer,
    )


def prepare(
    cfg: DataConfig,
    fetch: Fetch | None = None,
    teacher_tokenizer: str | Path | None = None,
    transfer_source: str | None = None,
) -> Splits:
    """Load, validate, split and normalize ``cfg.source`` (and ``cfg.test_source``, and a transfer set).

    Text data (``cfg.text_column``) is split the same way, then tokenized into int64 ids
    ``[N, max_length]`` (not normalized); ``meta.text`` and ``Splits.tokenizer`` say how.

    An image folder or image table is read in one streaming pass and comes back as a manifest
    (``Splits.manifest`` and ``meta.manifest``: sample ids and labels per split, ``x`` empty):
    ``save_splits`` writes it and ``kd_lib.data.lazy.open_splits`` reads the samples back.

    Without ``test_source``, one seeded stratified split gives train/val/test; with it, the
    test split is that whole file and train/val are split from ``source``. Normalization
    statistics come from the train split only (no test leakage); they travel in the metadata
    so the registered model applies the same transform.

    A transfer set (``transfer_source``: unlabeled samples in the format of ``cfg.source``) is
    encoded like the train split, normalized with its statistics or tokenized with its
    tokenizer, into ``Splits.transfer``; ``meta.transfer`` records its size and fingerprint, and
    the dataset's fingerprint covers it.

    Args:
        cfg: the ``data`` section of the pipeline config.
        fetch: downloads an ``s3://`` source (``Fetch``), e.g. ``kd_lib.adapters.storage.fetch``
            bound to ``tracking.retry``; local sources need none.
        teacher_tokenizer: Text data: the teacher's own ``tokenizer.json``, used with
            ``data.tokenizer: auto`` (else a tokenizer is trained on the train split).
        transfer_source: ``distill.transfer_source``: a local path or ``s3://`` URI of unlabeled
            samples, read by ``read_source(..., labeled=False)``; None for no transfer set.

    Raises:
        DataError: the data is missing, unreadable, mislabeled or inconsistent (naming the file),
            or a source is remote and no ``fetch`` was given.
        Exception: whatever ``fetch`` raises for a source it cannot download
            (``kd_lib.adapters.storage.StorageError`` in a pipeline).
    """
    teacher = Path(teacher_tokenizer) if teacher_tokenizer is not None else None
    with tempfile.TemporaryDirectory(prefix="kdflow-data-") as scratch:
        if cfg.text_column is None and source_kind(cfg.source) in STREAMED_KINDS:
            return _prepare_streamed(cfg, Path(scratch), fetch, transfer_source)
        train = read_source(cfg.source, cfg, Path(scratch) / "source", fetch)
        test = None
        if cfg.test_source is not None:
            test = read_source(cfg.test_source, cfg, Path(scratch) / "test_source", fetch)
        transfer = None
        if transfer_source is not None:
            unlabeled = read_source(transfer_source, cfg, Path(scratch) / "transfer_source", fetch, labeled=False)
            transfer = (transfer_source, unlabeled)
        if cfg.text_column is not None:
            choice = _text_tokenizer(cfg, Path(scratch) / "tokenizer", fetch, teacher)
            return _prepare_text(cfg, train, test, choice, transfer)
    x, y = train.x, train.y
    num_classes = validate(x, y, cfg.num_classes, origin=cfg.source)
    _check_all_present(y, num_classes, cfg.source)
    fp = fingerprint(x, y)
    if test is None:
        idx = dict(zip(SPLIT_NAMES, stratified_split(y, cfg.val_fraction, cfg.test_fraction, cfg.seed), strict=True))
        xs = {name: x[i] for name, i in idx.items()}
        ys = {name: y[i] for name, i in idx.items()}
    else:
        assert cfg.test_source is not None
        test = _align_test(train, test, cfg.source, cfg.test_source)
        validate(test.x, test.y, num_classes, origin=cfg.test_source)
        if test.x.shape[1:] != x.shape[1:]:
            raise DataError(
                f"{cfg.test_source}: samples have shape {list(test.x.shape[1:])} but those of {cfg.source} "
                f"{list(x.shape[1:])}; both files must hold the same kind of sample"
            )
        train_idx, val_idx, _ = stratified_split(y, cfg.val_fraction, 0.0, cfg.seed)
        xs = {"train": x[train_idx], "val": x[val_idx], "test": test.x}
        ys = {"train": y[train_idx], "val": y[val_idx], "test": test.y}
        # Which file is test is part of what the data is: two sha256s in one.
        fp = hashlib.sha256(f"{fp}:{fingerprint(test.x, test.y)}".encode()).hexdigest()
    x_transfer, transfer_meta = None, None
    if transfer is not None:
        transfer_source, unlabeled = transfer
        _check_samples(unlabeled.x, transfer_source)
        if unlabeled.x.shape[1:] != x.shape[1:]:
            raise DataError(
                f"{transfer_source}: samples have shape {list(unlabeled.x.shape[1:])} but those of {cfg.source} "
                f"{list(x.shape[1:])}; a transfer set holds the same kind of sample as the data"
            )
        x_transfer = unlabeled.x
        transfer_fp = fingerprint(unlabeled.x, unlabeled.y)
        transfer_meta = TransferMeta(source=transfer_source, size=len(unlabeled.x), fingerprint=transfer_fp)
    norm = normalization_stats(xs["train"])
    xs = {name: normalize(v, norm) for name, v in xs.items()}
    meta = _sample_meta(cfg, fp, transfer_meta, num_classes, list(x.shape[1:]), ys, norm, train.class_names)
    # The train split's statistics: the transfer samples are inputs like any other, not a split to fit.
    transfer_x = normalize(x_transfer, norm) if x_transfer is not None else None
    return Splits(x=xs, y=ys, meta=meta, transfer=transfer_x)


def _sample_meta(
    cfg: DataConfig,
    fp: str,
    transfer: TransferMeta | None,
    num_classes: int,
    input_shape: list[int],
    ys: dict[str, np.ndarray],
    normalization: dict[str, float | list[float]],
    class_names: list[str],
    manifest: ManifestMeta | None = None,
) -> DatasetMeta:
    """The metadata of prepared samples (arrays or a manifest; text has its own, ``_prepare_text``)."""
    return DatasetMeta(
        source=cfg.source,
        fingerprint=_with_transfer_fingerprint(fp, transfer),
        num_classes=num_classes,
        input_shape=input_shape,
        sizes={name: int(ys[name].size) for name in SPLIT_NAMES},
        class_counts={name: np.bincount(ys[name], minlength=num_classes).tolist() for name in SPLIT_NAMES},
        normalization=normalization,
        class_names=list(class_names),
        test_source=cfg.test_source,
        transfer=transfer,
        manifest=manifest,
    )


def _prepare_streamed(cfg: DataConfig, scratch: Path, fetch: Fetch | None, transfer_source: str | None) -> Splits:
    """``prepare`` for an image folder or table: one streaming pass per source, and a manifest
    (sample ids and labels per split) instead of the decoded samples (``Splits.manifest``)."""

    def scan(source: str, name: str, labeled: bool = True, columns: stream.TableColumns | None = None):
        local = local_path(source, scratch / name, fetch)
        return _scan(source_kind(source), local, source, cfg, labeled, columns=columns)

    train = scan(cfg.source, "source")
    y = train.y
    num_classes = _label_count(y, cfg.num_classes, cfg.source)
    _check_all_present(y, num_classes, cfg.source)
    fp = train.fingerprint
    if cfg.test_source is None:
        train_idx, val_idx, test_idx = stratified_split(y, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        ids = {"train": train.ids[train_idx], "val": train.ids[val_idx], "test": train.ids[test_idx]}
        ys = {"train": y[train_idx], "val": y[val_idx], "test": y[test_idx]}
    else:
        test = scan(cfg.test_source, "test_source", columns=train.columns)
        empty = np.empty((0,), dtype=np.float32)
        aligned = _align_test(
            Labeled(empty, y, train.class_names), Labeled(empty, test.y, test.class_names), cfg.source, cfg.test_source
        )
        _label_count(aligned.y, num_classes, cfg.test_source)
        if test.sample_shape != train.sample_shape:
            raise DataError(
                f"{cfg.test_source}: samples have shape {test.sample_shape} but those of {cfg.source} "
                f"{train.sample_shape}; both files must hold the same kind of sample"
            )
        train_idx, val_idx, _ = stratified_split(y, cfg.val_fraction, 0.0, cfg.seed)
        ids = {"train": train.ids[train_idx], "val": train.ids[val_idx], "test": test.ids}
        ys = {"train": y[train_idx], "val": y[val_idx], "test": aligned.y}
        fp = hashlib.sha256(f"{fp}:{test.fingerprint}".encode()).hexdigest()
    sources = {"train": cfg.source, "val": cfg.source, "test": cfg.test_source or cfg.source}
    transfer_meta = None
    if transfer_source is not None:
        unlabeled = scan(transfer_source, "transfer_source", labeled=False, columns=train.columns)
        if unlabeled.sample_shape != train.sample_shape:
            raise DataError(
                f"{transfer_source}: samples have shape {unlabeled.sample_shape} but those of {cfg.source} "
                f"{train.sample_shape}; a transfer set holds the same kind of sample as the data"
            )
        ids["transfer"] = unlabeled.ids
        sources["transfer"] = transfer_source
        transfer_meta = TransferMeta(source=transfer_source, size=len(unlabeled.ids), fingerprint=unlabeled.fingerprint)
    shape = train.sample_shape
    norm = stats_from_sums(train.sums[train_idx], train.sumsq[train_idx], values_per_sample(shape))
    columns = train.columns
    manifest_meta = ManifestMeta(
        kind="folder" if columns is None else "table",
        sources=sources,
        image_mode=cfg.image_mode,
        image_size=cfg.image_size,
        label_column=cfg.label_column,
        pixel_column=columns.pixel_column if columns is not None else None,
        feature_columns=columns.feature_columns if columns is not None else None,
        image_shape=columns.image_shape if columns is not None else None,
    )
    meta = _sample_meta(cfg, fp, transfer_meta, num_classes, shape, ys, norm, train.class_names, manifest_meta)
    return Splits(x={}, y=ys, meta=meta, manifest=Manifest(ids=ids, y=ys))
