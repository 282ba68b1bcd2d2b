"""The MNIST digits shipped in the package (``data.source: mnist14``), and the script that made them."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from kd_lib.config import DataConfig, source_kind
from kd_lib.data import dataset as data
from kd_lib.data.samples.make_mnist14 import shrink

# data.fingerprint of the shipped arrays as loaded (x float32, y int64): any changed pixel or
# label, or another file in its place, changes it. Regenerating the file with make_mnist14.py
# from the same subset must keep it.
MNIST14_FINGERPRINT = "2a5a40f69d75ba8148aa5a8d8111e860451970f41095b0a9b93159afb3262f90"


def test_mnist14_loads_5000_grey_14x14_digits_500_per_class() -> None:
    x, y = data.load_source("mnist14")
    assert x.shape == (5000, 1, 14, 14) and x.dtype == np.float32
    assert y.shape == (5000,) and y.dtype == np.int64
    # Grey levels of uint8 images, background 0, strokes up to 255.
    assert x.min() == 0 and x.max() == 255 and np.all(x == np.round(x))
    assert np.bincount(y).tolist() == [500] * 10
    assert data.fingerprint(x, y) == MNIST14_FINGERPRINT


def test_mnist14_is_stored_small_as_uint8_in_the_package() -> None:
    path = data.sample_path("mnist14", ".npz")
    with np.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["x", "y"]
        assert npz["x"].dtype == np.uint8
    assert path.stat().st_size < 1_500_000


def test_the_demo_split_of_mnist14_is_stratified_2500_500_2000() -> None:
    splits = data.prepare(DataConfig(source="mnist14", val_fraction=0.1, test_fraction=0.4))
    assert splits.meta.input_shape == [1, 14, 14] and splits.meta.num_classes == 10
    assert splits.meta.sizes == {"train": 2500, "val": 500, "test": 2000}
    assert splits.meta.class_counts == {"train": [250] * 10, "val": [50] * 10, "test": [200] * 10}
    assert splits.meta.fingerprint == MNIST14_FINGERPRINT


def test_shrink_averages_2x2_blocks_rounding_half_up() -> None:
    # One 4x4 image -> 2x2; each block's mean by hand: 3/4 -> 1, 2/4 = 0.5 -> 1 (half up),
    # 1/4 -> 0, 1019/4 = 254.75 -> 255 (and no uint8 overflow while summing).
    image = np.array(
        [
            [0, 1, 1, 1],
            [1, 1, 0, 0],
            [0, 0, 255, 255],
            [0, 1, 255, 254],
        ],
        dtype=np.uint8,
    )[None, None]
    out = shrink(image)
    assert out.dtype == np.uint8
    assert out[0, 0].tolist() == [[1, 1], [0, 255]]


def test_mnist14_is_an_image_source_in_the_config() -> None:
    assert source_kind("mnist14") == "image_sample"
    assert DataConfig(source="mnist14").source == "mnist14"
    with pytest.raises(ValidationError, match="already holds images"):
        DataConfig(source="mnist14", image_shape=[1, 196, 1])
    with pytest.raises(ValidationError, match="'mnist14' is split into train/val/test"):
        DataConfig(source="mnist14", test_source="test.npz")
