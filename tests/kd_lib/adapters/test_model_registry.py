"""Registry behaviour on a real sqlite MLflow store: tags at creation, guarded promotion."""

import os
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from kd_lib.adapters.model_registry import ModelRegistry, RegistryError, gate_tags, log_pyfunc, pip_requirements
from kd_lib.adapters.tracking import fluent_run
from kd_lib.compress import quantization
from kd_lib.config import GateConfig
from kd_lib.evaluate.gates import decide
from kd_lib.models.builders import build_model
from tests.kd_lib.conftest import REPO_ROOT

TYPE_HINT_WARNING = "Add type hints to the `predict` method"


@pytest.fixture
def saved_model(tmp_path: Path) -> tuple[Path, dict, torch.nn.Module]:
    torch.manual_seed(0)
    model = quantization.quantize(build_model("mlp", {"width": 8, "depth": 1}, (1, 4, 4), 3), "dynamic_int8")
    spec = {
        "arch": "mlp",
        "params": {"width": 8, "depth": 1},
        "input_shape": [1, 4, 4],
        "num_classes": 3,
        "quantization": "dynamic_int8",
        "normalization": {"mean": 2.0, "std": 4.0},
    }
    return quantization.save_model(model, spec, tmp_path / "m"), spec, model


def test_register_promote_and_load_without_pickle(tmp_path: Path, saved_model, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir, spec, model = saved_model
    uri = f"sqlite:///{tmp_path / 'r.db'}"
    client = MlflowClient(uri, uri)
    registry = ModelRegistry(client, "reg-test")
    run = client.create_run(client.create_experiment("reg"))
    passed = decide({"accuracy": 0.9, "size_bytes": 10}, {"accuracy": 0.91, "size_bytes": 100}, GateConfig())
    failed = decide({"accuracy": 0.1, "size_bytes": 10}, {"accuracy": 0.91, "size_bytes": 100}, GateConfig())
    with fluent_run(client, run.info.run_id), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source, model_id = log_pyfunc(model_dir, spec, pip_requirements())
        v1 = registry.register(source, run.info.run_id, gate_tags(passed), model_id=model_id)
        registry.promote(v1, "champion")
        v2 = registry.register(source, run.info.run_id, gate_tags(failed), model_id=model_id)
    assert "MLFLOW_REGISTRY_URI" not in os.environ, "fluent_run must not leak the registry URI"
    assert not [w for w in caught if TYPE_HINT_WARNING in str(w.message)]
    assert client.get_model_version("reg-test", v1).tags["validation_status"] == "passed"
    assert registry.alias_version("champion") == v1
    with pytest.raises(RegistryError, match="not tagged validation_status=passed"):
        registry.promote(v2, "champion")
    assert registry.alias_version("champion") == v1

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    # The logged signature is the explicit tensor schema, not one inferred from predict's hints.
    signature = mlflow.models.get_model_info(source).signature.to_dict()
    assert signature == {
        "inputs": '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 1, 4, 4]}}]',
        "outputs": '[{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}]',
        "params": None,
    }
    loaded = mlflow.pyfunc.load_model("models:/reg-test@champion")
    raw = np.random.default_rng(0).uniform(0, 4, size=(6, 1, 4, 4)).astype(np.float32)
    expected = model(torch.from_numpy((raw - 2.0) / 4.0)).argmax(1).numpy()
    np.testing.assert_array_equal(loaded.predict(raw), expected)


def test_gate_tags_record_each_check() -> None:
    decision = decide({"accuracy": 0.5, "size_bytes": 10}, {"accuracy": 0.9, "size_bytes": 100}, GateConfig())
    tags = gate_tags(decision)
    assert tags["validation_status"] == "rejected"
    assert tags["gate.min_accuracy"] == "0.5 >= 0.8 FAIL"
    assert tags["gate.min_compression_ratio"].endswith("PASS")


def test_defining_the_pyfunc_emits_no_type_hint_warning() -> None:
    """MLflow checks predict's type hints when the class is defined, i.e. on the first import of
    the module in every task process: a fresh interpreter shows whether it warns."""
    code = (
        "import warnings\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import kd_lib.adapters.model_registry\n"
        "print('\\n'.join(str(w.message) for w in caught))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert TYPE_HINT_WARNING not in out.stdout
