"""Load, validate, split and fingerprint a classification dataset.

Arrays on disk and between steps are numpy; ``x`` is float32 ``[N, *input_shape]`` (images
as ``[N, C, H, W]``), ``y`` is int64 ``[N]``. Nothing here is pickled: npz files are read with
``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from kd_lib.config import DataConfig

SPLITS_FILE = "splits.npz"
META_FILE = "meta.json"
SPLIT_NAMES = ("train", "val", "test")


class DataError(ValueError):
    """The dataset is missing, corrupt or mislabeled; the message names the file and the fix."""


@dataclass
class DatasetMeta:
    """What later steps (and the registered model) need to know about the data."""

    source: str
    fingerprint: str
    num_classes: int
    input_shape: list[int]
    sizes: dict[str, int]
    class_counts: dict[str, list[int]]
    normalization: dict[str, float] = field(default_factory=dict)


@dataclass
class Splits:
    """Normalized train/val/test arrays plus their metadata."""

    x: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    meta: DatasetMeta


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    # scikit-learn ships the 1,797 8x8 digits inside the wheel: no download.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :]  # [N, 1, 8, 8], values 0..16
    return x, bunch.target.astype(np.int64)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"{path}: no such file; set data.source to an existing .npz file or 'digits'")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("x", "y") if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {missing}; found {sorted(npz.files)}. "
                    "Save features as 'x' and labels as 'y' (np.savez(path, x=..., y=...))"
                )
            x, y = npz["x"], npz["y"]
    except DataError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err}); re-export it with np.savez") from None
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise DataError(f"{path}: labels 'y' have dtype {y.dtype}; expected integer class ids 0..num_classes-1")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{path}: features 'x' have dtype {x.dtype}; expected numbers")
    return x.astype(np.float32), y.astype(np.int64)


def load_source(source: str) -> tuple[np.ndarray, np.ndarray]:
    """Read ``data.source`` into ``(x [N, ...] float32, y [N] int64)`` without validating."""
    if source == "digits":
        return _load_digits()
    path = Path(source).expanduser()
    if path.suffix == ".npz":
        return _load_npz(path)
    raise DataError(f"data.source={source!r}: unsupported source; use 'digits' or a path ending in .npz")


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
    if x.shape[0] == 0:
        raise DataError(f"{origin}: the dataset is empty")
    if x[0].size == 0:
        raise DataError(f"{origin}: 'x' has shape {x.shape}: samples have no features")
    bad = ~np.isfinite(x)
    if bad.any():
        first = int(np.argwhere(bad.reshape(x.shape[0], -1).any(axis=1))[0, 0])
        raise DataError(
            f"{origin}: 'x' contains {int(bad.sum())} NaN/inf value(s) (first in sample {first}); clean or drop those samples"
        )
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


def fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    """sha256 over dtype, shape and bytes of x and y: changes if any sample or label does."""
    h = hashlib.sha256()
    for arr in (x, y):
        arr = np.ascontiguousarray(arr)
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def stratified_split(
    y: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded per-class split into train/val/test index arrays (each sorted).

    Every class keeps its proportion in each split; a class too small to appear in all
    three splits is an error rather than a silently missing class.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_NAMES}
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        if idx.size < 3:
            raise DataError(f"class {int(cls)} has {idx.size} sample(s); at least 3 are needed to split train/val/test")
        idx = rng.permutation(idx)
        n_test = max(1, int(round(idx.size * test_fraction)))
        n_val = max(1, int(round(idx.size * val_fraction)))
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    train, val, test = (np.sort(np.concatenate(parts[name])) for name in SPLIT_NAMES)
    return train, val, test


def prepare(cfg: DataConfig) -> Splits:
    """Load, validate, split and normalize ``cfg.source``.

    Normalization is one mean and std computed on the train split only (no test leakage);
    they travel in the metadata so the registered model applies the same transform.
    """
    x, y = load_source(cfg.source)
    num_classes = validate(x, y, cfg.num_classes, origin=cfg.source)
    present = np.unique(y)
    if present.size < num_classes:
        missing = sorted(set(range(num_classes)) - {int(c) for c in present})
        raise DataError(f"{cfg.source}: class(es) {missing} have no samples; fix the data or data.num_classes")
    fp = fingerprint(x, y)
    idx = dict(zip(SPLIT_NAMES, stratified_split(y, cfg.val_fraction, cfg.test_fraction, cfg.seed)))
    mean = float(x[idx["train"]].mean())
    std = float(x[idx["train"]].std()) or 1.0
    xs = {name: ((x[i] - mean) / std).astype(np.float32) for name, i in idx.items()}
    ys = {name: y[i] for name, i in idx.items()}
    meta = DatasetMeta(
        source=cfg.source,
        fingerprint=fp,
        num_classes=num_classes,
        input_shape=list(x.shape[1:]),
        sizes={name: int(i.size) for name, i in idx.items()},
        class_counts={name: np.bincount(ys[name], minlength=num_classes).tolist() for name in SPLIT_NAMES},
        normalization={"mean": mean, "std": std},
    )
    return Splits(x=xs, y=ys, meta=meta)


def save_splits(splits: Splits, directory: str | Path) -> Path:
    """Write ``splits.npz`` and ``meta.json`` into ``directory`` (a KFP Dataset artifact)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {f"x_{n}": splits.x[n] for n in SPLIT_NAMES} | {f"y_{n}": splits.y[n] for n in SPLIT_NAMES}
    np.savez(d / SPLITS_FILE, **arrays)
    (d / META_FILE).write_text(json.dumps(asdict(splits.meta), indent=2))
    return d


def load_splits(directory: str | Path) -> Splits:
    """Inverse of save_splits; raises DataError naming the file when it is missing or corrupt."""
    d = Path(directory)
    try:
        meta = DatasetMeta(**json.loads((d / META_FILE).read_text()))
        with np.load(d / SPLITS_FILE, allow_pickle=False) as npz:
            xs = {n: npz[f"x_{n}"] for n in SPLIT_NAMES}
            ys = {n: npz[f"y_{n}"] for n in SPLIT_NAMES}
    except (OSError, KeyError, TypeError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{d}: not a prepared kdflow dataset ({err}); re-run the prepare_data step") from None
    return Splits(x=xs, y=ys, meta=meta)
