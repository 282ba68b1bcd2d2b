"""What the two training steps (``train_teacher``, ``distill``) share: the ranks, the run, the log.

A training step is one function that every rank of a multi-process step runs, the way a
single process does (torchtune / nanoGPT style): the same data, model, objective and loop on
every rank, so the collectives inside ``kd_lib.train.loop`` line up. Only the main rank
(``kd_lib.train.ranks.is_main``: a single process, or rank 0) writes: its ``recorder`` is the
step's MLflow run and it alone saves models, histories and checkpoints; the other ranks get a
``NullRun`` and a silent progress bar, and write nothing.

With ``train.distributed.nproc_per_node > 1`` and not already inside a rank, the step starts
its ranks first (``launch_ranks``) and returns what rank 0 reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from kd_lib.adapters.tracking import step_run
from kd_lib.artifacts import write_history
from kd_lib.config import PipelineConfig

# steps -> launch, against the layering, for one purpose: a training step starts its own ranks
# (torchrun) when asked for several processes. launch.torchrun imports nothing from steps or
# launch.worker (it names the worker module as a string), so there is no cycle.
from kd_lib.launch import torchrun
from kd_lib.steps.common import Recorder
from kd_lib.train import loop as training
from kd_lib.train import ranks
from kd_lib.train.progress import EpochProgress

TrainingStep = Literal["train_teacher", "distill"]


class NullRun:
    """A non-main rank's stand-in for the step's MLflow run: the same methods, recording nothing."""

    run_id = ""
    parent_run_id = ""

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def set_tags(self, tags: dict[str, Any], on_parent: bool = False) -> None:
        pass

    def log_dict(self, obj: Any, filename: str, on_parent: bool = False) -> None:
        pass

    def log_text(self, text: str, filename: str, on_parent: bool = False) -> None:
        pass

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        pass


@contextmanager
def recorder(cfg: PipelineConfig, pipeline_run_id: str, step: TrainingStep) -> Iterator[Recorder]:
    """The step's nested MLflow run on the main rank (``kd_lib.adapters.tracking.step_run``), a
    ``NullRun`` on the others."""
    if ranks.is_main():
        with step_run(cfg, pipeline_run_id, step) as run:
            yield run
    else:
        yield NullRun()


def progress(step: TrainingStep, epochs: int) -> EpochProgress:
    """The per-epoch progress lines; silent on non-main ranks (rank 0 prints the group's)."""
    return EpochProgress(step, epochs, mode=None if ranks.is_main() else "off")


def launch_ranks(cfg: PipelineConfig, step: TrainingStep, pipeline_run_id: str, **paths: Any) -> dict[str, Any]:
    """Run ``step`` on ``<step>.train.distributed.nproc_per_node`` processes under torchrun.

    Each rank runs ``kd_lib.launch.worker``, which calls this same step function; rank 0's
    MLflow run, checkpoints and outputs are the ones a single process makes, and its summary
    is returned here.

    Args:
        paths: The step's directory and file arguments (None for one not given).
    """
    request = {
        "config_json": cfg.to_json(),
        "pipeline_run_id": pipeline_run_id,
        "paths": {k: str(Path(v).absolute()) if v is not None else None for k, v in paths.items()},
    }
    train_cfg = cfg.teacher.train if step == "train_teacher" else cfg.distill.train
    return torchrun.launch_step(step, request, train_cfg.distributed)


def checkpoint_dir(output_dir: str | Path) -> Path:
    """Beside the step's output (not inside it: the artifact's size is what the gate measures).

    Resuming needs this to survive the task: true for kfp.local and for KFP's retry of a task
    on a persistent volume; on ephemeral pod storage a preempted pod starts over (same seed,
    same result, only slower).
    """
    out = Path(output_dir)
    return out.with_name(out.name + ".checkpoint")


def epoch_logger(run: Recorder, bar: EpochProgress | None = None, prefix: str = "") -> Callable[[dict[str, Any]], None]:
    """The loop's ``on_epoch``: each epoch's numbers as metrics at step ``epoch`` (named
    ``<prefix><name>``), and a progress line when ``bar`` is given."""

    def log(row: dict[str, Any]) -> None:
        run.log_metrics({f"{prefix}{k}": v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))
        if bar is not None:
            bar(row)

    return log


def log_result(
    run: Recorder, result: training.TrainResult, bar: EpochProgress, history_path: str | Path | None
) -> dict[str, Any]:
    """Close the progress bar, log the run's summary and history; returns the summary.

    The history goes to ``history_path`` (JSON, for the report) when given and on the main
    rank only.
    """
    summary = {
        "best_epoch": result.best_epoch,
        "best_val_accuracy": result.best_val_accuracy,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
    }
    bar.done(result.best_epoch, len(result.history), result.best_val_accuracy, result.stopped_early, result.keep)
    run.log_metrics({k: float(v) for k, v in summary.items()})
    run.log_dict(result.history, "history.json")
    if history_path is not None and ranks.is_main():
        write_history(history_path, result.history)
    return summary
