"""One rank of a multi-process training step: ``torchrun ... -m kd_lib.launch.worker REQUEST.json``.

Started by ``kd_lib.launch.torchrun.launch_step`` (one machine) or by the pods of a PyTorchJob
(``kd_lib.launch.pytorchjob``). The request names the step and its arguments (JSON)::

    {"step": "distill", "config_json": "...", "pipeline_run_id": "...",
     "paths": {"dataset_dir": ..., "teacher_dir": ..., "student_dir": ..., "history_path": ...,
               "baseline_dir": ...},
     "summary_path": "..."}

Every rank joins the process group and calls the step function itself
(``kd_lib.steps.train_teacher`` / ``kd_lib.steps.distill``): the same data, model and loops
on every rank, so their collectives line up, and inside the step only rank 0 writes (its
MLflow run, its checkpoints, its output model and history), then the summary at
``summary_path`` here. Under torchrun the loop in ``kd_lib.train.loop`` finds the process
group and trains data-parallel.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd_lib.config import PipelineConfig, TrainConfig, config_from_json
from kd_lib.launch.torchrun import WORKER_MODULE
from kd_lib.steps.distill import distill
from kd_lib.steps.train_teacher import train_teacher
from kd_lib.train import ranks

STEPS: dict[str, Callable[..., dict[str, Any]]] = {"train_teacher": train_teacher, "distill": distill}


def train_config(cfg: PipelineConfig, step: str) -> TrainConfig:
    """The ``train`` section of a distributed step."""
    if step == "train_teacher":
        return cfg.teacher.train
    if step == "distill":
        return cfg.distill.train
    raise ValueError(f"step {step!r} does not train; distributed steps are {', '.join(STEPS)}")


def run(request: dict[str, Any]) -> dict[str, Any] | None:
    """Run this rank's part of the request; rank 0 returns the step's summary, others None."""
    step = request["step"]
    cfg = config_from_json(request["config_json"])
    train_cfg = train_config(cfg, step)
    with ranks.init(train_cfg.distributed, train_cfg.device) as group:
        summary = STEPS[step](cfg, request["pipeline_run_id"], **request["paths"])
        if not group.is_main:
            return None
        Path(request["summary_path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(request["summary_path"]).write_text(json.dumps(summary))
        return summary


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(f"usage: torchrun ... -m {WORKER_MODULE} REQUEST.json")
    with ranks.recording_errors():
        run(json.loads(Path(args[0]).read_text()))


if __name__ == "__main__":
    main()
