"""Tracking against a real sqlite MLflow store (no mocks)."""

import os
import socket
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kd_lib.adapters import tracking
from kd_lib.config import PipelineConfig, RetryConfig
from tests.conftest import MlflowServer
from tests.helpers import tiny_config


def test_relative_sqlite_uri_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert tracking.absolute_tracking_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert tracking.absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_uri_resolution_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(PipelineConfig()) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert tracking.resolve_tracking_uri(PipelineConfig()) == "http://from-env:5000"
    cfg = PipelineConfig.model_validate({"tracking": {"tracking_uri": "http://from-config:5000"}})
    assert tracking.resolve_tracking_uri(cfg) == "http://from-config:5000"


def test_unreachable_server_fails_fast_naming_it() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError, match=f"127.0.0.1:{port} is unreachable"):
        tracking.check_reachable(f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 10


def test_steps_nest_under_one_parent_run(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path)
    with tracking.step_run(cfg, "pipe-1", "prepare_data") as a:
        a.log_metrics({"n": 3})
    with pytest.raises(RuntimeError, match="boom"):
        with tracking.step_run(cfg, "pipe-1", "train_teacher"):
            raise RuntimeError("boom")
    with tracking.step_run(cfg, "pipe-2", "prepare_data") as other:
        pass
    assert a.parent_run_id != other.parent_run_id
    client = MlflowClient(cfg.tracking.tracking_uri)
    children = tracking.pipeline_record(client, a.parent_run_id)["steps"]
    assert set(children) == {"prepare_data", "train_teacher"}
    assert client.get_run(children["prepare_data"]).info.status == "FINISHED"
    assert client.get_run(children["train_teacher"]).info.status == "FAILED"
    parent = client.get_run(a.parent_run_id)
    assert parent.data.params["distill.train.epochs"] == "8"
    assert parent.data.tags["kdflow.config_hash"] == cfg.config_hash()
    assert tracking.finish_pipeline_run(cfg, "pipe-1", "FAILED", "task x failed") == a.parent_run_id
    parent = client.get_run(a.parent_run_id)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["kdflow.pipeline_error"] == "task x failed"


def test_sub_second_timeout_still_reaches_the_server(
    tmp_path: Path, mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow reads MLFLOW_HTTP_REQUEST_TIMEOUT as a whole number of seconds: 0.5 s must become 1 s
    (rounded up), never 0, with which every HTTP request to the server would fail."""
    for var in ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"):
        monkeypatch.setenv(var, "")  # apply_retry_policy sets them; monkeypatch puts them back afterwards
    cfg = tiny_config(tmp_path, tracking={"tracking_uri": mlflow_server.url, "retry": {"timeout_s": 0.5}})
    with tracking.step_run(cfg, "pipe-fast", "prepare_data") as run:
        run.log_metrics({"n": 3})
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "1"
    assert MlflowClient(mlflow_server.url).get_run(run.run_id).data.metrics["n"] == 3
    tracking.apply_retry_policy(RetryConfig(timeout_s=2.1))
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
