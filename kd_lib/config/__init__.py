"""The one configuration tree of a kdflow pipeline run.

Every default lives here. Every model is ``extra="forbid"`` so a misspelt key is an error
that names its dotted path instead of being silently ignored. Units are stated per field:
accuracies are fractions in [0, 1]; *drops* are percentage points (teacher 0.97 and student
0.95 is a drop of 2.0 points).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kd_lib import __version__
from kd_lib.errors import KdflowError


class ConfigError(KdflowError, ValueError):
    """A pipeline config is unreadable or invalid; the message lists every bad field."""

    default_fix = "correct the field(s) named above in the YAML file or in the --set override"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(_Strict):
    """Random transforms of *training* batches (never validation or test); images only for crop/flip.

    With any of them on, the teacher runs on every augmented batch instead of reading its
    cached logits (the cache holds logits of the un-augmented samples).
    """

    random_crop_padding: int = Field(
        0,
        ge=0,
        description="Pad each side with this many zero pixels, then crop back to the original size at a random offset; 0 = off.",
    )
    horizontal_flip: bool = Field(
        False, description="Mirror half of the images left-right (off for digits: a mirrored 3 is not a 3)."
    )
    noise_std: float = Field(0.0, ge=0, description="Std of Gaussian noise added to the normalized inputs; 0 = off.")

    @property
    def enabled(self) -> bool:
        return self.random_crop_padding > 0 or self.horizontal_flip or self.noise_std > 0


# What a data source is, from its name alone (the config is checked where the data may not be).
TABULAR_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
SOURCE_SUFFIXES = {".npz": "npz", **TABULAR_SUFFIXES}


def source_kind(source: str) -> str:
    """``'digits'``, ``'npz'``, ``'csv'``, ``'parquet'``, ``'folder'`` (no suffix, or a trailing
    ``/``: a directory or s3 prefix of class sub-folders) or ``'unknown'`` (another suffix)."""
    if source == "digits":
        return "digits"
    if source.endswith("/"):
        return "folder"
    suffix = Path(source.rsplit("/", 1)[-1]).suffix.lower()
    return SOURCE_SUFFIXES.get(suffix, "folder" if not suffix else "unknown")


class DataConfig(_Strict):
    source: str = Field(
        "digits",
        description="'digits' (scikit-learn's builtin 8x8 digits); or a local path or s3://bucket/key of: a .npz "
        "with arrays x and y; a .csv or .parquet with a label column and feature columns (or one pixel column); "
        "or a directory / s3 prefix with one sub-folder of PNG/JPEG images per class. s3:// reads its endpoint "
        "and credentials from AWS_ENDPOINT_URL (or MLFLOW_S3_ENDPOINT_URL), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY.",
    )
    num_classes: int | None = Field(None, ge=2, description="Number of classes; inferred from the labels when omitted.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(
        0.15, gt=0, lt=0.5, description="Share of source held out for test; unused when test_source is set."
    )
    seed: int = 0
    label_column: str = Field(
        "label", min_length=1, description="CSV/parquet: the column of class labels (ints or names)."
    )
    feature_columns: list[str] | None = Field(
        None, min_length=1, description="CSV/parquet: the feature columns, in order; None = every other column."
    )
    pixel_column: str | None = Field(
        None,
        min_length=1,
        description="CSV/parquet: one column holding each sample's flattened pixels (space-separated numbers in CSV, "
        "a list in parquet) instead of one column per feature; needs image_shape.",
    )
    image_shape: list[int] | None = Field(
        None,
        min_length=3,
        max_length=3,
        description="[C, H, W]: reshape each sample's flat features into an image (e.g. [1, 28, 28] for 784 pixel "
        "columns), so a table can feed a CNN.",
    )
    test_source: str | None = Field(
        None,
        min_length=1,
        description="A separate held-out test set in the same format as source (local path or s3://); when set, "
        "test comes from it and train/val are split from source.",
    )
    image_size: list[int] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="Image folders: [H, W] to resize every image to; without it, all images must have one size.",
    )
    image_mode: Literal["L", "RGB"] = Field(
        "L", description="Image folders: 'L' reads images as grayscale [1, H, W], 'RGB' as colour [3, H, W]."
    )

    @field_validator("source", "test_source")
    @classmethod
    def _local_or_s3(cls, source: str | None) -> str | None:
        if source is None or source == "digits":
            return source
        scheme = urlparse(source).scheme
        # One-letter schemes are Windows drive letters (C:\data.csv), not URLs.
        if scheme and scheme != "s3" and len(scheme) > 1:
            raise ValueError(f"{source!r}: only local paths and s3://bucket/key URIs are supported, not {scheme}://")
        if scheme == "s3" and not re.match(r"^s3://[^/]+", source):
            raise ValueError(f"{source!r}: no bucket; write s3://BUCKET/KEY")
        # Another suffix may still be a directory ("mnist.v2/"): kd_lib.data.dataset decides when it looks.
        return source

    @field_validator("image_shape", "image_size")
    @classmethod
    def _positive(cls, dims: list[int] | None) -> list[int] | None:
        if dims is not None and min(dims) < 1:
            raise ValueError(f"{dims}: every dimension must be at least 1")
        return dims

    @model_validator(mode="after")
    def _options_fit_the_source(self) -> DataConfig:
        # "unknown" (a name with another suffix) may be a directory: only clear mismatches are errors here.
        kind = source_kind(self.source).replace("unknown", "folder")
        tabular = kind in ("csv", "parquet")
        if self.pixel_column is not None and self.feature_columns is not None:
            raise ValueError("set either pixel_column (one column of flattened pixels) or feature_columns, not both")
        if self.pixel_column is not None and self.image_shape is None:
            raise ValueError(f"pixel_column {self.pixel_column!r} needs image_shape [C, H, W] to reshape its pixels")
        if self.pixel_column is not None and self.label_column == self.pixel_column:
            raise ValueError(f"label_column and pixel_column are both {self.label_column!r}")
        if self.feature_columns is not None and self.label_column in self.feature_columns:
            raise ValueError(f"label_column {self.label_column!r} is also listed in feature_columns")
        if (self.pixel_column is not None or self.feature_columns is not None) and not tabular:
            raise ValueError(f"pixel_column / feature_columns apply to .csv and .parquet sources, not {self.source!r}")
        if self.image_shape is not None and kind in ("digits", "folder"):
            raise ValueError(
                f"image_shape reshapes flat features; {self.source!r} already holds images "
                "(use image_size to resize an image folder)"
            )
        if (self.image_size is not None or self.image_mode != "L") and kind != "folder":
            raise ValueError(
                f"image_size / image_mode apply to an image folder (a directory of class sub-folders), not {self.source!r}"
            )
        if self.test_source is not None:
            if kind == "digits":
                raise ValueError("test_source needs a source file or folder; 'digits' is split into train/val/test")
            if source_kind(self.test_source).replace("unknown", "folder") != kind:
                raise ValueError(
                    f"test_source {self.test_source!r} must have the format of source {self.source!r} "
                    f"({source_kind(self.test_source)} vs {kind})"
                )
        return self

    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Training-batch augmentation.")


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
        description="mlflow: models:/<name>@<alias> or models:/<name>/<version>; checkpoint: path or s3:// URI of the weights.",
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
        "Doubles the distill step's time; the baseline is never quantized or registered.",
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


class QuantizeConfig(_Strict):
    scheme: str = Field(
        "dynamic_int8",
        description="A name in kd_lib.compress.quantization.QUANTIZERS ('none', 'dynamic_int8', 'static_int8', "
        "'weight_only_int8', 'fp16', 'bf16', 'qat_int8') or 'auto' (the first of auto_order within "
        "gate.max_quantization_drop on the validation split).",
    )
    backend: str | None = Field(
        None,
        description="A backend of the scheme (kd_lib.compress.quantization.backends); None = the measured default.",
    )
    calibration_batches: int = Field(8, ge=1, description="static_int8: training batches run to calibrate scales.")
    calibration_batch_size: int = Field(64, ge=1, description="static_int8: samples per calibration batch.")
    qat_epochs: int = Field(2, ge=1, description="qat_int8: epochs of fake-quantized fine-tuning with the KD loss.")
    qat_lr: float = Field(
        1e-4, gt=0, description="qat_int8: learning rate of that fine-tuning (distill.train otherwise)."
    )
    allow_fp32_layers: bool = Field(
        True,
        description="Layers a scheme cannot quantize (Conv2d under dynamic_int8) stay fp32 and are recorded; "
        "false makes that an error.",
    )
    auto_order: list[str] = Field(
        default_factory=lambda: ["static_int8", "qat_int8", "dynamic_int8", "weight_only_int8", "bf16", "fp16"],
        min_length=1,
        description="scheme 'auto': schemes to try, in this order (smallest/fastest expected first).",
    )
    export_onnx: bool = Field(
        False, description="Also export the fp32 and quantized student to ONNX and check them with onnxruntime."
    )


class EvaluateConfig(_Strict):
    latency_warmup: int = Field(5, ge=0)
    latency_iters: int = Field(30, ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    threads: int = Field(1, ge=1, description="torch CPU threads while timing latency.")


class GateConfig(_Strict):
    min_accuracy: float = Field(0.80, ge=0, le=1, description="Quantized student test accuracy, fraction.")
    max_accuracy_drop: float = Field(5.0, ge=0, description="Teacher minus quantized student accuracy, points.")
    max_quantization_drop: float = Field(
        1.0, ge=0, description="fp32 student minus quantized student accuracy, points."
    )
    max_size_mb: float = Field(1.0, gt=0, description="Quantized student artifact size, MB (10^6 bytes).")
    min_compression_ratio: float = Field(
        4.0, gt=0, description="Teacher artifact bytes / quantized student artifact bytes."
    )
    champion_policy: Literal["ignore", "must_not_regress"] = Field(
        "ignore",
        description="must_not_regress: the candidate's test accuracy may be at most champion_tolerance points below "
        "the current @champion's (both measured on this run's test split), and it may not be larger unless it is "
        "more accurate.",
    )
    champion_tolerance: float = Field(0.0, ge=0, description="Allowed accuracy drop against the champion, points.")


class RegistryConfig(_Strict):
    model_name: str = Field("kdflow-student", min_length=1)
    alias: str = Field("champion", min_length=1)
    challenger_alias: str = Field("challenger", min_length=1)
    keep_rejected: bool = Field(
        False,
        description="Register a candidate that passed every threshold but lost to the champion, tagged "
        "validation_status=rejected and aliased challenger_alias (never champion).",
    )
    ranking: Literal["accuracy", "newest"] = Field(
        "accuracy",
        description="Which passed version is champion: accuracy (highest test accuracy, then smallest, then newest) "
        "or newest (highest version number).",
    )


class RetryConfig(_Strict):
    """Bounded exponential backoff for every MLflow (and S3) call: transient failures only."""

    max_attempts: int = Field(6, ge=1, description="Tries per call, the first included.")
    backoff_s: int = Field(
        1,
        ge=0,
        description="Base wait, whole seconds (MLflow reads an int): the k-th retry waits about backoff_s * 2^k s.",
    )
    timeout_s: float = Field(30.0, gt=0, description="Per-request timeout, seconds.")


class TrackingConfig(_Strict):
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; else $MLFLOW_TRACKING_URI; else sqlite:///mlflow.db."
    )
    experiment: str = Field("kdflow", min_length=1)
    retry: RetryConfig = Field(default_factory=RetryConfig)

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials_in_uri(cls, uri: str | None) -> str | None:
        # The config becomes MLflow params and a KFP parameter: a password here would leak.
        if uri and urlparse(uri).password:
            raise ValueError(
                "contains a password; remove it from the URI and set MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD in the environment (a Kubernetes Secret on the cluster)"
            )
        return uri


# ---------------------------------------------------------------------------------------------
# Where the pipeline runs on a Kubernetes cluster (Kubeflow Pipelines). None of this changes
# the model: it is read at compile time and becomes per-task container/pod settings.
# ---------------------------------------------------------------------------------------------

# The tasks of the DAG, by the name of the kd_lib step each runs.
StepName = Literal[
    "prepare_data", "train_teacher", "import_teacher", "distill", "quantize", "evaluate", "gate", "register", "finalize"
]
STEP_NAMES: tuple[str, ...] = get_args(StepName)

# Kubernetes quantities in the forms KFP's compiler accepts (it rejects e.g. "1.5Gi").
_CPU_PATTERN = r"^([0-9]*\.)?[0-9]+m?$"
_MEMORY_PATTERN = r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$"
_MEMORY_UNITS = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
# A Kubernetes object name (DNS-1123 subdomain) and a POSIX-ish environment variable name.
_K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
_ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


def cpu_cores(quantity: str) -> float:
    """``"500m"`` -> 0.5, ``"2"`` -> 2.0."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def memory_bytes(quantity: str) -> int:
    """``"512Mi"`` -> 536870912, ``"1G"`` -> 10**9."""
    digits = re.match(r"^[0-9]+", quantity)
    if digits is None or quantity[digits.end() :] not in _MEMORY_UNITS:
        raise ValueError(f"not a memory quantity: {quantity!r} (e.g. '512Mi', '4Gi')")
    return int(digits.group()) * _MEMORY_UNITS[quantity[digits.end() :]]


