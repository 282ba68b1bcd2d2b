"""Run the very same DAG on this machine with KFP's own local runner (kfp.local)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd_lib import tracking
from kd_lib.config import PipelineConfig


@dataclass
class LocalRunResult:
    """What a local run did: its id, whether every task succeeded, and what MLflow recorded."""

    pipeline_run_id: str
    succeeded: bool
    error: str
    pipeline_root: Path
    wall_s: float
    parent_run_id: str | None
    summary: dict[str, Any] = field(default_factory=dict)


def run_local(cfg: PipelineConfig, root: str | Path = ".kdflow/runs") -> LocalRunResult:
    """Run the pipeline with ``kfp.local.SubprocessRunner(use_venv=False)``.

    Each task is a subprocess of this Python; they inherit the environment, so the tracking
    URI is resolved (and made absolute) here once and exported for them.
    """
    from kfp import local

    from pipelines.distillation import distillation_pipeline

    uri = tracking.absolute_tracking_uri(tracking.resolve_tracking_uri(cfg))
    tracking.check_reachable(uri)
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cfg = cfg.model_copy(deep=True)
    cfg.tracking.tracking_uri = None  # the environment carries it: no server address in the params

    # One fresh pipeline root per invocation: the single job directory kfp.local creates in
    # it tells us the job name, which is the pipeline run id the steps tagged MLflow with.
    invocation = Path(root).resolve() / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    invocation.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(invocation), raise_on_error=True)
    start = time.perf_counter()
    error = ""
    try:
        distillation_pipeline(config_json=cfg.to_json())
    except RuntimeError as err:  # kfp.local raises RuntimeError naming the failed task
        error = str(err)
    wall = time.perf_counter() - start
    jobs = [p.name for p in invocation.iterdir() if p.is_dir()]
    run_id = jobs[0] if len(jobs) == 1 else ""
    client = tracking.client_for(cfg)
    parent = tracking.find_parent_run(client, cfg.tracking.experiment, run_id) if run_id else None
    summary = tracking.pipeline_summary(cfg, parent) if parent else {}
    return LocalRunResult(run_id, not error, error, invocation / run_id, wall, parent, summary)
