"""Models, checkpoints and datasets load without executing code: a malicious pickle is refused."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lib import artifacts
from kd_lib.compress import quantization
from kd_lib.config import DataConfig
from kd_lib.data import dataset as data
from kd_lib.models.builders import build_model
from kd_lib.train import loop as training


class Payload:
    """Unpickling this runs os.system: it must never be unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_file(path: Path, marker: Path) -> None:
    # torch.save pickles arbitrary objects; weights_only=True loading must refuse them.
    torch.save({"weight": Payload(marker)}, path)


@pytest.mark.parametrize("name", [artifacts.WEIGHTS_FILE, artifacts.LEGACY_WEIGHTS_FILE])
def test_malicious_weights_file_is_rejected_and_never_executed(tmp_path: Path, name: str) -> None:
    marker = tmp_path / "pwned"
    model_dir = quantization.save_model(
        build_model("mlp", {"width": 4, "depth": 1}, (1, 2, 2), 2),
        {
            "arch": "mlp",
            "params": {"width": 4, "depth": 1},
            "input_shape": [1, 2, 2],
            "num_classes": 2,
            "quantization": "none",
        },
        tmp_path / "m",
    )
    # A pickle where the weights file goes, or (older artifacts) as weights.pt with no weights.bin.
    (model_dir / artifacts.WEIGHTS_FILE).unlink()
    _evil_file(model_dir / name, marker)
    with pytest.raises(artifacts.ArtifactError, match=name):
        quantization.load_model(model_dir)
    assert not marker.exists()


def test_malicious_checkpoint_is_rejected_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _evil_file(tmp_path / training.CHECKPOINT_FILE, marker)
    with pytest.raises(ValueError, match="unreadable training checkpoint"):
        training.load_checkpoint(tmp_path / training.CHECKPOINT_FILE)
    assert not marker.exists()


def test_npz_with_pickled_objects_is_rejected_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    evil = np.empty(3, dtype=object)
    evil[:] = [Payload(marker)] * 3
    np.savez(path, x=evil, y=np.zeros(3, np.int64))
    with pytest.raises(data.DataError, match="evil.npz"):
        data.prepare(DataConfig(source=str(path)))
    assert not marker.exists()


def test_spec_is_json_not_code(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "spec.json").write_bytes(pickle.dumps({"arch": "mlp"}))
    with pytest.raises(artifacts.ArtifactError, match="spec.json"):
        quantization.load_model(model_dir)
    (model_dir / "spec.json").write_text(json.dumps({"arch": "mlp"}))
    with pytest.raises(artifacts.ArtifactError, match="spec.json"):
        quantization.load_model(model_dir)
