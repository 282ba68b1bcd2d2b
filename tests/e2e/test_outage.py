"""MLflow restarting in the middle of a pipeline run (a real server process, stopped and
started again on the same port and store while the DAG runs on kfp.local)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipelines.local import LocalRunResult, run_local
from tests.helpers import tiny_config

pytestmark = pytest.mark.e2e


def _wait_for_step(client: MlflowClient, experiment: str, step: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name(experiment)
        if exp and client.search_runs([exp.experiment_id], filter_string=f"tags.`kdflow.step` = '{step}'"):
            return
        time.sleep(0.3)
    raise AssertionError(f"step {step} never started")


@pytest.mark.slow  # ~60 s; `make test-slow`
def test_server_restart_mid_run_completes_or_fails_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_server
) -> None:
    url = mlflow_server.url
    cfg = tiny_config(tmp_path, tracking={"tracking_uri": url}, distill={"train": {"epochs": 12, "patience": 20}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    results: list[LocalRunResult] = []
    t0 = time.monotonic()
    timeline: list[tuple[float, str]] = []
    runner = threading.Thread(target=lambda: results.append(run_local(cfg, root=tmp_path / "runs")))
    runner.start()

    client = MlflowClient(url, url)
    _wait_for_step(client, cfg.tracking.experiment, "distill", time.monotonic() + 240)
    timeline.append((time.monotonic() - t0, "distill started; stopping MLflow"))
    mlflow_server.stop()
    time.sleep(5)
    timeline.append((time.monotonic() - t0, "restarting MLflow"))
    mlflow_server.start()
    timeline.append((time.monotonic() - t0, "MLflow healthy again"))
    runner.join(timeout=400)
    assert not runner.is_alive()
    first = results[0]
    timeline.append((time.monotonic() - t0, f"pipeline {'SUCCEEDED' if first.succeeded else 'FAILED'}"))
    if not first.succeeded:  # failed cleanly: a re-run must complete
        rerun = run_local(cfg, root=tmp_path / "rerun")
        timeline.append((time.monotonic() - t0, f"re-run {'SUCCEEDED' if rerun.succeeded else 'FAILED'}"))
        assert rerun.succeeded, rerun.error
    print("\n".join(f"t={t:6.1f}s  {what}" for t, what in timeline))

    versions = client.search_model_versions(f"name = '{cfg.registry.model_name}'")
    # No half-registered version: each carries its validation record; at most one per pipeline run.
    assert versions and all(v.tags.get("validation_status") == "passed" for v in versions)
    run_ids = [v.tags["kdflow.pipeline_run_id"] for v in versions]
    assert len(run_ids) == len(set(run_ids))
    champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
    assert champion.tags["validation_status"] == "passed"
