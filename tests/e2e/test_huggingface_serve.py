"""A Hugging Face teacher end to end: imported, distilled, quantized, registered, served raw strings.

The tiny BERT of ``tests/kd_lib/models/test_huggingface.py`` (save_pretrained in tmp_path, its
WordPiece tokenizer trained on the sample's texts, nothing from a hub) is the teacher of the
shipped ``movie_toy`` reviews. The whole DAG runs on ``kfp.local``: the data is tokenized with the
teacher's own tokenizer, a text CNN is distilled from it and exported to ONNX Runtime int8, and
the version is registered and verified in a fresh process on the raw test strings. Then the real
scoring server (``mlflow models serve``) is asked the raw test strings over HTTP: it answers the
classes evaluate measured (the tokenizer's round trip: the served model tokenizes with the
``tokenizer.json`` it carries), and refuses bad text requests with HTTP 400 naming the problem.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from kd_lib.artifacts.dataset_dir import load_splits
from pipelines.local import run_local
from tests.e2e.test_serve import _process_tree, post, serve
from tests.kd_lib.models.test_huggingface import save_tiny_bert
from tests.kd_lib.steps.test_huggingface_teacher import CLASSES, MAX_LENGTH, SAMPLE, text_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# (case, request body, what the 400's message must say)
BAD_TEXT_REQUESTS: list[tuple[str, str | dict, str]] = [
    ("no text column", {"dataframe_records": [{"review": "good"}]}, r"missing inputs \['text'\]"),
    ("empty list", {"inputs": []}, r"empty"),
    ("a null", {"dataframe_records": [{"text": "good"}, {"text": None}]}, r"row 1: null"),
    ("a number", {"dataframe_records": [{"text": 5}]}, r"row 0: int"),
    ("a null in a split frame", {"dataframe_split": {"columns": ["text"], "data": [[None]]}}, r"row 0: null"),
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("hf-e2e")
    with SAMPLE.open(newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    bert = save_tiny_bert(tmp / "bert", texts=texts, labels=CLASSES, max_positions=MAX_LENGTH)
    cfg = text_config(
        tmp,
        bert,
        quantize={"scheme": "onnx_dynamic_int8"},
        # A random tiny teacher: the gate is not what this test is about.
        gate={
            "min_accuracy": 0.0,
            "max_accuracy_drop": 100.0,
            "max_quantization_drop": 100.0,
            "max_size_mb": 10.0,
            "min_compression_ratio": 1.0,
        },
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", cfg.tracking.tracking_uri or "")
        result = run_local(cfg, root=tmp / "runs")
    assert result.succeeded, result.error
    return {"cfg": cfg, "result": result, "tmp": tmp}


@pytest.fixture(scope="module")
def served(pipeline: dict, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    cfg, summary = pipeline["cfg"], pipeline["result"].summary
    registered = SimpleNamespace(
        uri=cfg.tracking.tracking_uri, name=cfg.registry.model_name, versions={"onnx": summary["registered"]["version"]}
    )
    yield from serve(registered, "onnx", tmp_path_factory.mktemp("logs") / "serve-text.log")  # type: ignore[arg-type]


def test_the_pipeline_imports_the_teacher_and_verifies_the_served_version(pipeline: dict) -> None:
    result = pipeline["result"]
    tasks = [s["task"] for s in result.steps]
    assert "import-teacher" in tasks and "train-teacher" not in tasks
    summary = result.summary
    assert summary["gate"]["passed"] is True
    assert summary["registered"]["version"]
    dataset = load_splits(result.pipeline_root / "prepare-data" / "dataset")
    assert dataset.meta.text is not None and dataset.meta.text.tokenizer_origin == "teacher"


def test_served_raw_strings_answer_what_evaluate_measured(pipeline: dict, served) -> None:  # noqa: ANN001
    result = pipeline["result"]
    measured = result.summary["evaluation"]["quantized"]["predictions"]
    dataset = load_splits(result.pipeline_root / "prepare-data" / "dataset")
    texts = dataset.test_texts
    assert texts is not None and len(texts) == len(measured)
    status, answer = post(served.url, {"inputs": texts})
    assert status == 200, answer
    rows = answer["predictions"]
    assert [row["class_id"] for row in rows] == measured
    assert [row["label"] for row in rows] == [CLASSES[i] for i in measured]
    status, by_records = post(served.url, {"dataframe_records": [{"text": t} for t in texts]})
    assert status == 200 and by_records == answer


def test_the_onnx_text_model_is_served_without_torch(served) -> None:  # noqa: ANN001
    """Tokenizing needs the tokenizers library only: the scoring server never loads libtorch
    (and so no transformers model)."""
    if not Path(f"/proc/{served.pid}/maps").exists():
        pytest.skip("needs Linux /proc to see which libraries the server loaded")
    maps = "".join(Path(f"/proc/{pid}/maps").read_text() for pid in _process_tree(served.pid))
    assert "onnxruntime" in maps and "tokenizers" in maps
    assert "libtorch" not in maps


@pytest.mark.parametrize(("case", "body", "message"), BAD_TEXT_REQUESTS, ids=[c[0] for c in BAD_TEXT_REQUESTS])
def test_bad_text_requests_get_400_naming_the_problem(served, case: str, body: dict, message: str) -> None:  # noqa: ANN001
    status, answer = post(served.url, body)
    assert status == 400, (case, answer)
    assert "predictions" not in answer
    assert re.search(message, answer["message"]), answer["message"]
