"""A Hugging Face teacher through the steps, on real files and a real sqlite MLflow store.

The tiny BERT of ``tests/kd_lib/models/test_huggingface.py`` (saved with save_pretrained, its
WordPiece tokenizer trained on the sample's texts) is imported as the teacher of the shipped
``movie_toy`` reviews: the data is tokenized with the teacher's own tokenizer
(``data.tokenizer: auto``), the teacher is saved as a kdflow model directory and distilled into a
small text CNN; with ``teacher.fine_tune`` the train_teacher step fine-tunes it first.
"""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kd_lib.adapters.model_registry import ModelRegistry
from kd_lib.adapters.tracking import fluent_run
from kd_lib.artifacts.dataset_dir import load_splits
from kd_lib.compress import quantization
from kd_lib.config import LossTermConfig, PipelineConfig
from kd_lib.steps.common import StepError
from kd_lib.steps.distill import distill
from kd_lib.steps.import_teacher import import_teacher
from kd_lib.steps.prepare_data import prepare_data
from kd_lib.steps.train_teacher import train_teacher
from tests.helpers import tiny_config
from tests.kd_lib.models.test_huggingface import save_tiny_bert, tiny_tokenizer

SAMPLE = Path(__file__).resolve().parents[3] / "kd_lib" / "data" / "samples" / "movie_toy.csv"
CLASSES = ["mixed", "negative", "positive"]  # the sample's labels, sorted: the data's class ids
MAX_LENGTH = 32


def text_config(tmp: Path, teacher_uri: Path, **sections: dict) -> PipelineConfig:
    """A tiny config of the movie_toy sample with the Hugging Face teacher at ``teacher_uri``."""
    tree: dict[str, dict] = {
        "data": {"source": "movie_toy", "text_column": "text", "label_column": "label", "max_length": MAX_LENGTH},
        "teacher": {"source": "huggingface", "uri": str(teacher_uri), "train": {"epochs": 1, "lr": 1e-3}},
        "student": {"model": {"arch": "textcnn", "params": {"embedding": 16, "channels": 8, "kernel_sizes": [3]}}},
        "distill": {"train": {"epochs": 2, "batch_size": 64, "lr": 0.01}},
    }
    for name, values in sections.items():
        tree[name] = tree.get(name, {}) | values
    return tiny_config(tmp, **tree)


def tinybert(cfg: PipelineConfig) -> None:
    """Make ``cfg`` distill a 1-layer transformer student of the teacher's widths, initialized from
    its layers, with KD + CE + hidden_mse + attention_kl (TinyBERT/MiniLM with DistilBERT's init)."""
    student = {"arch": "transformer", "params": {"layers": 1, "hidden": 32, "heads": 2, "intermediate": 64}}
    cfg.student = type(cfg.student)(model=student, init_from_teacher=True)
    cfg.distill.losses = [
        LossTermConfig(name="kd", weight=0.5, params={"temperature": 2.0}),
        LossTermConfig(name="ce", weight=0.5),
        LossTermConfig(name="hidden_mse", weight=1.0),
        LossTermConfig(name="attention_kl", weight=1.0),
    ]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("hf-teacher")
    with SAMPLE.open(newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    bert = save_tiny_bert(tmp / "bert", texts=texts, labels=CLASSES, max_positions=MAX_LENGTH)
    cfg = text_config(tmp, bert)
    prepare_data(cfg, "setup", tmp / "dataset")
    summary = import_teacher(cfg, "setup", tmp / "dataset", tmp / "teacher", tmp / "history.json")
    return {"cfg": cfg, "tmp": tmp, "bert": bert, "dataset": tmp / "dataset", "teacher": tmp / "teacher", **summary}


def test_the_data_is_tokenized_with_the_teachers_tokenizer(prepared: dict) -> None:
    splits = load_splits(prepared["dataset"])
    assert splits.meta.text is not None and splits.meta.text.tokenizer_origin == "teacher"
    assert splits.meta.class_names == CLASSES
    assert splits.test_texts is not None and len(splits.test_texts) == len(splits.y["test"])
    teacher_vocab = json.loads((prepared["bert"] / "tokenizer.json").read_text())["model"]["vocab"]
    data_vocab = json.loads((prepared["dataset"] / "tokenizer.json").read_text())["model"]["vocab"]
    assert data_vocab == teacher_vocab


def test_the_imported_teacher_answers_what_the_hugging_face_model_answers(prepared: dict) -> None:
    spec = json.loads((prepared["teacher"] / "spec.json").read_text())
    assert spec["arch"] == "huggingface" and spec["imported_from"] == str(prepared["bert"])
    assert spec["input_shape"] == [MAX_LENGTH] and spec["num_classes"] == 3 and spec["text"]["pad_id"] == 0
    assert (prepared["teacher"] / "tokenizer.json").read_bytes() == (
        prepared["dataset"] / "tokenizer.json"
    ).read_bytes()
    teacher, _ = quantization.load_model(prepared["teacher"])
    reference = AutoModelForSequenceClassification.from_pretrained(prepared["bert"], use_safetensors=True).eval()
    ids = torch.from_numpy(load_splits(prepared["dataset"]).x["val"][:32])
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids), reference(input_ids=ids, attention_mask=(ids != 0).long()).logits)
    assert 0.0 <= prepared["best_val_accuracy"] <= 1.0


