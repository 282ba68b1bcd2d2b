"""One promoting pipeline's registry end, run as its own process by test_promotion.py.

For each round it waits for the shared start time, then registers its candidate (a real
version with a real artifact) and converges the champion alias, exactly as the register
step does. Prints one JSON line per round: what it registered and what it saw at the end.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kd_lib.adapters.model_registry import ModelRegistry


def main() -> None:
    uri, prefix, worker, accuracy, start, period, rounds = sys.argv[1:8]
    client = MlflowClient(uri, uri)
    try:
        exp_id = client.create_experiment(f"race-{prefix}-{worker}")
    except MlflowException:  # a retried request whose first attempt had succeeded
        exp = client.get_experiment_by_name(f"race-{prefix}-{worker}")
        assert exp is not None  # create_experiment failed because an earlier attempt made it
        exp_id = exp.experiment_id
    for r in range(int(rounds)):
        run = client.create_run(exp_id, run_name=f"round{r}-worker{worker}")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "weights.txt").write_text(f"worker {worker} round {r}")
            client.log_artifacts(run.info.run_id, tmp, "model")
        registry = ModelRegistry(client, f"{prefix}-{r}")
        tags = {
            "validation_status": "passed",
            "kdflow.test_accuracy": accuracy,
            "kdflow.size_bytes": "1000",
            "kdflow.pipeline_run_id": f"race-{r}-{worker}",
        }
        # All workers of a round start registering at the same instant.
        time.sleep(max(0.0, float(start) + r * float(period) - time.time()))
        version = registry.register(f"runs:/{run.info.run_id}/model", run.info.run_id, tags)
        champion = registry.converge("champion", "accuracy")
        client.set_terminated(run.info.run_id)
        print(
            "RESULT",
            json.dumps({"round": r, "worker": worker, "version": version, "champion_seen": champion}),
            flush=True,
        )


if __name__ == "__main__":
    main()
