"""The ``import_teacher`` step: bring an already trained teacher into the run instead of training one."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from kd_lib.adapters import storage
from kd_lib.adapters.model_registry import ModelRegistry, RegistryError, registry_errors
from kd_lib.adapters.tracking import StepRun, step_run
from kd_lib.artifacts import write_history
from kd_lib.artifacts.dataset_dir import DatasetMeta, load_splits
from kd_lib.compress import quantization
from kd_lib.config import ConfigError, PipelineConfig
from kd_lib.models.builders import build_model, for_data
from kd_lib.steps.common import StepError, model_spec
from kd_lib.steps.inputs import accuracy, tensors


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name@alias`` -> (name, alias, None); ``models:/name/3`` -> (name, None, "3").

    Raises:
        ConfigError: anything else.
    """
    rest = uri[len("models:/") :]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ConfigError(f"teacher.uri {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")


def import_teacher(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    teacher_dir: str | Path,
    history_path: str | Path | None = None,
) -> dict[str, Any]:
    """Bring an already trained teacher into the run instead of training one.

    ``teacher.source: mlflow`` downloads the kdflow model a registry URI points at (its own
    spec, normalization included: later steps feed it inputs renormalized to what it was
    trained on). ``teacher.source: checkpoint`` reads a ``state_dict`` file (local or
    ``s3://``) with ``weights_only=True`` into the architecture ``teacher.model``; it must
    expect inputs normalized like this run's (train-split mean/std). Either way the teacher
    is checked against the data (input shape, classes) and its validation accuracy logged.

    Returns:
        ``best_val_accuracy``, the step's ``run_id`` and ``imported_from`` (the teacher's source).

    Raises:
        ConfigError: a malformed URI.
        StepError: the model is missing from the registry, does not fit the data, or the
            checkpoint does not fit ``teacher.model``.
    """
    with step_run(cfg, pipeline_run_id, "import_teacher") as run:
        splits = load_splits(dataset_dir)
        meta = splits.meta
        uri = cfg.teacher.uri or ""
        run.log_params({"source": cfg.teacher.source, "uri": uri})

        with tempfile.TemporaryDirectory() as tmp:
            if cfg.teacher.source == "mlflow":
                model, spec = _from_registry(run, uri, tmp)
            else:
                model = _from_checkpoint(cfg, meta, uri, tmp)
                spec = model_spec(cfg.teacher.model, meta, "teacher", run.run_id) | {"imported_from": uri}
            run.set_tags({"kdflow.teacher_source": spec["imported_from"]}, on_parent=True)
        if list(spec["input_shape"]) != list(meta.input_shape) or int(spec["num_classes"]) != meta.num_classes:
            raise StepError(
                f"teacher {uri} takes input {spec['input_shape']} with {spec['num_classes']} classes, but the data has "
                f"{meta.input_shape} with {meta.num_classes}: use a teacher trained for this data"
            )
        quantization.save_model(model, spec, teacher_dir)

        x_val, y_val = tensors(splits, "val")
        val_acc = accuracy(for_data(model, spec.get("normalization"), meta.normalization), x_val, y_val)
        run.log_metrics({"best_val_accuracy": val_acc})
        if history_path is not None:
            write_history(history_path, [])  # no training curve to show
        return {"best_val_accuracy": val_acc, "run_id": run.run_id, "imported_from": spec["imported_from"]}


def _from_registry(run: StepRun, uri: str, tmp: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The registered kdflow model ``uri`` names, with its own spec (renamed to this run's teacher)."""
    name, alias, version = parse_models_uri(uri)
    with registry_errors(run.client.tracking_uri, name, action="read", permission="READ"):
        try:
            version, model_dir = ModelRegistry(run.client, name).download_ref(tmp, alias, version)
        except RegistryError as err:
            raise StepError(f"teacher.uri: {err}") from None
    model, spec = quantization.load_model(model_dir)
    return model, dict(spec, role="teacher", mlflow_run_id=run.run_id, imported_from=f"models:/{name}/{version}")


def _from_checkpoint(cfg: PipelineConfig, meta: DatasetMeta, uri: str, tmp: str) -> torch.nn.Module:
    """``teacher.model`` with the ``state_dict`` file at ``uri`` (local or ``s3://``) loaded into it."""
    local = storage.fetch(uri, tmp, cfg.tracking.retry)
    torch.manual_seed(0)
    model = build_model(cfg.teacher.model.arch, cfg.teacher.model.params, tuple(meta.input_shape), meta.num_classes)
    try:
        state = torch.load(local, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except Exception as err:  # noqa: BLE001 (torch raises many types for a bad file)
        raise StepError(
            f"teacher.uri {uri}: not a state_dict of teacher.model {cfg.teacher.model.arch} "
            f"{cfg.teacher.model.params} ({type(err).__name__}: {str(err)[:300]}); fix teacher.model or the file"
        ) from None
    return model