def test_a_student_is_distilled_from_it(prepared: dict, tmp_path: Path) -> None:
    summary = distill(prepared["cfg"], "kd", prepared["dataset"], prepared["teacher"], tmp_path / "student")
    assert summary["epochs_run"] == 2
    student, spec = quantization.load_model(tmp_path / "student")
    assert spec["arch"] == "textcnn" and (tmp_path / "student" / "tokenizer.json").is_file()
    with torch.no_grad():
        assert student(torch.from_numpy(load_splits(prepared["dataset"]).x["test"][:4])).shape == (4, 3)


def test_fine_tune_trains_the_imported_weights(prepared: dict, tmp_path: Path) -> None:
    cfg = text_config(prepared["tmp"], prepared["bert"], teacher={"fine_tune": True})
    summary = train_teacher(cfg, "fine-tune", prepared["dataset"], tmp_path / "teacher")
    assert summary["epochs_run"] == 1
    tuned, spec = quantization.load_model(tmp_path / "teacher")
    imported, _ = quantization.load_model(prepared["teacher"])
    assert spec["arch"] == "huggingface" and spec["imported_from"] == str(prepared["bert"])
    assert (tmp_path / "teacher" / "tokenizer.json").is_file()
    ids = torch.from_numpy(load_splits(prepared["dataset"]).x["val"][:8])
    with torch.no_grad():
        assert not torch.allclose(tuned(ids), imported(ids))


def test_data_tokenized_with_another_vocabulary_is_refused(prepared: dict, tmp_path: Path) -> None:
    other = tmp_path / "other-tokenizer.json"
    tiny_tokenizer(["some other words entirely", "and more of them"], vocab_size=60).save(str(other))
    cfg = text_config(tmp_path, prepared["bert"], data={"tokenizer": str(other)})
    prepare_data(cfg, "other", tmp_path / "dataset")
    with pytest.raises(StepError, match="vocabulary differs from teacher.uri .*set data.tokenizer: auto"):
        import_teacher(cfg, "other", tmp_path / "dataset", tmp_path / "teacher")


def test_a_registered_model_of_mlflows_transformers_flavor_is_a_teacher(prepared: dict, tmp_path: Path) -> None:
    """teacher.source mlflow accepts a transformers-flavor model: its tokenizer for data.tokenizer auto, its
    model as the teacher (loaded like a save_pretrained directory: safetensors, no remote code)."""
    uri = prepared["cfg"].tracking.tracking_uri
    client = MlflowClient(uri, uri)
    run_id = client.create_run(client.create_experiment(f"hf-flavor-{uuid.uuid4().hex[:6]}")).info.run_id
    pieces = {
        "model": AutoModelForSequenceClassification.from_pretrained(prepared["bert"]),
        "tokenizer": AutoTokenizer.from_pretrained(prepared["bert"]),
    }
    name = f"hf-teacher-{uuid.uuid4().hex[:6]}"
    # Registered while the run is MLflow's active one: the registry resolves the logged model through it.
    with fluent_run(client, run_id):
        info = mlflow.transformers.log_model(
            pieces, name="hf", task="text-classification", pip_requirements=["transformers"]
        )
        version = ModelRegistry(client, name).register(info.model_uri, run_id, {}, info.model_id)
    cfg = text_config(
        prepared["tmp"], prepared["bert"], teacher={"source": "mlflow", "uri": f"models:/{name}/{version}"}
    )
    prepare_data(cfg, "flavor", tmp_path / "dataset")
    meta = load_splits(tmp_path / "dataset").meta
    assert meta.text is not None and meta.text.tokenizer_origin == "teacher"
    summary = import_teacher(cfg, "flavor", tmp_path / "dataset", tmp_path / "teacher")
    assert summary["imported_from"] == f"models:/{name}/{version}"
    teacher, spec = quantization.load_model(tmp_path / "teacher")
    assert spec["arch"] == "huggingface" and (tmp_path / "teacher" / "tokenizer.json").is_file()
    imported, _ = quantization.load_model(prepared["teacher"])
    ids = torch.from_numpy(load_splits(tmp_path / "dataset").x["val"][:16])
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids), imported(ids))


