"""The one configuration tree of a kdflow pipeline run.

Every default lives here. Every model is ``extra="forbid"`` so a misspelt key is an error
that names its dotted path instead of being silently ignored. Units are stated per field:
accuracies are fractions in [0, 1]; *drops* are percentage points (teacher 0.97 and student
0.95 is a drop of 2.0 points).

One module per section of the YAML file; import from ``kd_lib.config`` itself, which
re-exports every public name:

- ``base``: ``ConfigError``, the strict pydantic base, ``flatten``
- ``data``: ``data:`` (``DataConfig``, ``AugmentConfig``, ``source_kind``)
- ``train``: ``teacher:``, ``student:``, ``distill:`` (``TrainConfig``, ``LossTermConfig``, ...)
- ``compress``: ``quantize:``
- ``evaluate``: ``evaluate:`` and ``gate:``
- ``tracking``: ``tracking:`` and ``registry:`` (MLflow)
- ``cluster``: ``cluster:`` (Kubernetes resources, GPU, PyTorchJob, Secrets)
- ``sweep``: ``sweep:``
- ``pipeline``: ``PipelineConfig``, the root, with ``to_json`` and ``config_hash``
- ``load``: ``load_config`` (YAML + ``--set`` overrides), ``parse_config``, ``config_from_json``

Importing it is cheap (pydantic and yaml only, no torch or mlflow): names that live with the
torch modules (models, quantizers) are found through ``kd_lib.plugins`` when a check needs them.
"""

from __future__ import annotations

from kd_lib.config.base import ConfigError, flatten
from kd_lib.config.cluster import (
    STEP_NAMES,
    ClusterConfig,
    GpuConfig,
    PyTorchJobConfig,
    ResourcesConfig,
    SecretEnvConfig,
    StepName,
    StepResourcesConfig,
    TolerationConfig,
    cpu_cores,
    memory_bytes,
)
from kd_lib.config.compress import DEFAULT_CANDIDATES, ONNX_SCHEMES, TORCH_SCHEMES, QuantizeConfig
from kd_lib.config.data import (
    SOURCE_SUFFIXES,
    TABULAR_SUFFIXES,
    TEXT_SAMPLES,
    AugmentConfig,
    DataConfig,
    source_kind,
)
from kd_lib.config.evaluate import PREDICT_BATCH_SIZE, EvaluateConfig, GateConfig
from kd_lib.config.load import apply_override, config_from_json, load_config, parse_config
from kd_lib.config.pipeline import PipelineConfig
from kd_lib.config.sweep import CANDIDATE_PATTERN, TEMPERATURE_LOSSES, SweepConfig
from kd_lib.config.tracking import RegistryConfig, RetryConfig, TrackingConfig
from kd_lib.config.train import (
    DistillConfig,
    DistributedConfig,
    LossTermConfig,
    ModelConfig,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
)

__all__ = [
    "PREDICT_BATCH_SIZE",
    "CANDIDATE_PATTERN",
    "DEFAULT_CANDIDATES",
    "ONNX_SCHEMES",
    "TORCH_SCHEMES",
    "SOURCE_SUFFIXES",
    "STEP_NAMES",
    "TABULAR_SUFFIXES",
    "TEXT_SAMPLES",
    "TEMPERATURE_LOSSES",
    "AugmentConfig",
    "ClusterConfig",
    "ConfigError",
    "DataConfig",
    "DistillConfig",
    "DistributedConfig",
    "EvaluateConfig",
    "GateConfig",
    "GpuConfig",
    "LossTermConfig",
    "ModelConfig",
    "PipelineConfig",
    "PyTorchJobConfig",
    "QuantizeConfig",
    "RegistryConfig",
    "ResourcesConfig",
    "RetryConfig",
    "SecretEnvConfig",
    "StepName",
    "StepResourcesConfig",
    "StudentConfig",
    "SweepConfig",
    "TeacherConfig",
    "TolerationConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_override",
    "config_from_json",
    "cpu_cores",
    "flatten",
    "load_config",
    "memory_bytes",
    "parse_config",
    "source_kind",
]
