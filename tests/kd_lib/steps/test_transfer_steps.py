"""A text transfer set through the steps (prepare_data -> train_teacher -> distill), real files and
a real sqlite MLflow store: half of the shipped movie_toy reviews labeled, the other half's texts
unlabeled. The same pipeline without the transfer set is the control: the KD student with it is
closer to the teacher on the transfer texts, the baseline never sees them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from kd_lib.artifacts.dataset_dir import load_splits
from kd_lib.compress import quantization
from kd_lib.config import ConfigError
from kd_lib.data.dataset import sample_path
from kd_lib.steps.distill import distill
from kd_lib.steps.prepare_data import prepare_data
from kd_lib.steps.train_teacher import train_teacher
from tests.helpers import tiny_config

LABELED = 300  # the first rows keep their labels; the other 600 are the transfer set


def _config(tmp: Path, transfer: Path | None):
    return tiny_config(
        tmp,
        data={"source": str(tmp / "labeled.csv"), "text_column": "text", "max_length": 40},
        teacher={
            "model": {"arch": "transformer", "params": {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32}},
            "train": {"epochs": 3, "batch_size": 32, "lr": 0.003},
        },
        student={"model": {"arch": "textcnn", "params": {"embedding": 16, "channels": 8, "kernel_sizes": [3]}}},
        distill={
            "baseline": True,
            "losses": [{"name": "kd", "weight": 0.9, "params": {"temperature": 2.0}}, {"name": "ce", "weight": 0.1}],
            "train": {"epochs": 3, "batch_size": 64, "lr": 0.01, "keep": "last"},
            "transfer_source": None if transfer is None else str(transfer),
        },
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("transfer-steps")
    rows = pd.read_csv(sample_path("movie_toy"))
    rows.iloc[:LABELED].to_csv(tmp / "labeled.csv", index=False)
    transfer = tmp / "unlabeled.jsonl"
    rows.iloc[LABELED:][["text"]].to_json(transfer, orient="records", lines=True)
    with_transfer, without = _config(tmp, transfer), _config(tmp, None)
    dirs = {name: tmp / name for name in ("data_t", "data_p", "teacher", "student_t", "student_p", "base_t", "base_p")}
    meta = prepare_data(with_transfer, "transfer", dirs["data_t"])
    prepare_data(without, "plain", dirs["data_p"])
    train_teacher(without, "plain", dirs["data_p"], dirs["teacher"])
    summary = distill(
        with_transfer, "transfer", dirs["data_t"], dirs["teacher"], dirs["student_t"], tmp / "history.json",
        baseline_dir=dirs["base_t"],
    )  # fmt: skip
    distill(without, "plain", dirs["data_p"], dirs["teacher"], dirs["student_p"], baseline_dir=dirs["base_p"])
    return {"cfg": with_transfer, "plain": without, "meta": meta, "summary": summary, "tmp": tmp, **dirs}


def test_prepare_data_encodes_the_transfer_texts_with_the_train_tokenizer_and_logs_them(run: dict) -> None:
    transfer, plain = load_splits(run["data_t"], transfer=True), load_splits(run["data_p"])
    assert transfer.transfer is not None and transfer.transfer.shape == (900 - LABELED, 40)
    # The labeled splits and the tokenizer are those of the same data without a transfer set.
    assert (run["data_t"] / "tokenizer.json").read_bytes() == (run["data_p"] / "tokenizer.json").read_bytes()
    np.testing.assert_array_equal(transfer.x["train"], plain.x["train"])
    assert transfer.meta.transfer is not None and run["meta"]["transfer"]["size"] == 900 - LABELED
    assert transfer.meta.fingerprint != plain.meta.fingerprint
    client = MlflowClient(run["cfg"].tracking.tracking_uri)
    [step] = client.search_runs(
        [client.get_experiment_by_name(run["cfg"].tracking.experiment).experiment_id],  # type: ignore[union-attr]
        "tags.`kdflow.step` = 'prepare_data' and params.transfer_size = '600'",
    )
    assert step.data.params["transfer_fingerprint"] == transfer.meta.transfer.fingerprint
    assert step.data.params["transfer_source"] == run["cfg"].distill.transfer_source
    assert step.data.metrics["n_transfer"] == 600 and step.data.metrics["n_train"] == transfer.meta.sizes["train"]


def _kl_to_teacher(model_dir: Path, teacher_dir: Path, ids: torch.Tensor) -> float:
    """Mean KL(teacher || student) of the softmax outputs on ``ids``."""
    student, _ = quantization.load_model(model_dir)
    teacher, _ = quantization.load_model(teacher_dir)
    with torch.no_grad():
        log_s, log_t = student(ids).log_softmax(1), teacher(ids).log_softmax(1)
    return float((log_t.exp() * (log_t - log_s)).sum(1).mean())


def test_the_kd_student_learns_the_teacher_on_the_transfer_texts(run: dict) -> None:
    ids = torch.from_numpy(load_splits(run["data_t"], transfer=True).transfer)
    with_transfer = _kl_to_teacher(run["student_t"], run["teacher"], ids)
    without = _kl_to_teacher(run["student_p"], run["teacher"], ids)
    assert with_transfer < 0.7 * without, (with_transfer, without)
    client = MlflowClient(run["cfg"].tracking.tracking_uri)
    params = client.get_run(run["summary"]["run_id"]).data.params
    assert params["transfer_size"] == "600" and params["transfer_source"].endswith("unlabeled.jsonl")
    history = json.loads((run["tmp"] / "history.json").read_text())
    assert len(history) == 3 and all(np.isfinite(row["loss_ce"]) for row in history)


def test_the_baseline_never_sees_the_transfer_set(run: dict) -> None:
    # Same seed, same labeled data, cross-entropy alone: the same weights with or without a transfer set.
    a, _ = quantization.load_model(run["base_t"])
    b, _ = quantization.load_model(run["base_p"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # ... while the KD students differ: the transfer set changed what the KD student learnt.
    kd_t, _ = quantization.load_model(run["student_t"])
    kd_p, _ = quantization.load_model(run["student_p"])
    assert not all(torch.equal(v, kd_p.state_dict()[k]) for k, v in kd_t.state_dict().items())


def test_a_dataset_prepared_without_the_transfer_set_is_refused(run: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="distill.transfer_source is .*unlabeled.jsonl' but the prepared dataset"):
        distill(run["cfg"], "mismatch", run["data_p"], run["teacher"], tmp_path / "student")