class ResourcesConfig(_Strict):
    """CPU and memory requests and limits of a step's container (Kubernetes quantities)."""

    cpu_request: str = Field("500m", pattern=_CPU_PATTERN, description="e.g. '500m' or '1'.")
    cpu_limit: str = Field("2", pattern=_CPU_PATTERN)
    memory_request: str = Field("1Gi", pattern=_MEMORY_PATTERN, description="e.g. '1Gi' or '512Mi'.")
    memory_limit: str = Field("4Gi", pattern=_MEMORY_PATTERN)


class StepResourcesConfig(_Strict):
    """One step's override of ``cluster.resources``; unset fields keep the default."""

    cpu_request: str | None = Field(None, pattern=_CPU_PATTERN)
    cpu_limit: str | None = Field(None, pattern=_CPU_PATTERN)
    memory_request: str | None = Field(None, pattern=_MEMORY_PATTERN)
    memory_limit: str | None = Field(None, pattern=_MEMORY_PATTERN)


class TolerationConfig(_Strict):
    """A Kubernetes toleration, e.g. for the taint GPU node pools carry."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class GpuConfig(_Strict):
    """An accelerator for the steps that train; the others stay on CPU nodes."""

    accelerator: str = Field(
        "nvidia.com/gpu",
        min_length=1,
        description="The accelerator resource/type KFP requests, e.g. 'nvidia.com/gpu' or 'NVIDIA_TESLA_T4'.",
    )
    limit: int = Field(1, ge=1, description="Accelerators per task.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the task must run on, e.g. {'nvidia.com/gpu.present': 'true'}."
    )
    tolerations: list[TolerationConfig] = Field(
        default_factory=lambda: [TolerationConfig(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        description="Taints of the GPU nodes to tolerate.",
    )
    steps: list[StepName] = Field(
        default_factory=lambda: ["train_teacher", "distill"], min_length=1, description="Steps that get the GPU."
    )


class PyTorchJobConfig(_Strict):
    """Run training steps as Kubeflow Training Operator PyTorchJobs: one Master and ``workers``
    Worker pods, each running torchrun with ``<step>.train.distributed.nproc_per_node`` ranks.

    The pipeline's own task for the step then only launches the job and waits for it. Inputs
    and outputs pass through a volume both sides mount (KFP artifacts live in the pipeline's
    object store, which the training pods cannot reach).
    """

    steps: list[Literal["train_teacher", "distill"]] = Field(
        default_factory=lambda: ["train_teacher", "distill"],
        min_length=1,
        description="Steps that become a PyTorchJob.",
    )
    workers: int = Field(
        1, ge=0, description="Worker pods besides the Master; world size = (1 + workers) * nproc_per_node."
    )
    volume_claim: str = Field(
        "kdflow-training-staging",
        pattern=_K8S_NAME_PATTERN,
        description="A ReadWriteMany PersistentVolumeClaim in the pipeline namespace (k8s/training/staging-pvc.yaml): "
        "the launcher stages the inputs there, rank 0 writes the model and checkpoints there.",
    )
    mount_path: str = Field("/mnt/kdflow", pattern=r"^/[^\s]*$", description="Where every pod mounts the volume.")
    namespace: str | None = Field(
        None, pattern=_K8S_NAME_PATTERN, description="Namespace of the job; None = the launcher pod's own."
    )
    master_port: int = Field(23456, ge=1024, le=65535, description="Rendezvous port on the Master pod.")
    timeout_s: float = Field(
        86400.0,
        gt=0,
        description="Longest the launcher waits for the job to finish; then it deletes the job and fails.",
    )
    poll_s: float = Field(10.0, gt=0, description="Seconds between two status reads of the job.")
    backoff_limit: int = Field(
        0,
        ge=0,
        description="Restarts of a failed job by the operator (it resumes from rank 0's last epoch checkpoint).",
    )
    ttl_seconds_after_finished: int = Field(
        86400, ge=0, description="The operator deletes a finished job (and its pods' logs) after this long."
    )


class SecretEnvConfig(_Strict):
    """A Kubernetes Secret whose keys become environment variables of every step."""

    name: str = Field(..., pattern=_K8S_NAME_PATTERN, description="Secret name, in the namespace runs execute in.")
    env: dict[str, str] = Field(..., min_length=1, description="Secret key -> environment variable name.")
    optional: bool = Field(False, description="Start the step even when the Secret or a key is missing.")

    @model_validator(mode="after")
    def _env_names(self) -> SecretEnvConfig:
        bad = [v for v in self.env.values() if not re.match(_ENV_NAME_PATTERN, v)]
        if bad:
            raise ValueError(f"not valid environment variable names: {bad}")
        return self


def _default_secrets() -> list[SecretEnvConfig]:
    # The Secret templates in k8s/secrets/ create these names and keys.
    return [
        SecretEnvConfig(name="kdflow-mlflow", env={"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}),
        SecretEnvConfig(
            name="kdflow-mlflow-auth",
            env={
                "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
            },
            optional=True,
        ),
    ]


class ClusterConfig(_Strict):
    """How each task runs on Kubernetes: resources, GPU, Secrets as environment, identity.

    Credentials never appear here, in the pipeline parameters or in MLflow params: only the
    *names* of the Secrets that hold them.
    """

    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="Requests and limits of every step."
    )
    step_resources: dict[StepName, StepResourcesConfig] = Field(
        default_factory=dict, description="Per-step overrides of `resources`, field by field."
    )
    gpu: GpuConfig | None = Field(None, description="An accelerator for the training steps; none when omitted.")
    secrets: list[SecretEnvConfig] = Field(default_factory=_default_secrets)
    service_account: str | None = Field(
        "kdflow-pipeline-runner",
        pattern=_K8S_NAME_PATTERN,
        description="Kubernetes ServiceAccount of the run (k8s/ creates it); null for the KFP default.",
    )
    pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/part-of": "kdflow", "kdflow.io/mlflow-client": "true"},
        description="Labels of every step's pod; the NetworkPolicy in k8s/ admits pods with kdflow.io/mlflow-client=true to MLflow.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets to pull the image from a private registry."
    )
    pytorchjob: PyTorchJobConfig | None = Field(
        None,
        description="Run the training steps as Training Operator PyTorchJobs (multi-pod data parallel); none when omitted: "
        "a step with nproc_per_node > 1 then runs torchrun inside its own pod.",
    )

    def resources_for(self, step: str) -> ResourcesConfig:
        """The step's resources: its override where set, else the default."""
        override = self.step_resources.get(step)  # type: ignore[call-overload]
        merged = self.resources.model_dump()
        if override is not None:
            merged |= override.model_dump(exclude_none=True)
        return ResourcesConfig(**merged)

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ClusterConfig:
        for step in STEP_NAMES:
            r = self.resources_for(step)
            where = f"step_resources.{step}" if step in self.step_resources else "resources"
            if cpu_cores(r.cpu_request) > cpu_cores(r.cpu_limit):
                raise ValueError(f"{where}: cpu_request {r.cpu_request} is above cpu_limit {r.cpu_limit} for {step}")
            if memory_bytes(r.memory_request) > memory_bytes(r.memory_limit):
                raise ValueError(
                    f"{where}: memory_request {r.memory_request} is above memory_limit {r.memory_limit} for {step}"
                )
        return self


