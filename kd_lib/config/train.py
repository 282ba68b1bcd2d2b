"""The models and how they are trained: ``teacher:``, ``student:`` and ``distill:``.

``TrainConfig`` (optimizer, schedule, early stopping, device, data parallelism) is shared by
the teacher's training and the distillation; ``DistillConfig`` adds the weighted loss terms.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from kd_lib.config.base import _Strict
from kd_lib.config.data import AugmentConfig


class ModelConfig(_Strict):
    arch: str = Field("mlp", description="A name in kd_lib.models.builders.MODELS ('mlp', 'cnn') or 'pkg.module:fn'.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the builder.")


class DistributedConfig(_Strict):
    """Data-parallel training over several processes: torchrun + DistributedDataParallel.

    Each epoch's shuffled order and every global batch of ``batch_size`` samples are those of
    a single process; each process takes its slice of every batch and DDP averages the
    gradients, so the weights match single-process training up to float reduction order.
    """

    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Processes on this machine (on a cluster: per pod). 1 trains in the step's own process; "
        "more launches torchrun with that many ranks (typically one per GPU, or a few CPU processes).",
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="Collective backend; auto: nccl when the device is cuda, gloo on cpu."
    )
    timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest a rank waits for the others in one collective (start-up included) before it fails "
        "the step, e.g. when another rank died or hangs. Covers rank 0's per-epoch MLflow logging.",
    )
    threads_per_process: int | None = Field(
        None, ge=1, description="torch CPU threads of each process; None = the machine's cores / nproc_per_node."
    )


class TrainConfig(_Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    patience: int = Field(
        5,
        ge=1,
        description="Early stopping: epochs without a better validation accuracy (or the same accuracy at a "
        "lower validation loss); the best epoch's weights are kept. Only with keep: best.",
    )
    keep: Literal["best", "last"] = Field(
        "best",
        description="Which epoch's weights the step returns. best: the best validation epoch, with early stopping "
        "(patience). last: the final epoch's, no early stopping, the usual protocol with a schedule that anneals "
        "to zero; picking the best of many epochs on a few hundred validation samples selects noise.",
    )
    seed: int = 0
    device: str = Field("cpu", description="'cpu', 'cuda' or 'auto' (cuda when available).")
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Multi-process data-parallel training (nproc_per_node > 1)."
    )
    augment: AugmentConfig | None = Field(
        None,
        description="This step's training-batch augmentation, replacing data.augment for it; unset uses data.augment. "
        "Augmenting the teacher's training only (teacher.train.augment) keeps the student's teacher-logit cache.",
    )

    @model_validator(mode="after")
    def _backend_fits_device(self) -> TrainConfig:
        if self.distributed.backend == "nccl" and self.device == "cpu":
            raise ValueError(
                "distributed.backend 'nccl' needs a GPU but device is 'cpu': use backend gloo (or auto), or device cuda"
            )
        return self

    @model_validator(mode="after")
    def _patience_needs_best(self) -> TrainConfig:
        # On its value, not on whether it was written: the config travels between steps as a
        # full dump (``to_json``), where every field is written.
        if self.keep == "last" and self.patience != type(self).model_fields["patience"].default:
            raise ValueError(
                "patience stops early at the best validation epoch, but keep 'last' trains every epoch and "
                "keeps the final one: remove patience, or set keep: best"
            )
        return self


class TeacherConfig(_Strict):
    source: Literal["train", "mlflow", "checkpoint"] = Field(
        "train",
        description="train: train `model` on the data with `train`; mlflow: import a kdflow model registered in "
        "MLflow (`uri` e.g. models:/teacher@champion), no training step; checkpoint: a state_dict file (`uri`, "
        "local path or s3://) for the architecture `model`, loaded with weights_only=True.",
    )
    uri: str | None = Field(
        None,
        description="mlflow: models:/<name>@<alias> or models:/<name>/<version>; checkpoint: path or s3:// URI "
        "of the weights.",
    )
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(arch="mlp", params={"width": 256, "depth": 2}))
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _uri_matches_source(self) -> TeacherConfig:
        if self.source == "train" and self.uri is not None:
            raise ValueError("uri is only read when source is 'mlflow' or 'checkpoint'; remove it or set source")
        if self.source == "mlflow" and not (self.uri or "").startswith("models:/"):
            raise ValueError("source 'mlflow' needs uri: models:/<name>@<alias> or models:/<name>/<version>")
        if self.source == "checkpoint" and not self.uri:
            raise ValueError("source 'checkpoint' needs uri: the weights file (local path or s3://bucket/key)")
        return self


class StudentConfig(_Strict):
    model: ModelConfig = Field(default_factory=lambda: ModelConfig(arch="mlp", params={"width": 32, "depth": 1}))


class LossTermConfig(_Strict):
    """One weighted term of the distillation objective."""

    name: str = Field(..., min_length=1, description="A name in kd_lib.train.losses.LOSSES: ce, kd, dkd, fitnets, at.")
    weight: float = Field(1.0, ge=0, description="Multiplier of this term in the sum.")
    params: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the loss, e.g. {temperature: 4}."
    )


def _default_losses() -> list[LossTermConfig]:
    return [
        LossTermConfig(name="kd", weight=0.9, params={"temperature": 4.0}),
        LossTermConfig(name="ce", weight=0.1),
    ]


class DistillConfig(_Strict):
    losses: list[LossTermConfig] = Field(
        default_factory=_default_losses,
        min_length=1,
        description="Weighted sum of KD losses, e.g. [{name: kd, weight: 0.9, params: {temperature: 4}}, "
        "{name: ce, weight: 0.1}]; [{name: ce}] alone trains the student without a teacher (the baseline).",
    )
    train: TrainConfig = Field(default_factory=TrainConfig)
    baseline: bool = Field(
        False,
        description="Also train the same student without the teacher (losses [ce]; same architecture, initial "
        "weights, epochs, schedule, batch order and augmentation) and report KD's gain on the test split. "
        "Doubles the distill step's time.",
    )
    promote: Literal["better", "kd"] = Field(
        "better",
        description="With baseline on: 'better' sends the baseline on to quantize, gate and register instead of "
        "the KD student when the baseline is significantly more accurate on the test split (exact McNemar test, "
        "p < 0.05), and says so in the summary, report and version tags; 'kd' always sends the KD student and "
        "fails the gate with that reason instead.",
    )

    @model_validator(mode="after")
    def _some_weight(self) -> DistillConfig:
        if not any(term.weight > 0 for term in self.losses):
            raise ValueError("losses: every weight is 0; give at least one term a positive weight")
        return self

    @property
    def uses_teacher(self) -> bool:
        """False when only hard-label terms have weight: the teacher is then never run."""
        return any(term.weight > 0 and term.name != "ce" for term in self.losses)
