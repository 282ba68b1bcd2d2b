"""A text model trained from scratch through the steps (prepare_data -> train_teacher -> distill
-> quantize) on the shipped movie_toy reviews, a real sqlite MLflow store and real files: the
tokenizer built from the train split, vocab_size and pad_id injected into the models and
recorded in their specs, tokenizer.json in every model directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kd_lib.artifacts.dataset_dir import load_splits
from kd_lib.compress import quantization
from kd_lib.steps.distill import distill
from kd_lib.steps.prepare_data import prepare_data
from kd_lib.steps.quantize import quantize
from kd_lib.steps.train_teacher import train_teacher
from tests.helpers import tiny_config

MAX_LENGTH = 40


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("text-steps")
    cfg = tiny_config(
        tmp,
        data={"source": "movie_toy", "text_column": "text", "max_length": MAX_LENGTH},
        teacher={
            "model": {"arch": "transformer", "params": {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32}},
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.003},
        },
        student={"model": {"arch": "textcnn", "params": {"embedding": 16, "channels": 8, "kernel_sizes": [3]}}},
        distill={"baseline": True, "train": {"epochs": 2, "batch_size": 64, "lr": 0.01}},
        quantize={"scheme": "auto", "candidates": ["none", "dynamic_int8"]},
        gate={"min_accuracy": 0.0, "max_accuracy_drop": 100.0, "max_quantization_drop": 100.0},
    )
    dirs = {name: tmp / name for name in ("dataset", "teacher", "student", "baseline", "quantized")}
    meta = prepare_data(cfg, "text", dirs["dataset"])
    teacher = train_teacher(cfg, "text", dirs["dataset"], dirs["teacher"])
    student = distill(cfg, "text", dirs["dataset"], dirs["teacher"], dirs["student"], baseline_dir=dirs["baseline"])
    quantized = quantize(
        cfg, "text", dirs["dataset"], dirs["student"], dirs["quantized"], dirs["teacher"], None, dirs["baseline"]
    )
    return {
        "cfg": cfg,
        "meta": meta,
        "summaries": {"teacher": teacher, "student": student, "quantize": quantized},
        **dirs,
    }


def test_prepare_data_writes_token_ids_and_the_tokenizer(run: dict) -> None:
    splits = load_splits(run["dataset"])
    text = run["meta"]["text"]
    assert text["tokenizer_origin"] == "trained" and text["pad_id"] == 0 and text["max_length"] == MAX_LENGTH
    assert splits.x["train"].dtype == np.int64 and splits.x["train"].shape == (630, MAX_LENGTH)
    assert splits.meta.input_shape == [MAX_LENGTH] and splits.meta.normalization == {}
    assert json.loads((run["dataset"] / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"


@pytest.mark.parametrize("role", ["teacher", "student", "baseline", "quantized"])
def test_every_model_directory_carries_the_tokenizer_and_rebuilds_from_its_spec(run: dict, role: str) -> None:
    directory = run[role]
    assert (directory / "tokenizer.json").read_bytes() == (run["dataset"] / "tokenizer.json").read_bytes()
    model, spec = quantization.load_model(directory)
    vocab = run["meta"]["text"]["vocab_size"]
    assert spec["params"]["vocab_size"] == vocab and spec["params"]["pad_id"] == 0
    assert spec["text"]["max_length"] == MAX_LENGTH and spec["input_shape"] == [MAX_LENGTH]
    ids = torch.from_numpy(load_splits(run["dataset"]).x["test"][:6])
    with torch.no_grad():
        logits = model(ids)
        trimmed = model(ids[:, : int((ids != 0).sum(1).max())])
    assert logits.shape == (6, 3)
    torch.testing.assert_close(trimmed, logits, atol=1e-4, rtol=1e-4)


def test_training_and_quantize_ran_on_the_text(run: dict) -> None:
    summaries = run["summaries"]
    assert summaries["teacher"]["epochs_run"] == 2 and 0.0 <= summaries["teacher"]["best_val_accuracy"] <= 1.0
    assert "baseline_best_val_accuracy" in summaries["student"]
    assert summaries["quantize"]["scheme"] in ("none", "dynamic_int8")
    assert 0.0 <= summaries["quantize"]["fp32_val_accuracy"] <= 1.0
    selection = json.loads((run["quantized"] / "selection.json").read_text())
    timed = {c["name"]: c for c in selection["candidates"]}
    assert set(timed) == {"none", "dynamic_int8"}
    assert all(set(c["latency_ms"]) == {"1", "64"} for c in timed.values() if c.get("latency_ms"))
