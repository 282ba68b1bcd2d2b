"""Registry behaviour on a real sqlite MLflow store: tags at creation, guarded promotion, and the
registered pyfunc as a deployment sees it (labels + probabilities out, bad input refused with
INVALID_PARAMETER_VALUE, a fresh-process check of a version)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel, PythonModelContext

from kd_lib.adapters.model_registry import ModelRegistry, RegistryError, gate_tags
from kd_lib.adapters.serving import KdflowPyfunc, class_names, log_pyfunc, pip_requirements
from kd_lib.adapters.tracking import fluent_run
from kd_lib.adapters.verify import verify_version
from kd_lib.compress import quantization
from kd_lib.compress.onnx_runtime import build_onnx_artifact
from kd_lib.config import GateConfig
from kd_lib.evaluate.gates import decide
from kd_lib.models.builders import build_model
from tests.helpers import load_versions
from tests.kd_lib.conftest import REPO_ROOT

TYPE_HINT_WARNING = "Add type hints to the `predict` method"
CLASSES = ["cat", "dog", "eel"]
INPUT_SHAPE = (1, 4, 4)
NORMALIZATION = {"mean": 2.0, "std": 4.0}


def _spec(quantization_scheme: str) -> dict:
    return {
        "arch": "mlp",
        "params": {"width": 8, "depth": 1},
        "input_shape": list(INPUT_SHAPE),
        "num_classes": len(CLASSES),
        "quantization": quantization_scheme,
        "normalization": dict(NORMALIZATION),
        "class_names": list(CLASSES),
    }


def raw_inputs(n: int = 12, seed: int = 0) -> np.ndarray:
    """Raw features [n, 1, 4, 4] float32, as in the source data (spread around the mean 2 so that
    the tiny model below answers each of the three classes)."""
    return np.random.default_rng(seed).uniform(-10, 14, size=(n, *INPUT_SHAPE)).astype(np.float32)


@dataclass
class Registered:
    """Two versions of one registered model in a fresh sqlite store: torch (dynamic int8 weights)
    and ONNX Runtime (fp32 export, normalization folded in), with the logits each must produce
    on ``x``, the logged models (source URI, model id) and the warnings logging them raised."""

    uri: str
    name: str
    client: MlflowClient
    run_id: str
    versions: dict[str, str]  # "torch" / "onnx" -> version
    sources: dict[str, tuple[str, str]]  # "torch" / "onnx" -> (model URI, model id)
    x: np.ndarray
    logits: dict[str, np.ndarray]
    warnings: list[str]


def register_models(
    root: Path, name: str = "serve-test", uri: str | None = None, kinds: tuple[str, ...] = ("torch", "onnx")
) -> Registered:
    """Build, log and register the torch and the ONNX artifact of one tiny MLP.

    Args:
        root: Where the model directories go, and the sqlite store with its artifacts.
        name: The registered model.
        uri: A tracking server to use instead of that sqlite store (its own artifact store).
        kinds: Which of the two to register.
    """
    torch.manual_seed(2)
    fp32 = build_model("mlp", {"width": 8, "depth": 1}, INPUT_SHAPE, len(CLASSES)).eval()
    int8 = quantization.quantize(fp32, "dynamic_int8")
    dirs = {
        "torch": quantization.save_model(int8, _spec("dynamic_int8"), root / "torch"),
        "onnx": build_onnx_artifact(fp32, "onnx_fp32", _spec("none"), [], root / "onnx"),
    }
    x = raw_inputs()
    normalized = torch.from_numpy((x - NORMALIZATION["mean"]) / NORMALIZATION["std"])
    with torch.no_grad():
        logits = {"torch": int8(normalized).numpy(), "onnx": fp32(normalized).numpy()}
    assert len(set(logits["torch"].argmax(1))) > 1, "the test inputs should not all fall in one class"

    artifacts = None if uri else (root / "artifacts").as_uri()
    uri = uri or f"sqlite:///{root / 'registry.db'}"
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment("serve", artifact_location=artifacts)
    run_id = client.create_run(experiment).info.run_id
    registry = ModelRegistry(client, name)
    versions, sources = {}, {}
    with fluent_run(client, run_id), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for kind in kinds:
            directory = dirs[kind]
            spec = json.loads((directory / "spec.json").read_text())
            sources[kind] = log_pyfunc(directory, spec, pip_requirements(spec))
            versions[kind] = registry.register(
                sources[kind][0], run_id, {"validation_status": "passed"}, sources[kind][1]
            )
    client.set_terminated(run_id)
    return Registered(uri, name, client, run_id, versions, sources, x, logits, [str(w.message) for w in caught])


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    return register_models(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def loaded(registered: Registered) -> dict[str, PyFuncModel]:
    return load_versions(registered.uri, registered.name, registered.versions)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------ registration and promotion


def test_register_promote_and_load_without_pickle(registered: Registered, monkeypatch: pytest.MonkeyPatch) -> None:
    client, name = registered.client, registered.name
    registry = ModelRegistry(client, name)
    source, model_id = registered.sources["torch"]
    passed = decide({"accuracy": 0.9, "size_bytes": 10}, {"accuracy": 0.91, "size_bytes": 100}, GateConfig())
    failed = decide({"accuracy": 0.1, "size_bytes": 10}, {"accuracy": 0.91, "size_bytes": 100}, GateConfig())
    with fluent_run(client, registered.run_id):
        v1 = registry.register(source, registered.run_id, gate_tags(passed), model_id=model_id)
        registry.promote(v1, "champion")
        v2 = registry.register(source, registered.run_id, gate_tags(failed), model_id=model_id)
    assert "MLFLOW_REGISTRY_URI" not in os.environ, "fluent_run must not leak the registry URI"
    assert not [w for w in registered.warnings if TYPE_HINT_WARNING in w]
    assert client.get_model_version(name, v1).tags["validation_status"] == "passed"
    assert registry.alias_version("champion") == v1
    with pytest.raises(RegistryError, match="not tagged validation_status=passed"):
        registry.promote(v2, "champion")
    assert registry.alias_version("champion") == v1

    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registered.uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registered.uri)
    # The logged signature is the explicit one (tensor in, three columns out), not one inferred
    # from predict's hints; the class names are in the model's metadata.
    info = mlflow.models.get_model_info(source)
    assert info.signature.to_dict() == {
        "inputs": '[{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 1, 4, 4]}}]',
        "outputs": '[{"type": "string", "name": "label", "required": true}, '
        '{"type": "long", "name": "class_id", "required": true}, '
        '{"type": "array", "items": {"type": "double"}, "name": "probabilities", "required": true}]',
        "params": None,
    }
    assert info.metadata is not None
    assert info.metadata["class_names"] == CLASSES and info.metadata["input_shape"] == list(INPUT_SHAPE)
    champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    np.testing.assert_array_equal(champion.predict(registered.x)["class_id"], registered.logits["torch"].argmax(1))


def test_class_names_default_to_the_class_ids() -> None:
    assert class_names({"num_classes": 3}) == ["0", "1", "2"]
    assert class_names({"num_classes": 2, "class_names": ["no", 7]}) == ["no", "7"]
    with pytest.raises(RegistryError, match="class_names has 1 names but num_classes is 2"):
        class_names({"num_classes": 2, "class_names": ["no"]})


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
        "    import kd_lib.adapters.serving\n"
        "print('\\n'.join(str(w.message) for w in caught))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert TYPE_HINT_WARNING not in out.stdout


def test_pip_requirements_pin_the_runtime_of_the_artifact() -> None:
    torch_pins = pip_requirements({"backend": "fbgemm", "versions": {"torchao": "0.18.0"}})
    onnx_pins = pip_requirements({"format": "onnx", "backend": "onnxruntime", "versions": {"onnxruntime": "1.32.0"}})
    names = {kind: {pin.split("==")[0] for pin in pins} for kind, pins in (("torch", torch_pins), ("onnx", onnx_pins))}
    assert {"mlflow", "numpy", "pandas", "pydantic", "pyyaml", "tabulate"} <= names["torch"] & names["onnx"]
    assert "torch" in names["torch"] and "torchao==0.18.0" in torch_pins and "onnxruntime" not in names["torch"]
    assert "onnxruntime==1.32.0" in onnx_pins and "torch" not in names["onnx"]
    assert all("+" not in pin for pin in torch_pins + onnx_pins)  # no local labels (torch's +cpu)


# ------------------------------------------------------------------ the served answer


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_registered_model_answers_labels_and_probabilities(
    kind: str, registered: Registered, loaded: dict[str, PyFuncModel]
) -> None:
    model = loaded[kind]
    metadata = model.metadata.metadata or {}
    assert metadata["class_names"] == CLASSES and metadata["format"] == kind
    answer = model.predict(registered.x)
    assert isinstance(answer, pd.DataFrame) and list(answer.columns) == ["label", "class_id", "probabilities"]
    expected_ids = registered.logits[kind].argmax(1)
    np.testing.assert_array_equal(answer["class_id"].to_numpy(), expected_ids)
    assert answer["class_id"].dtype == np.int64
    assert answer["label"].tolist() == [CLASSES[i] for i in expected_ids]
    probabilities = np.array(answer["probabilities"].tolist())
    assert probabilities.shape == (len(registered.x), len(CLASSES))
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(probabilities, softmax(registered.logits[kind].astype(np.float64)), atol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(1), expected_ids)


def _with_nan(x: np.ndarray) -> np.ndarray:
    bad = x.copy()
    bad[1, 0, 2, 3] = np.nan
    return bad


def _with_inf(x: np.ndarray) -> np.ndarray:
    bad = x.copy()
    bad[2, 0, 0, 0] = -np.inf
    return bad


# (case, bad input from good raw input x, what the message must say): through MLflow, whose
# signature enforcement refuses wrong shapes and dtypes before predict runs, and kdflow's own
# checks refuse what a signature cannot express.
LOADED_BAD_INPUTS: list[tuple[str, Callable[[np.ndarray], np.ndarray], str]] = [
    ("wrong shape", lambda x: x.reshape(len(x), 16), r"Shape of input \(12, 16\) does not match .*\(-1, 1, 4, 4\)"),
    ("no batch axis", lambda x: x[0], r"Shape of input \(1, 4, 4\) does not match expected shape \(-1, 1, 4, 4\)"),
    ("NaN", _with_nan, r"bad input: 1 NaN/null and 0 inf value\(s\) in row\(s\) 1; .*shape \[N, 1, 4, 4\]"),
    ("inf", _with_inf, r"bad input: 0 NaN/null and 1 inf value\(s\) in row\(s\) 2; .*shape \[N, 1, 4, 4\]"),
    ("float64", lambda x: x.astype(np.float64), r"dtype of input float64 does not match expected dtype float32"),
    ("strings", lambda x: np.full(x.shape, "abc"), r"dtype of input <U3 does not match expected dtype float32"),
    ("empty batch", lambda x: x[:0], r"bad input: an empty batch \(shape \(0, 1, 4, 4\)\).*\[N, 1, 4, 4\]"),
]


@pytest.mark.parametrize("kind", ["torch", "onnx"])
@pytest.mark.parametrize(("case", "make", "message"), LOADED_BAD_INPUTS, ids=[c[0] for c in LOADED_BAD_INPUTS])
def test_loaded_model_refuses_bad_input(
    kind: str,
    case: str,
    make: Callable[[np.ndarray], np.ndarray],
    message: str,
    registered: Registered,
    loaded: dict[str, PyFuncModel],
) -> None:
    with pytest.raises(MlflowException, match=message) as caught:
        loaded[kind].predict(make(registered.x))
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE", case
    assert caught.value.get_http_status_code() == 400


# Called directly (no MLflow signature in front), predict's own checks refuse every case.
DIRECT_BAD_INPUTS: list[tuple[str, object, str]] = [
    ("wrong shape", np.zeros((3, 16), np.float32), r"wrong shape \(3, 16\); expected .*\[N, 1, 4, 4\]"),
    ("no batch axis", np.zeros((1, 4, 4), np.float32), r"one sample of shape \(1, 4, 4\) without the batch dim"),
    ("NaN", np.full((2, 1, 4, 4), np.nan, np.float32), r"32 NaN/null and 0 inf value\(s\) in row\(s\) 0, 1"),
    ("overflow to inf", np.full((1, 1, 4, 4), 1e39), r"0 NaN/null and 16 inf value\(s\)"),
    ("strings", np.full((2, 1, 4, 4), "seven"), r"non-numeric values where numbers belong .*'seven'"),
    ("objects", np.array([[[[1.0, {}, 2.0, 3.0]] * 4]], dtype=object), r"non-numeric values where numbers belong"),
    ("None", np.array([[[[1.0, None, 2.0, 3.0]] * 4]], dtype=object), r"4 NaN/null and 0 inf value\(s\) in row\(s\) 0"),
    ("complex", np.zeros((1, 1, 4, 4), np.complex64), r"dtype complex64 is not a number type"),
    ("ragged", [[[[1.0] * 4] * 4], [[[1.0] * 3] * 4]], r"not a rectangular array"),
    ("empty batch", np.zeros((0, 1, 4, 4), np.float32), r"an empty batch \(shape \(0, 1, 4, 4\)\)"),
    ("empty list", [], r"an empty batch \(shape \(0,\)\)"),
    ("scalar", 3.0, r"a single number \(3.0\)"),
    ("named inputs", {"x": np.zeros((1, 1, 4, 4))}, r"a mapping of named inputs \(x\)"),
]


@pytest.mark.parametrize(("case", "bad", "message"), DIRECT_BAD_INPUTS, ids=[c[0] for c in DIRECT_BAD_INPUTS])
def test_predict_itself_refuses_bad_input(case: str, bad: object, message: str) -> None:
    served = KdflowPyfunc()
    served.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    served.spec = _spec("none")
    context = PythonModelContext(artifacts={}, model_config={})
    with pytest.raises(MlflowException, match=message) as caught:
        served.predict(context, bad)  # type: ignore[arg-type]
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE", case


def test_predict_itself_takes_any_number_type() -> None:
    """Called directly, ints, float64 and a DataFrame of a flat input are numbers like any other."""
    served = KdflowPyfunc()
    served.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    served.spec = _spec("none")
    context = PythonModelContext(artifacts={}, model_config={})
    x = raw_inputs(4)
    expected = served.predict(context, x)
    pd.testing.assert_frame_equal(served.predict(context, x.astype(np.float64)), expected)
    assert served.predict(context, x.astype(np.int64))["label"].isin(CLASSES).all()
    served.spec = _spec("none") | {"input_shape": [16]}
    flat = pd.DataFrame(x.reshape(4, 16), columns=[f"f{i}" for i in range(16)])
    pd.testing.assert_frame_equal(served.predict(context, flat), expected)


# ------------------------------------------------------------------ the fresh-process check


def test_verify_version_in_a_fresh_process(registered: Registered, monkeypatch: pytest.MonkeyPatch) -> None:
    # The caller's environment points elsewhere: verify sets the URIs (and pickle off) itself.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nonexistent/elsewhere.db")
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    name, onnx_version = registered.name, registered.versions["onnx"]
    expected = registered.logits["onnx"].argmax(1)
    wrong = expected.copy()
    wrong[[0, 5]] = (wrong[[0, 5]] + 1) % len(CLASSES)
    # One after the other: three children at once on one sqlite store took longer (12.7 s against 7.6 s).
    good = verify_version(registered.uri, name, onnx_version, registered.x, expected)
    bad = verify_version(registered.uri, name, onnx_version, registered.x, wrong)
    missing = verify_version(registered.uri, name, "99", registered.x, expected)
    assert good.ok and good.mismatches == 0 and good.checked == len(expected), good.detail
    assert f"models:/{name}/{onnx_version} loaded in a fresh process with pickle off" in good.detail

    assert not bad.ok and bad.mismatches == 2 and bad.checked == len(expected)
    assert f"2 of {len(expected)} predicted class ids differ" in bad.detail
    assert f"row 0: {expected[0]} not {wrong[0]}" in bad.detail

    assert not missing.ok and missing.checked == 0 and missing.mismatches == 0
    assert "failed to load or predict" in missing.detail
    assert f"kdflow-verify: load of models:/{name}/99 failed" in missing.detail

    with pytest.raises(ValueError, match="12 input rows but 3 expected class ids"):
        verify_version(registered.uri, name, onnx_version, registered.x, expected[:3])


def test_verify_version_reports_a_timeout(registered: Registered) -> None:
    result = verify_version(
        registered.uri, registered.name, registered.versions["onnx"], registered.x, np.zeros(12), timeout_s=0.2
    )
    assert not result.ok and result.checked == 0
    assert "did not load and predict within 0.2 s" in result.detail
