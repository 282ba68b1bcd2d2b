"""MLflow basic auth against a real `mlflow server --app-name basic-auth` on 127.0.0.1."""

from __future__ import annotations

import json
import urllib.request
from base64 import b64encode
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kd_lib.adapters.model_registry import RegistryError
from kd_lib.steps.distill import distill
from kd_lib.steps.evaluate import evaluate
from kd_lib.steps.gate import gate
from kd_lib.steps.prepare_data import prepare_data
from kd_lib.steps.quantize import quantize
from kd_lib.steps.register import register
from kd_lib.steps.train_teacher import train_teacher
from tests.conftest import ADMIN
from tests.helpers import experiment_id, tiny_config

pytestmark = pytest.mark.e2e
ALICE = ("alice", "alice-Secret-9f8e7d6c")


def _admin_post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{url}{path}",
        data=json.dumps(body).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + b64encode(":".join(ADMIN).encode()).decode(),
        },
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


@pytest.mark.slow
def test_user_without_edit_gets_a_clear_error_and_nothing_is_registered(
    auth_mlflow_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    url = auth_mlflow_server.url
    _admin_post(url, "/api/2.0/mlflow/users/create", {"username": ALICE[0], "password": ALICE[1]})
    cfg = tiny_config(
        tmp_path,
        tracking={"tracking_uri": url},
        teacher={"train": {"epochs": 2}},
        distill={"train": {"epochs": 2}},
        gate={"min_accuracy": 0.0, "max_accuracy_drop": 100.0, "max_quantization_drop": 100.0},
    )
    # The model exists and belongs to the admin: alice, by default, may only read it.
    _admin_post(url, "/api/2.0/mlflow/registered-models/create", {"name": cfg.registry.model_name})
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ALICE[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ALICE[1])

    d = {n: tmp_path / n for n in ("dataset", "teacher", "student", "quantized")}
    prepare_data(cfg, "auth-run", d["dataset"])  # alice may create her own runs
    train_teacher(cfg, "auth-run", d["dataset"], d["teacher"])
    distill(cfg, "auth-run", d["dataset"], d["teacher"], d["student"])
    quantize(cfg, "auth-run", d["dataset"], d["student"], d["quantized"])
    evaluate(
        cfg,
        "auth-run",
        d["dataset"],
        {"teacher": d["teacher"], "student": d["student"], "quantized": d["quantized"]},
        tmp_path / "evaluation.json",
    )
    _, action = gate(cfg, "auth-run", d["dataset"], tmp_path / "evaluation.json", tmp_path / "decision.json")
    assert action == "promote"
    with pytest.raises(RegistryError) as err:
        register(
            cfg, "auth-run", d["dataset"], d["quantized"], tmp_path / "evaluation.json", tmp_path / "decision.json"
        )
    message = str(err.value)
    assert "denied user 'alice' permission to register" in message and "grant EDIT" in message
    assert url in message

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    admin = MlflowClient(url, url)
    assert admin.search_model_versions(f"name = '{cfg.registry.model_name}'") == []
    assert admin.get_registered_model(cfg.registry.model_name).aliases == {}
    # Alice's password went over the wire in a header, never into what was recorded.
    runs = admin.search_runs([experiment_id(admin, cfg.tracking.experiment)])
    recorded = json.dumps([[r.data.params, r.data.tags] for r in runs]) + capfd.readouterr().out
    assert ALICE[1] not in recorded