# ---------------------------------------------------------------------------------------------
# A sweep: several candidate students/schemes fanned out by KFP (dsl.ParallelFor), one chosen.
# ---------------------------------------------------------------------------------------------

# The loss terms whose softmax temperature sweep.temperatures sets.
TEMPERATURE_LOSSES = ("kd", "dkd")
# A candidate's name goes into MLflow run names and tags; keep it to characters safe everywhere.
_CANDIDATE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


def _duplicates(items: list[Any]) -> list[Any]:
    seen: list[Any] = []
    dups: list[Any] = []
    for item in items:
        if item in seen and item not in dups:
            dups.append(item)
        seen.append(item)
    return dups


class SweepConfig(_Strict):
    """Candidates to distill, quantize, evaluate and gate side by side; one is registered.

    The candidates are the product students x schemes (x temperatures). Each is the base
    config with ``student.model``, ``quantize.scheme`` (and the ``temperature`` of every
    kd/dkd term of ``distill.losses``) replaced; the teacher is trained (or imported) once.
    The chosen one is the smallest candidate that passes every gate, ties by batch-1 latency.
    """

    students: list[ModelConfig] = Field(
        ...,
        min_length=1,
        description="Candidate student architectures, e.g. [{arch: mlp, params: {width: 16, depth: 1}}].",
    )
    schemes: list[str] = Field(
        ...,
        min_length=1,
        description="Candidate quantization schemes (names of quantize.scheme), e.g. [dynamic_int8, static_int8].",
    )
    temperatures: list[float] | None = Field(
        None,
        min_length=1,
        description="Candidate softmax temperatures of the kd/dkd terms of distill.losses; omit to keep the base ones.",
    )
    parallelism: int = Field(
        2, ge=1, description="Candidates running at once (dsl.ParallelFor parallelism); kfp.local caps it at 2."
    )
    max_candidates: int = Field(
        16, ge=1, description="Guard against a product that is larger than intended: more candidates is an error."
    )

    @field_validator("schemes")
    @classmethod
    def _known_schemes(cls, schemes: list[str]) -> list[str]:
        # Imported here: the registry lives with the (torch) quantizers, and only sweeps need it.
        from kd_lib.compress.quantization import QUANTIZERS

        known = [*QUANTIZERS.names(), "auto"]
        unknown = [s for s in schemes if s not in known]
        if unknown:
            raise ValueError(f"unknown scheme(s) {unknown}; use names of quantize.scheme: {', '.join(known)}")
        if dups := _duplicates(schemes):
            raise ValueError(f"scheme(s) {dups} listed more than once; list each once")
        return schemes

    @field_validator("students")
    @classmethod
    def _distinct_students(cls, students: list[ModelConfig]) -> list[ModelConfig]:
        from kd_lib.models.builders import MODELS

        for i, student in enumerate(students):
            if ":" not in student.arch and student.arch not in MODELS:
                raise ValueError(
                    f"students.{i}.arch {student.arch!r} is not a model; use one of {', '.join(MODELS.names())} "
                    "or 'pkg.module:fn'"
                )
        dumps = [s.model_dump() for s in students]
        if dups := _duplicates(dumps):
            raise ValueError(f"student(s) {dups} listed more than once; list each once")
        return students

    @field_validator("temperatures")
    @classmethod
    def _positive_distinct_temperatures(cls, temperatures: list[float] | None) -> list[float] | None:
        if temperatures is None:
            return None
        if bad := [t for t in temperatures if t <= 0]:
            raise ValueError(f"temperature(s) {bad} are not > 0; a softmax temperature must be positive")
        if dups := _duplicates(temperatures):
            raise ValueError(f"temperature(s) {dups} listed more than once; list each once")
        return temperatures

    @property
    def size(self) -> int:
        """Number of candidates: the product of the lists' lengths."""
        return len(self.students) * len(self.schemes) * len(self.temperatures or [None])

    @model_validator(mode="after")
    def _within_max_candidates(self) -> SweepConfig:
        if self.size > self.max_candidates:
            lengths = f"{len(self.students)} students x {len(self.schemes)} schemes"
            lengths += f" x {len(self.temperatures)} temperatures" if self.temperatures else ""
            raise ValueError(
                f"{lengths} = {self.size} candidates, above max_candidates={self.max_candidates}; "
                "shorten a list or raise sweep.max_candidates"
            )
        return self


