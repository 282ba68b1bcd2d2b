"""The served text model on a real sqlite MLflow store: raw strings in, labels and probabilities out.

A tiny text CNN is saved as a torch artifact and as an ONNX artifact, each carrying the
``tokenizer.json`` its ids came from (trained here with the tokenizers library), logged and
registered with ``log_pyfunc``, then loaded through ``models:/`` with pickle off, as a
deployment loads it. Bad text input is refused with ``INVALID_PARAMETER_VALUE``.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.types.schema import ColSpec, DataType

from kd_lib.adapters.model_registry import ModelRegistry
from kd_lib.adapters.serving import checked_texts, log_pyfunc, model_signature, pip_requirements
from kd_lib.adapters.tracking import fluent_run
from kd_lib.adapters.verify import verify_version
from kd_lib.compress import quantization
from kd_lib.compress.onnx_runtime import build_onnx_artifact
from kd_lib.data import text as text_lib
from kd_lib.models.builders import build_model
from tests.helpers import load_versions
from tests.kd_lib.adapters.test_model_registry import softmax
from tests.kd_lib.models.test_huggingface import TEXTS, tiny_tokenizer

MAX_LENGTH = 16
CLASSES = ["negative", "positive"]
# Texts the model is asked about: training-like ones, unknown words, one longer than MAX_LENGTH.
QUERIES = [*TEXTS, "zzz qqq unseen words", "good " * 30, ""]


@dataclass
class TextRegistered:
    """Torch and ONNX versions of one registered text model, and the logits each must give on ``texts``."""

    uri: str
    name: str
    versions: dict[str, str]
    texts: list[str]
    logits: dict[str, np.ndarray]
    specs: dict[str, dict]


def register_text_models(
    root: Path, name: str = "text-serve", kinds: tuple[str, ...] = ("torch", "onnx")
) -> TextRegistered:
    """Build, save (with tokenizer.json), log and register a tiny text CNN as torch and ONNX artifacts."""
    tokenizer = tiny_tokenizer(TEXTS)
    tokenizer_file = root / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    pad, vocab = text_lib.pad_id(tokenizer), text_lib.vocabulary_size(tokenizer)
    params = {"vocab_size": vocab, "pad_id": pad, "embedding": 16, "channels": 8, "kernel_sizes": [3]}
    torch.manual_seed(3)
    model = build_model("textcnn", params, (MAX_LENGTH,), len(CLASSES)).eval()
    spec = {
        "arch": "textcnn",
        "params": params,
        "input_shape": [MAX_LENGTH],
        "num_classes": len(CLASSES),
        "quantization": "none",
        "class_names": list(CLASSES),
        "text": {
            "tokenizer_file": "tokenizer.json",
            "pad_id": pad,
            "max_length": MAX_LENGTH,
            "vocab_size": vocab,
            "tokenizer_origin": "trained",
        },
    }
    builders = {
        "torch": lambda d: quantization.save_model(model, spec, d),
        "onnx": lambda d: build_onnx_artifact(model, "onnx_fp32", spec, [], d),
    }
    ids = torch.from_numpy(text_lib.encode(tokenizer, QUERIES, MAX_LENGTH))
    with torch.no_grad():
        # Random weights favour one class; move the head's bias so the queries split between both.
        margin = model(ids).numpy()
        head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
        head.bias[1] += float(np.median(margin[:, 0] - margin[:, 1])) + 1e-3
        logits = model(ids).numpy()
    assert len(set(logits.argmax(1))) > 1, "the queries should not all fall in one class"

    uri = f"sqlite:///{root / 'registry.db'}"
    client = MlflowClient(uri, uri)
    experiment = client.create_experiment("serve-text", artifact_location=(root / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    registry = ModelRegistry(client, name)
    versions, specs = {}, {}
    with fluent_run(client, run_id):
        for kind in kinds:
            directory = builders[kind](root / kind)
            shutil.copyfile(tokenizer_file, directory / "tokenizer.json")
            specs[kind] = json.loads((directory / "spec.json").read_text())
            source, model_id = log_pyfunc(directory, specs[kind], pip_requirements(specs[kind]))
            versions[kind] = registry.register(source, run_id, {"validation_status": "passed"}, model_id)
    client.set_terminated(run_id)
    return TextRegistered(uri, name, versions, list(QUERIES), {kind: logits for kind in kinds}, specs)


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> TextRegistered:
    return register_text_models(tmp_path_factory.mktemp("text-registry"))


@pytest.fixture(scope="module")
def loaded(registered: TextRegistered) -> dict[str, PyFuncModel]:
    return load_versions(registered.uri, registered.name, registered.versions)


@pytest.mark.parametrize("kind", ["torch", "onnx"])
def test_raw_strings_get_labels_and_probabilities(
    kind: str, loaded: dict[str, PyFuncModel], registered: TextRegistered
) -> None:
    expected = registered.logits[kind].argmax(1)
    answer = loaded[kind].predict(pd.DataFrame({"text": registered.texts}))
    assert isinstance(answer, pd.DataFrame)
    assert list(answer.columns) == ["label", "class_id", "probabilities"]
    assert answer["class_id"].tolist() == expected.tolist()
    assert answer["label"].tolist() == [CLASSES[i] for i in expected]
    np.testing.assert_allclose(np.stack(answer["probabilities"]), softmax(registered.logits[kind]), atol=1e-5)
    # What a served {"inputs": ["...", ...]} list becomes is the same request.
    again = loaded[kind].predict({"text": np.asarray(registered.texts)})
    assert isinstance(again, pd.DataFrame) and again.equals(answer)


def test_the_signature_is_a_string_column_and_onnx_needs_no_torch(registered: TextRegistered) -> None:
    signature = model_signature(registered.specs["onnx"])
    assert signature.inputs.inputs == [ColSpec(DataType.string, "text")]
    onnx_pins, torch_pins = pip_requirements(registered.specs["onnx"]), pip_requirements(registered.specs["torch"])
    assert any(pin.startswith("tokenizers==") for pin in onnx_pins)
    assert not any(pin.startswith("torch==") for pin in onnx_pins)
    assert any(pin.startswith("torch==") for pin in torch_pins)
    # A model of features is unchanged: no tokenizers.
    features = {"input_shape": [4], "num_classes": 2, "quantization": "none"}
    assert not any(pin.startswith("tokenizers") for pin in pip_requirements(features))


BAD_TEXT = [
    ("no text column", pd.DataFrame({"review": ["good"]}), r"no 'text' column \(columns: 'review'\)"),
    ("empty batch", [], r"an empty batch"),
    ("a null row", ["good", None], r"1 row\(s\) not a string \(row 1: null\)"),
    ("a number", [5, "good"], r"row 0: int"),
    ("a NaN", pd.DataFrame({"text": ["good", float("nan")]}), r"row 1: null"),
    ("a nested list", [["good"]], r"row 0: list"),
    ("one string", "good film", r"a single string \('good film'\) without the batch"),
    ("a matrix", np.array([["a", "b"]]), r"an array of shape \(1, 2\)"),
]


@pytest.mark.parametrize(("case", "value", "message"), BAD_TEXT, ids=[c[0] for c in BAD_TEXT])
def test_checked_texts_names_the_problem(case: str, value: object, message: str) -> None:
    with pytest.raises(MlflowException) as err:
        checked_texts(value)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE", case
    assert re.search(message, err.value.message), err.value.message
    assert "expected text: a list of strings or a DataFrame with a string column 'text'" in err.value.message


def test_checked_texts_passes_strings_through() -> None:
    assert checked_texts(pd.DataFrame({"text": ["a", ""], "id": [1, 2]})) == ["a", ""]
    assert checked_texts({"text": ["a"]}) == ["a"]
    assert checked_texts(np.array(["x", "y"])) == ["x", "y"]


@pytest.mark.parametrize("kind", ["torch", "onnx"])
@pytest.mark.parametrize(
    "value",
    [pd.DataFrame({"review": ["good"]}), pd.DataFrame({"text": []}), pd.DataFrame({"text": ["good", None]})],
    ids=["no text column", "no rows", "a null row"],
)
def test_a_loaded_text_model_refuses_bad_input(kind: str, value: pd.DataFrame, loaded: dict[str, PyFuncModel]) -> None:
    """Whichever refuses it (MLflow's schema enforcement or the model), it is INVALID_PARAMETER_VALUE."""
    with pytest.raises(MlflowException) as err:
        loaded[kind].predict(value)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE", err.value.message


def test_verify_sends_raw_strings_to_a_fresh_process(registered: TextRegistered) -> None:
    version = registered.versions["onnx"]
    expected = registered.logits["onnx"].argmax(1)
    texts = np.asarray(registered.texts, dtype=np.str_)
    result = verify_version(registered.uri, registered.name, version, texts, expected)
    assert result.ok and result.checked == len(texts), result.detail
    wrong = verify_version(registered.uri, registered.name, version, texts, 1 - expected)
    assert not wrong.ok and wrong.mismatches == len(texts), wrong.detail
    with pytest.raises(ValueError, match=r"\[N\] strings"):
        verify_version(registered.uri, registered.name, version, np.asarray([], dtype=np.str_), expected[:0])