def test_a_transformer_student_learns_its_layers_and_attention(prepared: dict, tmp_path: Path) -> None:
    """TinyBERT/MiniLM through the step: hidden-state MSE and attention KL read the Hugging Face
    teacher's own encoder layers (``bert.encoder.layer.N``), and the student starts from the
    teacher's embeddings and every other layer (DistilBERT init)."""
    cfg = prepared["cfg"].model_copy(deep=True)
    tinybert(cfg)
    history = tmp_path / "history.json"
    summary = distill(cfg, "tinybert", prepared["dataset"], prepared["teacher"], tmp_path / "student", history)
    epochs = json.loads(history.read_text())
    assert summary["epochs_run"] == 2 and len(epochs) == 2
    for row in epochs:  # every term was computed on every epoch, and none is degenerate
        for term in ("loss_hidden_mse", "loss_attention_kl", "loss_kd", "loss_ce"):
            assert row[term] > 0 and row[term] == row[term], (term, row)
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(summary["run_id"])
    assert run.data.params["teacher_logit_cache"] == "false"  # feature terms run the teacher live
    model, spec = quantization.load_model(tmp_path / "student")
    assert spec["arch"] == "transformer" and (tmp_path / "student" / "tokenizer.json").is_file()
    ids = torch.from_numpy(load_splits(prepared["dataset"]).x["test"][:4])
    with torch.no_grad():
        assert model(ids).shape == (4, 3)


def test_a_distilbert_teacher_is_imported_and_taught_to_a_transformer_student(tmp_path: Path) -> None:
    """A DistilBERT save_pretrained directory as the teacher: imported with its own tokenizer, its
    layers (``distilbert.transformer.layer.N``) read by hidden_mse and attention_kl, and its
    weights the student's start (DistilBERT's layers copied into a BERT of the same width)."""
    with SAMPLE.open(newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f)]
    teacher_dir = save_tiny_bert(
        tmp_path / "distilbert", texts=texts, labels=CLASSES, max_positions=MAX_LENGTH, arch="distilbert"
    )
    cfg = text_config(tmp_path, teacher_dir)
    tinybert(cfg)
    prepare_data(cfg, "setup", tmp_path / "dataset")
    import_teacher(cfg, "setup", tmp_path / "dataset", tmp_path / "teacher")
    teacher, spec = quantization.load_model(tmp_path / "teacher")
    assert spec["arch"] == "huggingface" and spec["params"]["config"]["model_type"] == "distilbert"
    ids = torch.from_numpy(load_splits(tmp_path / "dataset").x["val"][:8])
    reference = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids), reference(input_ids=ids, attention_mask=(ids != 0).long()).logits)
    history = tmp_path / "history.json"
    summary = distill(cfg, "distilbert", tmp_path / "dataset", tmp_path / "teacher", tmp_path / "student", history)
    for row in json.loads(history.read_text()):
        for term in ("loss_hidden_mse", "loss_attention_kl", "loss_kd", "loss_ce"):
            assert row[term] > 0 and row[term] == row[term], (term, row)
    assert summary["epochs_run"] == 2
    model, spec = quantization.load_model(tmp_path / "student")
    assert spec["arch"] == "transformer"
    with torch.no_grad():
        assert model(ids).shape == (8, 3)
