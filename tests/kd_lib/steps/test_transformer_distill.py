"""The distill step with a transformer student: DistilBERT initialization from the teacher and the
transformer intermediate losses (hidden_mse, attention_kl), on the shipped movie_toy reviews
with a real sqlite MLflow store. The KD student starts from the teacher's layers; the baseline
keeps its random initialization."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch

from kd_lib.compress import quantization
from kd_lib.steps.distill import distill
from kd_lib.steps.prepare_data import prepare_data
from kd_lib.steps.train_teacher import train_teacher
from tests.helpers import tiny_config

BERT: dict[str, Any] = {"arch": "transformer", "params": {"layers": 2, "hidden": 16, "heads": 2, "intermediate": 32}}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("transformer-distill")
    cfg = tiny_config(
        tmp,
        data={"source": "movie_toy", "text_column": "text", "max_length": 32},
        teacher={"model": BERT, "train": {"epochs": 1, "batch_size": 64, "lr": 0.003}},
        student={
            "model": {"arch": "transformer", "params": {**BERT["params"], "layers": 1}},
            "init_from_teacher": True,
        },
        distill={
            "baseline": True,
            "losses": [
                {"name": "kd", "weight": 0.5, "params": {"temperature": 2}},
                {"name": "hidden_mse", "weight": 1.0, "params": {"layers": [[1, 2]]}},
                {"name": "attention_kl", "weight": 1.0},
            ],
            # A learning rate too small to move a weight visibly: the saved student shows its start.
            "train": {"epochs": 1, "batch_size": 64, "lr": 1e-12},
        },
    )
    dirs = {name: tmp / name for name in ("dataset", "teacher", "student", "baseline")}
    prepare_data(cfg, "text", dirs["dataset"])
    train_teacher(cfg, "text", dirs["dataset"], dirs["teacher"])
    history = tmp / "history.json"
    summary = distill(
        cfg, "text", dirs["dataset"], dirs["teacher"], dirs["student"], history, baseline_dir=dirs["baseline"]
    )
    models = {role: quantization.load_model(dirs[role])[0] for role in ("teacher", "student", "baseline")}
    return {"summary": summary, "history": json.loads(history.read_text()), **models}


def test_the_kd_student_starts_from_the_teachers_last_layer_and_the_baseline_does_not(run: dict) -> None:
    teacher_layer = run["teacher"].bert.bert.encoder.layer[1].state_dict()  # teacher layer 2 of 2
    for role, expected in (("student", True), ("baseline", False)):
        layer = run[role].bert.bert.encoder.layer[0].state_dict()  # student layer 1 of 1
        same = all(torch.allclose(layer[k], teacher_layer[k], atol=1e-6) for k in layer)
        assert same is expected, role


def test_the_transformer_losses_ran_and_were_recorded(run: dict) -> None:
    assert run["summary"]["epochs_run"] == 1 and "baseline_best_val_accuracy" in run["summary"]
    (epoch,) = run["history"] if isinstance(run["history"], list) else run["history"]["history"]
    # Each term's per-epoch mean is recorded (student layer 1 has teacher layer 2's weights but
    # not its input, the teacher's layer 1 output, so neither term is 0).
    for term in ("loss_kd", "loss_hidden_mse", "loss_attention_kl"):
        assert math.isfinite(epoch[term]) and epoch[term] > 0, term
