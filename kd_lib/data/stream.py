"""Image folders and image tables read one chunk of samples at a time.

An image folder (``root/<class>/<image>``) is listed first (paths and labels, nothing decoded),
then decoded file by file; a ``.csv`` or ``.parquet`` table is read in row batches with pyarrow
(``pyarrow.csv.open_csv``, ``ParquetFile.iter_batches``). Either way no more than one chunk of
decoded samples is in memory at once. ``scan`` makes the one pass ``prepare_data`` needs over a
source: it checks every sample, computes the fingerprint and keeps per-sample sums for the
train split's normalization statistics; ``kd_lib.data.lazy`` reads samples back in later steps
with the same decoders. Samples are float32 ``[C, H, W]`` images (0..255) or flat features,
before normalization.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from kd_lib.data.errors import DataError
from kd_lib.data.normalization import sample_sums

if TYPE_CHECKING:
    import pandas as pd

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# The labels of samples read without them (a transfer set).
NO_LABEL = -1
# Samples decoded per chunk: bounds prepare_data's memory, whatever the source's size.
CHUNK = 1024


@dataclass(frozen=True)
class TableColumns:
    """How a table's rows become samples: the label column, and one pixel column (reshaped to
    ``image_shape``) or feature columns (None: every column but the label's, resolved on read)."""

    label_column: str = "label"
    pixel_column: str | None = None
    feature_columns: list[str] | None = None
    image_shape: list[int] | None = None


# ------------------------------------------------------------------ image folders


def image_files(folder: Path, skip_hidden: bool = False) -> list[Path]:
    """The PNG/JPEG files under ``folder``, sub-folders included, sorted (``skip_hidden``: not
    those inside a hidden folder, ``.git``). Other files (README, .DS_Store) are not samples."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not (skip_hidden and any(part.startswith(".") for part in p.relative_to(folder).parts[:-1]))
    )


def list_folder(root: Path, origin: str, labeled: bool = True) -> tuple[list[str], np.ndarray, list[str]]:
    """An image folder's samples without decoding them: (paths relative to ``root`` in posix
    form, labels [N] int64 by sorted class folder name, class names). Without ``labeled`` every
    image under ``root`` is a sample (class folders optional) and the labels are ``NO_LABEL``."""
    shown_root = origin.rstrip("/")
    if not labeled:
        found = image_files(root, skip_hidden=True)
        if not found:
            raise DataError(f"{origin}: no PNG/JPEG images in the folder or its sub-folders; add some or fix the path")
        return [p.relative_to(root).as_posix() for p in found], np.full(len(found), NO_LABEL, np.int64), []
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{origin}: no class sub-folders; lay the images out as {shown_root}/<class name>/<image>.png")
    paths: list[str] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        found = image_files(class_dir)
        if not found:
            raise DataError(
                f"{shown_root}/{class_dir.name}: class folder has no PNG/JPEG images; add some or remove the folder"
            )
        paths += [p.relative_to(root).as_posix() for p in found]
        labels += [label] * len(found)
    return paths, np.array(labels, dtype=np.int64), [d.name for d in class_dirs]


def read_image(path: Path, shown: str, mode: str, size: Sequence[int] | None) -> np.ndarray:
    """One image file -> ``[C, H, W]`` float32 (0..255); C is 1 for mode L, 3 for RGB."""
    from PIL import Image, UnidentifiedImageError  # lazy: Pillow only for image-folder sources

    try:
        with Image.open(path) as opened:
            img = opened.convert(mode)  # decodes: truncated or corrupt data fails here
            if size is not None:
                img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(img, dtype=np.float32)
    except FileNotFoundError:
        raise DataError(
            f"{shown}: no such image (it was listed when the data was prepared); restore it or re-run prepare_data"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        # SyntaxError is how some Pillow plugins report a file that is not what its header says.
        raise DataError(f"{shown}: not a readable image ({err}); re-export it as PNG or JPEG, or remove it") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def read_images(
    root: Path,
    paths: Sequence[str],
    origin: str,
    mode: str,
    size: Sequence[int] | None,
    first: tuple[str, tuple[int, ...]] | None = None,
) -> np.ndarray:
    """The files ``root/<path>`` as images ``[B, C, H, W]`` float32, all of one shape: ``first``'s
    (the shown path and shape of the source's first image), else the first of ``paths``."""
    shown_root = origin.rstrip("/")
    images: list[np.ndarray] = []
    for path in paths:
        arr = read_image(root / path, f"{shown_root}/{path}", mode, size)
        if first is None:
            first = (f"{shown_root}/{path}", arr.shape)
        elif arr.shape != first[1]:
            raise DataError(
                f"{shown_root}/{path}: image is {arr.shape[1]}x{arr.shape[2]} (HxW) but {first[0]} is "
                f"{first[1][1]}x{first[1][2]}; set data.image_size: [H, W] to resize every image, or fix this one"
            )
        images.append(arr)
    return np.stack(images)


# ------------------------------------------------------------------ tables


def table_batches(path: Path, kind: str, origin: str, rows: int = CHUNK) -> Iterator[pd.DataFrame]:
    """A ``.csv`` or ``.parquet`` file as pandas DataFrames of at most ``rows`` rows each, read
    with pyarrow one row batch at a time. An empty string in a CSV cell is missing, as in pandas."""
    import pyarrow  # lazy: pyarrow only for table sources
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    if not path.is_file():
        raise DataError(f"{origin}: no such file; set data.source (or data.test_source) to an existing .{kind} file")
    try:
        if kind == "csv":
            reader = pcsv.open_csv(
                path,
                read_options=pcsv.ReadOptions(block_size=1 << 20),
                convert_options=pcsv.ConvertOptions(strings_can_be_null=True),
            )
            batches: Iterator = iter(reader)
        else:
            batches = pq.ParquetFile(path).iter_batches(batch_size=rows)
        for batch in batches:
            df = batch.to_pandas()
            for start in range(0, len(df), rows):
                yield df.iloc[start : start + rows]
    except (ValueError, OSError, pyarrow.ArrowException) as err:
        # pyarrow's parse errors are ArrowInvalid (a ValueError), UnicodeDecodeError included.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{origin}: not a readable {kind} file ({first}); re-export it as {kind}") from None


def _absent(columns: list[str], wanted: list[str], role: str, origin: str) -> None:
    missing = [c for c in wanted if c not in columns]
    if missing:
        what = f"{role} column {missing[0]!r}" if len(wanted) == 1 else f"{role} column(s) {missing}"
        field_name = f"data.{role}_columns" if role == "feature" else f"data.{role}_column"
        raise DataError(f"{origin}: no {what}; the file has columns {columns}. Set {field_name} to the right name")


def resolve_features(columns: list[str], spec: TableColumns, origin: str, labeled: bool) -> TableColumns:
    """``spec`` with its columns checked against the file's, and ``feature_columns`` filled in
    (every column but the label's) when neither they nor a pixel column are named."""
    if labeled:
        _absent(columns, [spec.label_column], "label", origin)
    if spec.pixel_column is not None:
        _absent(columns, [spec.pixel_column], "pixel", origin)
        return spec
    features = spec.feature_columns or [c for c in columns if c != spec.label_column]
    _absent(columns, features, "feature", origin)
    if not features:
        raise DataError(f"{origin}: no feature columns besides the label column {spec.label_column!r}")
    return TableColumns(spec.label_column, None, list(features), spec.image_shape)


def _pixel_column(column: pd.Series, name: str, image_shape: list[int], origin: str, row0: int) -> np.ndarray:
    """Each cell one sample's flattened pixels -> ``[B, *image_shape]`` float32."""
    need = int(np.prod(image_shape))
    out = np.empty((len(column), need), dtype=np.float32)
    for i, cell in enumerate(column.to_numpy()):
        try:
            if isinstance(cell, str):  # CSV: "0 12 255 ..."
                values = np.array(cell.split(), dtype=np.float32)
            else:  # parquet: a list (read back as an array)
                values = np.asarray(cell, dtype=np.float32).reshape(-1)
        except (ValueError, TypeError):
            raise DataError(
                f"{origin}: pixel column {name!r}, data row {row0 + i}: not a list of numbers ({str(cell)[:40]!r}); "
                "write each row's pixels as space-separated numbers (CSV) or a list of numbers (parquet)"
            ) from None
        if values.size != need:
            raise DataError(
                f"{origin}: pixel column {name!r} has {values.size} values in data row {row0 + i} but data.image_shape "
                f"{image_shape} needs {need}; fix image_shape (C, H, W) or the data"
            )
        out[i] = values
    return out.reshape(len(column), *image_shape)


def reshape(x: np.ndarray, image_shape: Sequence[int] | None, origin: str) -> np.ndarray:
    """``[N, F]`` -> ``[N, *image_shape]`` when an image shape is declared."""
    if image_shape is None or x.ndim < 2:
        return x
    per_sample = int(np.prod(x.shape[1:]))
    if per_sample != int(np.prod(image_shape)):
        raise DataError(
            f"{origin}: samples have {per_sample} features but data.image_shape {list(image_shape)} needs "
            f"{int(np.prod(image_shape))}; fix image_shape (C, H, W) or the data"
        )
    return x.reshape(x.shape[0], *image_shape)


def table_samples(df: pd.DataFrame, spec: TableColumns, origin: str, row0: int) -> np.ndarray:
    """The samples of rows ``row0 ..`` of a table (``spec`` resolved): ``[B, *shape]`` float32."""
    import pandas as pd  # lazy: pandas only for table sources

    if spec.pixel_column is not None:
        assert spec.image_shape is not None  # DataConfig requires it with pixel_column
        return _pixel_column(df[spec.pixel_column], spec.pixel_column, spec.image_shape, origin, row0)
    features = spec.feature_columns or []
    for c in features:
        # A column with no value at all has no type to speak of (pyarrow reads it as null): it is empty.
        if not pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any():
            example = df[c].dropna().iloc[0] if df[c].notna().any() else None
            raise DataError(
                f"{origin}: feature column {c!r} is not numeric (dtype {df[c].dtype}, e.g. {example!r}); "
                "convert it to numbers, or leave it out by listing the numeric columns in data.feature_columns"
            )
    empty = [c for c in features if df[c].isna().any()]
    if empty:
        raise DataError(f"{origin}: feature column(s) {empty[:5]} have empty cells; fill in or drop those rows")
    return reshape(df[features].to_numpy(dtype=np.float32), spec.image_shape, origin)


def table_labels(column: pd.Series, name: str, origin: str) -> tuple[np.ndarray, list[str]]:
    """A label column -> (``y`` [N] int64, class names): integer ids as they are, names sorted."""
    import pandas as pd  # lazy: pandas only for table sources

    missing = column.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"{origin}: label column {name!r} is empty in {int(missing.sum())} row(s) (first: data row "
            f"{int(np.flatnonzero(missing)[0])}); fill in or drop those rows"
        )
    if pd.api.types.is_bool_dtype(column):
        return column.to_numpy().astype(np.int64), []
    if pd.api.types.is_numeric_dtype(column):
        values = column.to_numpy()
        whole = np.isfinite(values) & (values == np.round(values))
        if not whole.all():
            bad = values[~whole][:3].tolist()
            raise DataError(
                f"{origin}: label column {name!r} holds non-integer numbers (e.g. {bad}); "
                "use class ids 0..num_classes-1 or class names"
            )
        return values.astype(np.int64), []
    # Class names ("cat", "dog"): ids in sorted order, so the same names give the same ids.
    text = column.astype(str).to_numpy()
    names = sorted(set(text.tolist()))
    lookup = {n: i for i, n in enumerate(names)}
    return np.array([lookup[t] for t in text], dtype=np.int64), names