class PipelineConfig(_Strict):
    name: str = Field("kdflow-distillation", min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    image: str = Field(
        f"kdflow:{__version__}",
        pattern=r"^[^\s]+$",
        description="Container image every step runs in on a cluster, e.g. registry.example.com/kdflow:0.1.0.",
    )
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    sweep: SweepConfig | None = Field(
        None, description="Candidate students and schemes run side by side, the best registered; none when omitted."
    )
    candidate: str | None = Field(
        None,
        pattern=_CANDIDATE_PATTERN,
        description="Set by the sweep on each candidate's own config (its name, e.g. c2-mlp-d1w32-static_int8-T4): "
        "names and tags that candidate's MLflow runs. Not part of config_hash; leave it unset.",
    )

    @model_validator(mode="after")
    def _sweep_fits_the_config(self) -> PipelineConfig:
        if self.sweep is None:
            return self
        if self.candidate is not None:
            raise ValueError("candidate is set by the sweep on each candidate's config; remove candidate or sweep")
        if self.sweep.temperatures and not any(t.name in TEMPERATURE_LOSSES for t in self.distill.losses):
            raise ValueError(
                f"sweep.temperatures sets the temperature of {'/'.join(TEMPERATURE_LOSSES)} terms, and distill.losses "
                "has none; add a kd term to distill.losses or remove sweep.temperatures"
            )
        return self

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> PipelineConfig:
        if self.data.val_fraction + self.data.test_fraction >= 0.8:
            raise ValueError("data.val_fraction + data.test_fraction must stay below 0.8 to leave training data")
        return self

    @model_validator(mode="after")
    def _gpu_steps_use_the_gpu(self) -> PipelineConfig:
        gpu = self.cluster.gpu
        if gpu is None:
            return self
        devices = {
            "train_teacher": ("teacher.train.device", self.teacher.train.device),
            "distill": ("distill.train.device", self.distill.train.device),
        }
        for step in gpu.steps:
            field, device = devices.get(step, ("", ""))
            if device == "cpu":
                raise ValueError(f"cluster.gpu gives {step} a GPU but {field} is 'cpu': set it to 'cuda' or 'auto'")
        return self

    @model_validator(mode="after")
    def _pytorchjob_gpu_is_a_resource(self) -> PipelineConfig:
        pj, gpu = self.cluster.pytorchjob, self.cluster.gpu
        if pj is not None and gpu is not None and set(pj.steps) & set(gpu.steps) and "/" not in gpu.accelerator:
            raise ValueError(
                f"cluster.gpu.accelerator {gpu.accelerator!r} is a KFP accelerator type, but the pods of cluster.pytorchjob "
                "request a Kubernetes resource: use its name, e.g. nvidia.com/gpu"
            )
        return self

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): what crosses the KFP boundary and what is hashed."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        """sha256 of the recipe (canonical JSON minus ``tracking``, ``image`` and ``cluster``,
        which say where results go and where steps run, not how the model was made); a
        lineage tag on every registered version, equal for a local and a cluster run."""
        # A candidate's name is a label, not part of its recipe; an absent sweep leaves the
        # hash of a config as it was before sweeps existed.
        exclude: dict[str, Any] = {name: True for name in ("tracking", "image", "cluster", "candidate")}
        recipe = self.model_dump(mode="json", exclude=exclude | self._unset_extensions())
        return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def augment_of(self, step: Literal["teacher", "distill"]) -> tuple[AugmentConfig, str]:
        """The augmentation a training step uses and the field it comes from (for messages):
        ``<step>.train.augment`` when set, else ``data.augment``."""
        own = (self.teacher if step == "teacher" else self.distill).train.augment
        return (own, f"{step}.train.augment") if own is not None else (self.data.augment, "data.augment")

    def flat(self) -> dict[str, Any]:
        """Dotted key -> leaf value, for MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def _unset_extensions(self) -> dict[str, Any]:
        """The fields added after hashes were in use, where left at their default (``sweep``,
        ``candidate``, a step's ``train.augment`` and ``train.keep``), as a ``model_dump`` exclude:
        kept out of the hash, so a config without them hashes as it did before they existed."""
        unset: dict[str, Any] = {name: True for name in ("sweep", "candidate") if getattr(self, name) is None}
        for step in ("teacher", "distill"):
            train = getattr(self, step).train
            defaults = {
                name: True for name, default in (("augment", None), ("keep", "best")) if getattr(train, name) == default
            }
            if defaults:
                unset[step] = {"train": defaults}
        return unset


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into ``{"a.b.c": leaf}``; lists, and dicts with dotted keys, stay leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        # A mapping whose keys contain dots (Kubernetes labels) stays one JSON leaf, so the
        # dotted params can be turned back into the same tree.
        if isinstance(value, dict) and value and not any("." in str(k) for k in value):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"{origin}: {err.error_count()} invalid field(s):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `kdflow validate` prints every valid field)"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.path=value`` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected dotted.path=value, e.g. distill.train.epochs=30")
    path, raw = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {assignment!r}: empty field path")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node: Any = tree
    # A list item is addressed by its index: distill.losses.0.params.temperature=2.
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                where = ".".join(keys[:depth])
                raise ConfigError(
                    f"override {assignment!r}: {where} has {len(node)} item(s); use an index 0..{len(node) - 1}"
                )
            if last:
                node[int(key)] = value
            else:
                node = node[int(key)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {keys[depth - 1]} is a value, not a section")
        if last:
            node[key] = value
        else:
            node = node.setdefault(key, {})


def parse_config(tree: dict[str, Any], overrides: list[str] | None = None, origin: str = "config") -> PipelineConfig:
    """Validate a raw dict (plus dotted overrides) into a PipelineConfig or raise ConfigError."""
    for assignment in overrides or []:
        apply_override(tree, assignment)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config file, apply ``--set`` overrides, validate.

    Raises:
        ConfigError: the file is missing or not YAML, or fields are invalid (each named by
            its dotted path).
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise ConfigError(f"{p}: cannot read the config file ({err.strerror}); pass an existing YAML file") from None
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (data:, teacher:, ...)")
    return parse_config(tree, overrides, origin=str(p))


def config_from_json(text: str) -> PipelineConfig:
    """Inverse of PipelineConfig.to_json, used inside components."""
    return parse_config(json.loads(text), origin="config_json")
