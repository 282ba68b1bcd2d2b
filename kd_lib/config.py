"""The one configuration tree of a kdflow pipeline run.

Every default lives here. Every model is ``extra="forbid"`` so a misspelt key is an error
that names its dotted path instead of being silently ignored. Units are stated per field:
accuracies are fractions in [0, 1]; *drops* are percentage points (teacher 0.97 and student
0.95 is a drop of 2.0 points).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A pipeline config is unreadable or invalid; the message lists every bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    source: str = Field(
        "digits",
        description="'digits' (scikit-learn's builtin 8x8 digits) or a path to a .npz file with arrays x and y.",
    )
    num_classes: int | None = Field(None, ge=2, description="Number of classes; inferred from the labels when omitted.")
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 0


class ModelConfig(_Strict):
    arch: str = Field("mlp", description="A name in kd_lib.models.MODELS ('mlp', 'cnn') or 'pkg.module:fn'.")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the builder.")


class TrainConfig(_Strict):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    patience: int = Field(5, ge=1, description="Early stopping: epochs without a better validation accuracy.")
    seed: int = 0
    device: str = Field("cpu", description="'cpu', 'cuda' or 'auto' (cuda when available).")


class TeacherConfig(_Strict):
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(arch="mlp", params={"width": 256, "depth": 2})
    )
    train: TrainConfig = Field(default_factory=TrainConfig)


class StudentConfig(_Strict):
    model: ModelConfig = Field(
        default_factory=lambda: ModelConfig(arch="mlp", params={"width": 32, "depth": 1})
    )


class DistillConfig(_Strict):
    temperature: float = Field(4.0, gt=0, description="Softmax temperature T of Hinton KD.")
    alpha: float = Field(0.9, ge=0, le=1, description="Weight of the KD term; 0 trains the student without KD.")
    train: TrainConfig = Field(default_factory=TrainConfig)


class QuantizeConfig(_Strict):
    scheme: str = Field(
        "dynamic_int8",
        description="A name in kd_lib.quantization.QUANTIZERS ('none', 'dynamic_int8', 'static_int8', "
        "'weight_only_int8', 'fp16', 'bf16', 'qat_int8') or 'auto' (the first of auto_order within "
        "gate.max_quantization_drop on the validation split).",
    )
    backend: str | None = Field(
        None, description="A backend of the scheme (kd_lib.quantization.backends); None = the measured default."
    )
    calibration_batches: int = Field(8, ge=1, description="static_int8: training batches run to calibrate scales.")
    calibration_batch_size: int = Field(64, ge=1, description="static_int8: samples per calibration batch.")
    qat_epochs: int = Field(2, ge=1, description="qat_int8: epochs of fake-quantized fine-tuning with the KD loss.")
    qat_lr: float = Field(1e-4, gt=0, description="qat_int8: learning rate of that fine-tuning (distill.train otherwise).")
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
    max_quantization_drop: float = Field(1.0, ge=0, description="fp32 student minus quantized student accuracy, points.")
    max_size_mb: float = Field(1.0, gt=0, description="Quantized student artifact size, MB (10^6 bytes).")
    min_compression_ratio: float = Field(4.0, gt=0, description="Teacher artifact bytes / quantized student artifact bytes.")
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
    backoff_s: int = Field(1, ge=0, description="Base wait, whole seconds (MLflow reads an int): the k-th retry waits about backoff_s * 2^k s.")
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

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> "PipelineConfig":
        if self.data.val_fraction + self.data.test_fraction >= 0.8:
            raise ValueError("data.val_fraction + data.test_fraction must stay below 0.8 to leave training data")
        return self

    def to_json(self) -> str:
        """Canonical JSON (sorted keys): what crosses the KFP boundary and what is hashed."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def config_hash(self) -> str:
        """sha256 of the recipe (canonical JSON minus ``tracking``, which says where results
        go, not how the model was made); a lineage tag on every registered version."""
        recipe = self.model_dump(mode="json", exclude={"tracking"})
        return hashlib.sha256(json.dumps(recipe, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def flat(self) -> dict[str, Any]:
        """Dotted key -> leaf value, for MLflow params."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into ``{"a.b.c": leaf}``; lists stay leaves."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
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
        raise ConfigError(f"override {assignment!r}: expected dotted.path=value, e.g. distill.temperature=4")
    path, raw = assignment.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"override {assignment!r}: empty field path")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {key} is a value, not a section")
        node = child
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


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