def table_chunks(
    path: Path, kind: str, origin: str, spec: TableColumns, labeled: bool = True
) -> Iterator[tuple[TableColumns, np.ndarray, pd.Series | None]]:
    """A table's samples chunk by chunk: (the resolved columns, samples ``[B, *shape]``, the raw
    label cells or None without ``labeled``)."""
    row0 = 0
    resolved: TableColumns | None = None
    for df in table_batches(path, kind, origin):
        df.columns = [str(c) for c in df.columns]
        if resolved is None:
            resolved = resolve_features(list(df.columns), spec, origin, labeled)
        labels = df[resolved.label_column] if labeled else None
        yield resolved, table_samples(df, resolved, origin, row0), labels
        row0 += len(df)


# ------------------------------------------------------------------ one pass over a source


class Fingerprint:
    """sha256 of samples fed in order, then their shape and the labels: the same digest for the
    same samples whether they came as one array or chunk by chunk (``kd_lib.data.dataset.fingerprint``)."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()
        self._n = 0

    def update(self, x: np.ndarray) -> None:
        self._h.update(np.ascontiguousarray(x, dtype=np.float32).tobytes())
        self._n += len(x)

    def hexdigest(self, sample_shape: Sequence[int], y: np.ndarray) -> str:
        y = np.ascontiguousarray(y, dtype=np.int64)
        self._h.update(f"<f4{(self._n, *sample_shape)}|{y.dtype.str}{y.shape}".encode())
        self._h.update(y.tobytes())
        return self._h.hexdigest()


@dataclass
class Scanned:
    """What one pass over a source found (``scan``).

    Attributes:
        ids: Sample ids: paths relative to the folder (str) or row numbers (int64).
        y: Labels [N] int64 (``NO_LABEL`` without labels); class names index them when set.
        class_names: Folder names, or a table's label names (sorted); empty for integer ids.
        sample_shape: One sample's shape.
        fingerprint: ``Fingerprint`` of the samples and labels.
        sums: ``[N, K]`` float64 per-sample (per-channel) sums of values, and ``sumsq`` of their squares
            (``kd_lib.data.normalization.sample_sums``), for statistics over any subset.
        columns: Tables: the columns the samples were read from (resolved).
        x: The samples, when the scan was asked to keep them (``keep=True``).
    """

    ids: np.ndarray
    y: np.ndarray
    class_names: list[str]
    sample_shape: list[int]
    fingerprint: str
    sums: np.ndarray
    sumsq: np.ndarray
    columns: TableColumns | None = None
    x: np.ndarray | None = field(default=None, repr=False)


def _check_chunk(x: np.ndarray, first_shape: list[int] | None, origin: str, start: int) -> None:
    if x[0].size == 0:
        raise DataError(f"{origin}: samples have shape {list(x.shape[1:])}: they have no features")
    if first_shape is not None and list(x.shape[1:]) != first_shape:
        raise DataError(
            f"{origin}: samples from {start} have shape {list(x.shape[1:])} but the first ones {first_shape}"
        )
    bad = ~np.isfinite(x)
    if bad.any():
        first = start + int(np.argwhere(bad.reshape(x.shape[0], -1).any(axis=1))[0, 0])
        raise DataError(
            f"{origin}: 'x' contains NaN/inf value(s) (first in sample {first}); clean or drop those samples"
        )


def scan(
    kind: str,
    local: Path,
    origin: str,
    labeled: bool = True,
    mode: str = "L",
    size: Sequence[int] | None = None,
    columns: TableColumns | None = None,
    keep: bool = False,
) -> Scanned:
    """One pass over an image folder (``kind`` ``folder``) or a table (``csv`` / ``parquet``):
    every sample decoded and checked, one chunk at a time.

    Args:
        kind: ``folder``, ``csv`` or ``parquet``.
        local: The folder or file on local disk.
        origin: The source as configured (what errors name).
        labeled: False: a transfer set; labels are ``NO_LABEL`` and a label column is optional.
        mode, size: Folders: ``data.image_mode`` and ``data.image_size``.
        columns: Tables: which columns are what.
        keep: Also return the samples (``Scanned.x``): for callers that want the arrays.

    Raises:
        DataError: a file, image, row or column that cannot be read, naming it.
    """
    fp, sums, sumsq, kept = Fingerprint(), [], [], []
    shape: list[int] | None = None
    start = 0
    resolved: TableColumns | None = None
    raw_labels: list[pd.Series] = []
    if kind == "folder":
        if not local.is_dir():
            raise DataError(f"{origin}: no such directory; set data.source to a folder with one sub-folder per class")
        paths, y, names = list_folder(local, origin, labeled)
        ids: np.ndarray = np.asarray(paths, dtype=np.str_)

        def chunks() -> Iterator[np.ndarray]:
            first: tuple[str, tuple[int, ...]] | None = None
            for i in range(0, len(paths), CHUNK):
                x = read_images(local, paths[i : i + CHUNK], origin, mode, size, first)
                first = first or (f"{origin.rstrip('/')}/{paths[0]}", x.shape[1:])
                yield x

        source: Iterator[np.ndarray] = chunks()
    else:

        def table() -> Iterator[np.ndarray]:
            nonlocal resolved
            for spec, x, labels in table_chunks(local, kind, origin, columns or TableColumns(), labeled):
                resolved = spec
                if labels is not None:
                    raw_labels.append(labels)
                yield x

        source = table()
    for x in source:
        if len(x) == 0:
            continue
        _check_chunk(x, shape, origin, start)
        shape = shape or list(x.shape[1:])
        fp.update(x)
        s, q = sample_sums(x)
        sums.append(s)
        sumsq.append(q)
        if keep:
            kept.append(x)
        start += len(x)
    if shape is None:
        raise DataError(f"{origin}: the dataset is empty")
    if kind != "folder":
        import pandas as pd  # lazy: pandas only for table sources

        if labeled:
            label = (columns or TableColumns()).label_column
            y, names = table_labels(pd.concat(raw_labels, ignore_index=True), label, origin)
        else:
            y, names = np.full(start, NO_LABEL, dtype=np.int64), []
        ids = np.arange(start, dtype=np.int64)
    return Scanned(
        ids=ids,
        y=y,
        class_names=names,
        sample_shape=shape,
        fingerprint=fp.hexdigest(shape, y),
        sums=np.concatenate(sums),
        sumsq=np.concatenate(sumsq),
        columns=resolved,
        x=np.concatenate(kept) if keep else None,
    )
