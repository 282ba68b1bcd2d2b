"""A user architecture (``arch: package.module:function``) registered as a torch artifact ships its
package in the MLflow model (``code_paths``): it loads and predicts in a fresh process where that
package is not importable at all."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

import tests
from kd_lib.adapters.model_registry import ModelRegistry, RegistryError
from kd_lib.adapters.serving import log_pyfunc, pip_requirements, user_code_paths
from kd_lib.adapters.tracking import fluent_run
from kd_lib.adapters.verify import verify_version
from kd_lib.compress import quantization
from kd_lib.models.builders import build_model

ARCH = "tests.helpers:user_resnet"
NORMALIZATION = {"mean": 8.0, "std": 4.0}


def _register(directory: Path, tmp_path: Path, name: str) -> tuple[str, str]:
    """The saved model ``directory`` logged as a pyfunc (with its code_paths) and registered as
    ``name`` in a sqlite store under ``tmp_path``; its artifacts land in ``tmp_path / artifacts``.
    Returns (the store's URI, the version)."""
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment(name, artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    with fluent_run(client, run_id):
        written = json.loads((directory / "spec.json").read_text())
        source, model_id = log_pyfunc(directory, written, pip_requirements(written))
        # Inside: MLflow looks the logged model up through its global tracking URI.
        version = ModelRegistry(client, name).register(source, run_id, {}, model_id)
    client.set_terminated(run_id)
    return uri, version


def test_user_code_paths_name_the_package_of_a_user_architecture() -> None:
    assert user_code_paths("resnet") == [] and user_code_paths("mlp") == []
    assert user_code_paths(ARCH) == [str(Path(tests.__file__).parent)]
    with pytest.raises(RegistryError, match="package 'no_such_pkg_kdflow' is not importable"):
        user_code_paths("no_such_pkg_kdflow.models:net")


def test_a_user_resnet_torch_artifact_loads_where_its_package_is_not_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = build_model(ARCH, {"width": 4}, (1, 8, 8), 3)
    rng = np.random.default_rng(0)
    # Brightness varying per image: after global pooling, iid noise alone looks the same everywhere.
    x_raw = (rng.uniform(0, 16, size=(16, 1, 8, 8)) * np.linspace(0.0, 2.0, 16).reshape(-1, 1, 1, 1)).astype(np.float32)
    with torch.no_grad():  # BatchNorm statistics of this data, so the classes spread
        model.train()((torch.from_numpy(x_raw) - 8.0) / 4.0)
    model.eval()
    spec = {
        "arch": ARCH,
        "params": {"width": 4},
        "input_shape": [1, 8, 8],
        "num_classes": 3,
        "quantization": "none",
        "normalization": dict(NORMALIZATION),
    }
    directory = quantization.save_model(model, spec, tmp_path / "model")
    with torch.no_grad():
        expected = model((torch.from_numpy(x_raw) - 8.0) / 4.0).argmax(1).numpy()
    assert len(set(expected)) > 1, "the inputs should not all fall in one class"

    uri, version = _register(directory, tmp_path, "user-resnet")
    shipped = list((tmp_path / "artifacts").rglob("code/tests/helpers.py"))
    assert len(shipped) == 1, "the user package is not in the logged model"
    assert (shipped[0].parents[1] / "kd_lib" / "models" / "builders.py").is_file()

    # A fresh process (python -m) in a directory where `tests` is not importable, no PYTHONPATH:
    # only the model's code_paths can provide tests.helpers.
    away = tmp_path / "elsewhere"
    away.mkdir()
    monkeypatch.chdir(away)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    result = verify_version(uri, "user-resnet", version, x_raw, expected)
    assert result.ok, result.detail
    assert os.getcwd() == str(away)


def test_verification_predicts_in_the_batches_evaluate_used(tmp_path: Path) -> None:
    """A model whose answers depend on the batch (ONNX Runtime's dynamic int8 takes activation
    ranges per batch) is verified in evaluate's batches: predicting the whole split at once
    would disagree with what was evaluated and mark a good version broken."""
    from kd_lib.evaluate.metrics import predict

    arch = "tests.helpers:batch_relative"
    model = build_model(arch, {}, (1, 2, 2), 2).eval()
    spec = {"arch": arch, "params": {}, "input_shape": [1, 2, 2], "num_classes": 2, "quantization": "none"}
    directory = quantization.save_model(model, spec, tmp_path / "model")
    x_raw = np.repeat(np.linspace(0.0, 11.0, 12, dtype=np.float32), 4).reshape(12, 1, 2, 2)
    evaluated = predict(model, torch.from_numpy(x_raw), batch_size=4).numpy()
    whole = predict(model, torch.from_numpy(x_raw), batch_size=12).numpy()
    assert (evaluated != whole).any(), "the batches must matter for this model"

    uri, version = _register(directory, tmp_path, "batch-relative")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        assert verify_version(uri, "batch-relative", version, x_raw, evaluated, batch_size=4).ok
        mismatched = verify_version(uri, "batch-relative", version, x_raw, evaluated, batch_size=12)
    assert not mismatched.ok and "differ" in mismatched.detail
