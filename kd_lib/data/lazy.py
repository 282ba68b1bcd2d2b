"""Samples read on demand: the splits of a dataset prepared as a manifest.

An image folder or image table is prepared as a manifest (``kd_lib.artifacts.dataset_dir``):
sample ids and labels, no samples. ``open_splits`` turns each split into a ``LazySamples``, which
a training loop, ``compute_logits`` or an evaluation indexes like a tensor ``[N, *input_shape]``
(``x[idx]``, ``x[a:b]``, ``len(x)``, ``x.shape``): only the samples asked for are decoded, and
normalized with the train split's statistics on the way out.

- Image folders: each image file is decoded when its sample is read (in ``DataLoader`` workers
  when the loop has them: ``kd_lib.train.loop``).
- Tables: the file is read once per step, in row batches, into a file of fixed-size float32
  records in the step's scratch directory; a sample is one ``os.pread`` of its record, so memory
  holds no more than a batch and the operating system's page cache does the rest.
- ``s3://`` sources are downloaded once per step, into the same scratch directory.

Datasets prepared as arrays (``splits.npz``: builtin digits, a shipped sample, an ``.npz``, text)
come back as they always did, numpy arrays in memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from kd_lib.artifacts.dataset_dir import SPLIT_NAMES, ManifestMeta, Splits, load_splits
from kd_lib.config import source_kind
from kd_lib.data import stream
from kd_lib.data.dataset import Fetch, local_path
from kd_lib.data.errors import DataError
from kd_lib.data.normalization import normalize


def _positions(index: Any, count: int) -> tuple[np.ndarray, bool]:
    """An index as sample positions ``[B]`` int64, and whether it was a single int (squeeze)."""
    if isinstance(index, slice):
        return np.arange(*index.indices(count), dtype=np.int64), False
    if isinstance(index, (int, np.integer)):
        return np.asarray([index], dtype=np.int64), True
    if isinstance(index, Tensor):
        index = index.detach().cpu().numpy()
    positions = np.asarray(index, dtype=np.int64).reshape(-1)
    positions = np.where(positions < 0, positions + count, positions)
    if positions.size and (positions.min() < 0 or positions.max() >= count):
        raise IndexError(f"sample index out of range for {count} samples")
    return positions, False


class LazySamples(Dataset[Tensor]):
    """``[N, *sample_shape]`` float32 samples read when indexed, normalized with ``normalization``.

    Indexing (an int, a slice, a tensor or array of positions) returns a float32 tensor, as
    indexing the split's tensor would; ``numpy`` returns the same values as an array, and
    ``np.asarray(samples)`` reads the whole split (for small data and tests). A
    ``torch.utils.data.Dataset`` of single samples, so any ``DataLoader`` can read it; the
    training loop reads whole batches per item instead (``kd_lib.train.loop``). Subclasses read
    raw samples (``_read``).
    """

    dtype = torch.float32

    def __init__(self, count: int, sample_shape: Sequence[int], normalization: dict[str, Any]) -> None:
        self._count = int(count)
        self._shape = tuple(int(d) for d in sample_shape)
        self._normalization = dict(normalization)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self._count, *self._shape))

    @property
    def ndim(self) -> int:
        return 1 + len(self._shape)

    def __len__(self) -> int:
        return self._count

    def _read(self, positions: np.ndarray) -> np.ndarray:
        """Raw samples ``[B, *sample_shape]`` float32 at ``positions``."""
        raise NotImplementedError

    def numpy(self, index: Any = slice(None)) -> np.ndarray:
        """The samples at ``index``, normalized, as a float32 array."""
        positions, single = _positions(index, self._count)
        if positions.size == 0:
            return np.empty((0, *self._shape), dtype=np.float32)
        x = normalize(self._read(positions), self._normalization)
        return x[0] if single else x

    def __getitem__(self, index: Any) -> Tensor:
        return torch.from_numpy(self.numpy(index))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        x = self.numpy()
        return x if dtype is None else x.astype(dtype)

    def map(self, transform: Callable[[Tensor], Tensor]) -> LazySamples:
        """A view whose every read goes through ``transform`` (a batch ``[B, ...]`` -> ``[B, ...]``
        of the same shape): e.g. a model's own input normalization."""
        return _Mapped(self, transform)


class ImageFiles(LazySamples):
    """An image folder's samples: ``paths`` relative to ``root``, decoded per read (``mode``, ``size``)."""

    def __init__(
        self,
        root: Path,
        origin: str,
        paths: np.ndarray,
        sample_shape: Sequence[int],
        normalization: dict[str, Any],
        mode: str,
        size: Sequence[int] | None,
    ) -> None:
        super().__init__(len(paths), sample_shape, normalization)
        self._root, self._origin, self._paths = Path(root), origin, paths
        self._mode, self._size = mode, list(size) if size is not None else None

    def _read(self, positions: np.ndarray) -> np.ndarray:
        # The shape prepare_data saw: an image replaced since then is an error naming it.
        first = (f"{self._origin.rstrip('/')} as prepared", self._shape)
        paths = [str(self._paths[i]) for i in positions]
        return stream.read_images(self._root, paths, self._origin, self._mode, self._size, first)


