"""One rank of a multi-process training step: ``torchrun ... -m kd_lib.launch.worker REQUEST.json``.

Started by ``kd_lib.train.distributed.launch_step`` (one machine) or by the pods of a PyTorchJob
(``kd_lib.launch.pytorchjob``). The request names the step and its arguments (JSON)::

    {"step": "distill", "config_json": "...", "pipeline_run_id": "...",
     "paths": {"dataset_dir": ..., "teacher_dir": ..., "student_dir": ..., "history_path": ...,
               "baseline_dir": ...},
     "summary_path": "..."}

Rank 0 runs the step function itself (``kd_lib.steps``): its MLflow run, its checkpoints, its
output model and history, then the summary at ``summary_path``. The other ranks set up the
same training inputs and run the same loops (for ``distill`` with ``distill.baseline``, the
no-teacher baseline too: every training run is a sequence of collectives all ranks must join),
writing nothing. Under torchrun the loop in
``kd_lib.train.loop`` finds the process group and trains data-parallel.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kd_lib.compress import quantization
from kd_lib.config import LossTermConfig, PipelineConfig, TrainConfig, config_from_json
from kd_lib.data import dataset as data_lib
from kd_lib.data.augment import augment_for
from kd_lib.models.builders import build_model, for_data
from kd_lib.train import distributed, losses
from kd_lib.train import loop as training

STEPS = ("train_teacher", "distill")


def train_config(cfg: PipelineConfig, step: str) -> TrainConfig:
    """The ``train`` section of a distributed step."""
    if step == "train_teacher":
        return cfg.teacher.train
    if step == "distill":
        return cfg.distill.train
    raise ValueError(f"step {step!r} does not train; distributed steps are {', '.join(STEPS)}")


def _tensors(splits: data_lib.Splits, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(splits.x[name]), torch.from_numpy(splits.y[name])


# The replicas: what steps.train_teacher / steps.distill hand to the training loop, without
# recording anything. Only the *training inputs* must match rank 0's (data, config, augment,
# objective, teacher): DDP copies rank 0's initial weights to every rank when it starts.


def _replica_train_teacher(cfg: PipelineConfig, dataset_dir: str, **_outputs: Any) -> None:
    splits = data_lib.load_splits(dataset_dir)
    shape = tuple(splits.meta.input_shape)
    torch.manual_seed(cfg.teacher.train.seed)
    model = build_model(cfg.teacher.model.arch, cfg.teacher.model.params, shape, splits.meta.num_classes)
    augment = augment_for(cfg, "teacher", shape)
    training.train_supervised(
        model, *_tensors(splits, "train"), *_tensors(splits, "val"), cfg.teacher.train, augment=augment
    )


def _replica_distill(
    cfg: PipelineConfig, dataset_dir: str, teacher_dir: str, baseline_dir: str | None = None, **_outputs: Any
) -> None:
    splits = data_lib.load_splits(dataset_dir)
    meta = splits.meta
    shape = tuple(meta.input_shape)
    objective = losses.build_objective(cfg.distill.losses)
    teacher = None
    if objective.needs_teacher:
        model, spec = quantization.load_model(teacher_dir)
        teacher = for_data(model, spec.get("normalization"), meta.normalization)
    augment = augment_for(cfg, "distill", shape)

    def train_student(teacher: torch.nn.Module | None, objective: losses.Objective) -> None:
        torch.manual_seed(cfg.distill.train.seed)
        student = build_model(cfg.student.model.arch, cfg.student.model.params, shape, meta.num_classes)
        training.distill(
            student,
            teacher,
            objective,
            *_tensors(splits, "train"),
            *_tensors(splits, "val"),
            cfg.distill.train,
            augment=augment,
        )

    train_student(teacher, objective)
    # steps.distill then trains the no-teacher baseline on rank 0 under the same condition.
    if baseline_dir is not None and cfg.distill.baseline:
        train_student(None, losses.build_objective([LossTermConfig(name="ce")]))


REPLICAS: dict[str, Callable[..., None]] = {"train_teacher": _replica_train_teacher, "distill": _replica_distill}


def run(request: dict[str, Any]) -> dict[str, Any] | None:
    """Run this rank's part of the request; rank 0 returns the step's summary, others None."""
    step = request["step"]
    cfg = config_from_json(request["config_json"])
    train_cfg = train_config(cfg, step)
    with distributed.init(train_cfg.distributed, train_cfg.device) as ranks:
        if not ranks.is_main:
            REPLICAS[step](cfg, **request["paths"])
            return None
        from kd_lib import steps  # rank 0 alone records: the other ranks never import MLflow

        summary = getattr(steps, step)(cfg, request["pipeline_run_id"], **request["paths"])
        Path(request["summary_path"]).parent.mkdir(parents=True, exist_ok=True)
        Path(request["summary_path"]).write_text(json.dumps(summary))
        return summary


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit(f"usage: torchrun ... -m {distributed.WORKER_MODULE} REQUEST.json")
    with distributed.recording_errors():
        run(json.loads(Path(args[0]).read_text()))


if __name__ == "__main__":
    main()
