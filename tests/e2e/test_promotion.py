"""Promotion under production conditions, against a real `mlflow server` on 127.0.0.1
(PostgreSQL-backed when KDFLOW_TEST_POSTGRES_URI is set, as in CI and on the cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]
WORKERS = ["0.910", "0.950", "0.930", "0.890"]  # each worker's candidate accuracy; 0.950 must win
ROUNDS = 6


@pytest.mark.e2e
@pytest.mark.slow  # ~40 s; champion rules run in make test (tests/kd_lib/steps/test_promotion.py), the race only here
def test_concurrent_promotion_always_ends_on_the_best(mlflow_server) -> None:
    prefix = f"race-{uuid.uuid4().hex[:6]}"
    period = 4.0  # seconds between rounds: every worker registers at the same instant each round
    start = time.time() + 12.0  # time for the workers to import mlflow before round 0
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.e2e.race_worker",
                mlflow_server.url,
                prefix,
                str(i),
                acc,
                str(start),
                str(period),
                str(ROUNDS),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, acc in enumerate(WORKERS)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):  # one communicate() per process
        assert p.returncode == 0, err[-3000:]
    reports = [json.loads(line[7:]) for out, _ in outputs for line in out.splitlines() if line.startswith("RESULT ")]
    assert len(reports) == ROUNDS * len(WORKERS)

    client = MlflowClient(mlflow_server.url, mlflow_server.url)
    for r in range(ROUNDS):
        name = f"{prefix}-{r}"
        versions = client.search_model_versions(f"name = '{name}'")
        # None lost, none duplicated, every one kept its tags.
        assert len(versions) == len(WORKERS)
        assert sorted(v.tags["kdflow.test_accuracy"] for v in versions) == sorted(WORKERS)
        assert all(v.tags["validation_status"] == "passed" for v in versions)
        best = max(versions, key=lambda v: float(v.tags["kdflow.test_accuracy"]))
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.version == best.version, f"round {r}: champion v{champion.version}, best v{best.version}"
