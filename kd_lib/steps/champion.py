"""The current champion measured on this run's test split, for the gate's champion comparison.

Its own module because it loads torch: ``kd_lib.steps.gate`` imports it only when
``gate.champion_policy`` asks for the comparison, so a gate without one starts without torch.
"""

from __future__ import annotations

import tempfile
from typing import Any

from kd_lib.adapters.model_registry import ModelRegistry
from kd_lib.adapters.tracking import StepRun
from kd_lib.artifacts.dataset_dir import Splits
from kd_lib.compress import quantization
from kd_lib.config import PipelineConfig
from kd_lib.evaluate import metrics as evaluation
from kd_lib.models.builders import for_data
from kd_lib.steps.common import StepError
from kd_lib.steps.inputs import accuracy, tensors


def champion_metrics(cfg: PipelineConfig, splits: Splits, run: StepRun) -> dict[str, Any] | None:
    """The current champion measured on THIS run's test split (same data, same yardstick).

    Returns:
        ``version``, ``accuracy`` and ``size_bytes`` of the model under ``registry.alias``, or
        None when no version holds the alias.

    Raises:
        StepError: the champion takes other inputs or classes than this data.
    """
    registry = ModelRegistry(run.client, cfg.registry.model_name)
    version = registry.alias_version(cfg.registry.alias)
    if version is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = registry.download_version(version, tmp)
        model, spec = quantization.load_model(model_dir)
        size = evaluation.artifact_size_bytes(model_dir)
    meta = splits.meta
    if list(spec["input_shape"]) != list(meta.input_shape) or spec["num_classes"] != meta.num_classes:
        raise StepError(
            f"champion {cfg.registry.model_name} v{version} takes input {spec['input_shape']} with "
            f"{spec['num_classes']} classes, this data {meta.input_shape} with {meta.num_classes}: they cannot be "
            "compared; register under a new registry.model_name or set gate.champion_policy=ignore"
        )
    model = for_data(model, spec.get("normalization"), meta.normalization)  # the champion's own statistics
    x_test, y_test = tensors(splits, "test")
    return {"version": version, "accuracy": accuracy(model, x_test, y_test), "size_bytes": size}
