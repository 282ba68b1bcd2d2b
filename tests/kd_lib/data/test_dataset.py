from pathlib import Path

import numpy as np
import pytest

from kd_lib.artifacts import ArtifactError
from kd_lib.artifacts.dataset_dir import SPLIT_NAMES, load_splits, save_splits
from kd_lib.config import DataConfig
from kd_lib.data import dataset as data


def _npz(tmp_path: Path, name: str = "d.npz", **arrays: np.ndarray) -> Path:
    p = tmp_path / name
    # allow_pickle is savez's default, passed by name so the type checker does not bind **arrays to it.
    np.savez(p, allow_pickle=True, **arrays)
    return p


def _toy(n_per_class: int = 20, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(classes), n_per_class)
    x = rng.normal(size=(y.size, 1, 4, 4)).astype(np.float32) + y[:, None, None, None]
    return x, y.astype(np.int64)


def test_builtin_digits_are_images_with_ten_classes() -> None:
    splits = data.prepare(DataConfig(source="digits"))
    assert splits.meta.input_shape == [1, 8, 8]
    assert splits.meta.num_classes == 10
    assert sum(splits.meta.sizes.values()) == 1797
    # Normalization comes from the train split only: there it is ~N(0, 1).
    assert abs(float(splits.x["train"].mean())) < 1e-4
    assert abs(float(splits.x["train"].std()) - 1.0) < 1e-3
    assert abs(float(splits.x["test"].mean())) > 1e-6


def test_npz_round_trip_and_stratification(tmp_path: Path) -> None:
    x, y = _toy(n_per_class=40)
    splits = data.prepare(DataConfig(source=str(_npz(tmp_path, x=x, y=y)), val_fraction=0.25, test_fraction=0.25))
    assert splits.meta.class_counts == {"train": [20, 20, 20], "val": [10, 10, 10], "test": [10, 10, 10]}
    out = load_splits(save_splits(splits, tmp_path / "ds"))
    for name in SPLIT_NAMES:
        np.testing.assert_array_equal(out.x[name], splits.x[name])
        np.testing.assert_array_equal(out.y[name], splits.y[name])
    assert out.meta == splits.meta


def test_split_is_seeded_disjoint_and_complete() -> None:
    _, y = _toy(n_per_class=30)
    a = data.stratified_split(y, 0.2, 0.2, seed=1)
    b = data.stratified_split(y, 0.2, 0.2, seed=1)
    c = data.stratified_split(y, 0.2, 0.2, seed=2)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not all(np.array_equal(u, v) for u, v in zip(a, c, strict=True))
    joined = np.concatenate(a)
    assert sorted(joined.tolist()) == list(range(y.size))


def test_fingerprint_changes_with_one_label() -> None:
    x, y = _toy()
    before = data.fingerprint(x, y)
    assert before == data.fingerprint(x.copy(), y.copy())
    y2 = y.copy()
    y2[5] = (y2[5] + 1) % 3
    assert data.fingerprint(x, y2) != before


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 2), np.float32)}, "missing array\\(s\\) \\['y'\\]"),
        ({"x": np.zeros((4, 2), np.float32), "y": np.zeros(5, np.int64)}, "4 samples in 'x' but 5 labels"),
        ({"x": np.array([[0.0, np.nan]] * 3, np.float32), "y": np.zeros(3, np.int64)}, "NaN/inf"),
        ({"x": np.zeros((3, 2), np.float32), "y": np.array([0, 1, -1])}, "outside 0..1"),
        ({"x": np.zeros((3, 2), np.float32), "y": np.array([0.0, 0.5, 1.0])}, "expected integer class ids"),
        ({"x": np.zeros(3, np.float32), "y": np.zeros(3, np.int64)}, "expected \\[N, features\\]"),
    ],
)
def test_bad_npz_is_a_clear_error_naming_the_file(tmp_path: Path, arrays: dict, message: str) -> None:
    path = _npz(tmp_path, **arrays)
    with pytest.raises(data.DataError, match=message) as err:
        data.prepare(DataConfig(source=str(path)))
    assert str(path) in str(err.value)


def test_labels_beyond_declared_classes_and_empty_classes(tmp_path: Path) -> None:
    x, y = _toy(classes=3)
    path = _npz(tmp_path, x=x, y=y)
    with pytest.raises(data.DataError, match="outside 0..1"):
        data.prepare(DataConfig(source=str(path), num_classes=2))
    with pytest.raises(data.DataError, match=r"class\(es\) \[3\] have no samples"):
        data.prepare(DataConfig(source=str(path), num_classes=4))
    # One stray huge label: named with a short list, without enumerating every missing id
    # (the fuzz test once drew a label of about 3e9 and the old code ran out of memory).
    y[0] = 5_000_000
    path = _npz(tmp_path, x=x, y=y)
    with pytest.raises(
        data.DataError, match=r"class\(es\) \[3, 4, 5, 6, 7, 8, 9, 10, 11, 12\] and 4999987 more have no samples"
    ) as err:
        data.prepare(DataConfig(source=str(path)))
    assert len(str(err.value)) < 300


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"this is not a zip archive")
    with pytest.raises(data.DataError, match="not a readable .npz"):
        data.prepare(DataConfig(source=str(bad)))
    with pytest.raises(data.DataError, match="no such file"):
        data.prepare(DataConfig(source=str(tmp_path / "absent.npz")))
    with pytest.raises(data.DataError, match="unsupported source"):
        data.prepare(DataConfig(source=str(tmp_path / "file.txt")))
    # A prepared dataset directory is an artifact between steps: its errors are ArtifactErrors.
    with pytest.raises(
        ArtifactError, match=r"not a prepared kdflow dataset \(.*meta\.json: missing\); re-run the prepare_data step"
    ):
        load_splits(tmp_path)


def test_tiny_classes_cannot_be_split(tmp_path: Path) -> None:
    x = np.zeros((5, 2), np.float32)
    y = np.array([0, 0, 0, 1, 1])
    with pytest.raises(data.DataError, match="class 1 has 2 sample"):
        data.prepare(DataConfig(source=str(_npz(tmp_path, x=x, y=y))))