class RecordFile:
    """Fixed-size float32 records, one per row of a table, read with ``os.pread``: random access
    without holding the table in memory. The file descriptor is opened per process, so forked
    ``DataLoader`` workers each get their own."""

    def __init__(self, path: Path, count: int, sample_shape: Sequence[int]) -> None:
        self.path, self.count, self.sample_shape = Path(path), int(count), tuple(sample_shape)
        self._bytes = 4 * int(np.prod(self.sample_shape))
        self._fd: tuple[int, int] | None = None  # (pid, fd)

    def read(self, rows: np.ndarray) -> np.ndarray:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        fd, size = self._fd[1], self._bytes
        out = np.empty((len(rows), *self.sample_shape), dtype=np.float32)
        flat = out.reshape(len(rows), -1)
        for k, row in enumerate(rows):
            flat[k] = np.frombuffer(os.pread(fd, size, int(row) * size), dtype=np.float32)
        return out

    @classmethod
    def write(cls, local: Path, kind: str, origin: str, columns: stream.TableColumns, path: Path) -> RecordFile:
        """Read the table at ``local`` in row batches into ``path``: its samples, raw, in row order."""
        count, shape = 0, None
        with open(path, "wb") as out:
            for _, x, _ in stream.table_chunks(local, kind, origin, columns, labeled=False):
                out.write(np.ascontiguousarray(x, dtype=np.float32).tobytes())
                count, shape = count + len(x), shape or x.shape[1:]
        if shape is None:
            raise DataError(f"{origin}: the table has no rows now; re-run prepare_data")
        return cls(path, count, shape)


class TableRows(LazySamples):
    """A table's samples: its ``rows`` in a ``RecordFile``."""

    def __init__(self, records: RecordFile, rows: np.ndarray, origin: str, normalization: dict[str, Any]) -> None:
        super().__init__(len(rows), records.sample_shape, normalization)
        self._records, self._rows = records, np.asarray(rows, dtype=np.int64)
        if len(self._rows) and int(self._rows.max()) >= records.count:
            raise DataError(
                f"{origin}: the manifest names row {int(self._rows.max())} but the table has {records.count} rows "
                "now; re-run prepare_data"
            )

    def _read(self, positions: np.ndarray) -> np.ndarray:
        return self._records.read(self._rows[positions])


class Concat(LazySamples):
    """Two sets of samples of one shape, one after the other (a train split and its transfer set)."""

    def __init__(self, first: LazySamples, second: LazySamples) -> None:
        if first.shape[1:] != second.shape[1:]:
            raise ValueError(f"cannot concatenate samples of shapes {list(first.shape)} and {list(second.shape)}")
        super().__init__(len(first) + len(second), first.shape[1:], {})
        self._parts = (first, second)

    def numpy(self, index: Any = slice(None)) -> np.ndarray:
        positions, single = _positions(index, self._count)
        first, second = self._parts
        out = np.empty((len(positions), *self._shape), dtype=np.float32)
        head = positions < len(first)
        if head.any():
            out[head] = first.numpy(positions[head])
        if (~head).any():
            out[~head] = second.numpy(positions[~head] - len(first))
        return out[0] if single else out


class _Mapped(LazySamples):
    def __init__(self, inner: LazySamples, transform: Callable[[Tensor], Tensor]) -> None:
        super().__init__(len(inner), inner.shape[1:], {})
        self._inner, self._transform = inner, transform

    def numpy(self, index: Any = slice(None)) -> np.ndarray:
        positions, single = _positions(index, self._count)
        with torch.no_grad():
            x = self._transform(self._inner[positions]).numpy()
        return x[0] if single else x


# What training and inference index: a split's tensor, or its samples read lazily.
Samples = Union[Tensor, LazySamples]  # noqa: UP007 - a runtime alias: X | Y of classes needs Python 3.10 types


def open_splits(
    directory: str | Path, scratch: str | Path, fetch: Fetch | None = None, transfer: bool = False
) -> Splits:
    """A prepared dataset directory's splits, ready to index: arrays as saved, or for a manifest
    ``LazySamples`` reading from the sources it names.

    Args:
        directory: The prepared dataset directory (``prepare_data``'s output).
        scratch: A directory the caller keeps while the splits are used and removes afterwards:
            downloads of ``s3://`` sources and tables' record files go there.
        fetch: Downloads an ``s3://`` source (``kd_lib.adapters.storage.fetch``); local sources need none.
        transfer: Also open the transfer set (``Splits.transfer``) when there is one.

    Raises:
        ArtifactError: the directory is not a prepared dataset.
        DataError: a source named by the manifest is gone or no longer matches it.
    """
    splits = load_splits(directory, transfer=transfer)
    if splits.manifest is None:
        return splits
    meta, manifest = splits.meta, splits.manifest
    described = meta.manifest
    assert described is not None  # load_splits returns a manifest only with meta.manifest
    scratch = Path(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    opened: dict[str, Any] = {}  # source -> local folder, or a table's RecordFile

    def source_of(name: str) -> Any:
        source = described.sources[name]
        if source not in opened:
            local = local_path(source, scratch / f"source{len(opened)}", fetch)
            if described.kind == "table":
                records = scratch / f"source{len(opened)}.f32"
                opened[source] = RecordFile.write(local, source_kind(source), source, _columns(described), records)
            else:
                opened[source] = local
        return opened[source]

    def samples(name: str) -> LazySamples:
        source, ids = described.sources[name], manifest.ids[name]
        if described.kind == "table":
            return TableRows(source_of(name), ids, source, meta.normalization)
        return ImageFiles(
            source_of(name),
            source,
            ids,
            meta.input_shape,
            meta.normalization,
            described.image_mode,
            described.image_size,
        )

    splits.x = {name: samples(name) for name in SPLIT_NAMES}
    if "transfer" in manifest.ids:
        splits.transfer = samples("transfer")
    return splits


def _columns(described: ManifestMeta) -> stream.TableColumns:
    return stream.TableColumns(
        described.label_column, described.pixel_column, described.feature_columns, described.image_shape
    )
