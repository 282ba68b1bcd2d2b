"""The ``import_teacher`` step: bring an already trained teacher into the run instead of training one."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kd_lib.adapters import storage
from kd_lib.adapters.model_registry import ModelRegistry, RegistryError, registry_errors, transformers_flavor
from kd_lib.adapters.tracking import StepRun, step_run
from kd_lib.artifacts import write_history
from kd_lib.artifacts.dataset_dir import DatasetMeta, TextMeta, tokenizer_path
from kd_lib.artifacts.errors import ArtifactError
from kd_lib.artifacts.model_dir import SPEC_FILE, TOKENIZER_FILE
from kd_lib.compress import quantization
from kd_lib.compress.onnx_runtime import (
    IDENTITY_NORMALIZATION,
    OrtModule,
    load_onnx_model,
    save_onnx_model,
    taking_raw_inputs,
)
from kd_lib.config import ConfigError, PipelineConfig
from kd_lib.config.train import ModelConfig
from kd_lib.models import huggingface
from kd_lib.models.builders import build_model, for_data
from kd_lib.steps.common import StepError, carry_tokenizer, model_spec
from kd_lib.steps.inputs import accuracy, model_params, open_dataset, tensors


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
    trained on), or a text classifier of MLflow's ``transformers`` flavor (loaded as a
    ``huggingface`` teacher is). ``teacher.source: huggingface`` loads a ``save_pretrained``
    directory (``huggingface_teacher``). ``teacher.source: onnx`` reads an ONNX file (local or ``s3://``) whose output
    is logits, with ``teacher.input_normalization`` folded in front of its graph so that it takes
    raw inputs (``onnx_teacher``); it is saved as an ONNX Runtime artifact and run by ONNX
    Runtime wherever the teacher runs. ``teacher.source: checkpoint`` reads a ``state_dict`` file (local or
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
    with step_run(cfg, pipeline_run_id, "import_teacher") as run, open_dataset(cfg, dataset_dir) as splits:
        meta = splits.meta
        uri = cfg.teacher.uri or ""
        run.log_params({"source": cfg.teacher.source, "uri": uri})

        with tempfile.TemporaryDirectory() as tmp:
            if cfg.teacher.source == "mlflow":
                model, spec = _from_registry(run, uri, tmp, dataset_dir, meta)
            elif cfg.teacher.source == "huggingface":
                model, spec = huggingface_teacher(cfg, dataset_dir, meta, tmp, run.run_id)
            elif cfg.teacher.source == "onnx":
                model, spec = onnx_teacher(cfg, meta, tmp, run.run_id)
            else:
                model = _from_checkpoint(cfg, meta, uri, tmp)
                params = model_params(cfg.teacher.model, meta)
                spec = model_spec(cfg.teacher.model, meta, "teacher", run.run_id, params) | {"imported_from": uri}
            run.set_tags({"kdflow.teacher_source": spec["imported_from"]}, on_parent=True)
        if list(spec["input_shape"]) != list(meta.input_shape) or int(spec["num_classes"]) != meta.num_classes:
            raise StepError(
                f"teacher {uri} takes input {spec['input_shape']} with {spec['num_classes']} classes, but the data has "
                f"{meta.input_shape} with {meta.num_classes}: use a teacher trained for this data"
            )
        quantization.save_model(model, spec, teacher_dir)
        carry_tokenizer(dataset_dir, meta, teacher_dir)

        x_val, y_val = tensors(splits, "val")
        val_acc = accuracy(for_data(model, spec.get("normalization"), meta.normalization), x_val, y_val)
        run.log_metrics({"best_val_accuracy": val_acc})
        if history_path is not None:
            write_history(history_path, [])  # no training curve to show
        return {"best_val_accuracy": val_acc, "run_id": run.run_id, "imported_from": spec["imported_from"]}


def huggingface_teacher(
    cfg: PipelineConfig, dataset_dir: str | Path, meta: DatasetMeta, tmp: str | Path, run_id: str
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The Hugging Face teacher ``teacher.uri`` holds, checked against this text data, and its spec.

    The data's token ids must come from the teacher's own tokenizer (``data.tokenizer: auto``):
    the two ``tokenizer.json`` files must map the same tokens to the same ids.

    Returns:
        ``(model, spec)``: ``kd_lib.models.huggingface.SequenceClassifier`` (ids ``[B, L]`` ->
        logits ``[B, C]``) and its spec (``arch: huggingface``, the model's configuration as params).

    Raises:
        ConfigError: ``teacher.uri`` is a hub name or not a directory or ``s3://`` prefix.
        HuggingFaceError: the directory cannot be loaded safely or its labels do not fit the data.
        StepError: the data is not text, or was tokenized with another vocabulary.
    """
    uri = cfg.teacher.uri or ""
    _text_of(dataset_dir, meta, "Hugging Face")  # before anything is fetched
    fetch = partial(storage.fetch, retry=cfg.tracking.retry)
    directory = huggingface.local_dir(uri, tmp, fetch)
    return _hugging_face_model(directory, directory / huggingface.TOKENIZER_FILE, uri, dataset_dir, meta, run_id)


def _text_of(dataset_dir: str | Path, meta: DatasetMeta, what: str) -> TextMeta:
    """The text metadata of the data a Hugging Face teacher reads; refused for other data."""
    if meta.text is None or tokenizer_path(dataset_dir, meta) is None:
        raise StepError(
            f"a {what} teacher classifies text, but the dataset ({meta.source}) holds no token ids: "
            "set data.text_column"
        )
    return meta.text


def _hugging_face_model(
    directory: Path, tokenizer_file: Path, uri: str, dataset_dir: str | Path, meta: DatasetMeta, run_id: str
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The Hugging Face classifier in ``directory`` checked against this text data, and its spec."""
    text = _text_of(dataset_dir, meta, "Hugging Face")
    names = meta.class_names or [str(i) for i in range(meta.num_classes)]
    model, params = huggingface.for_data(directory, tokenizer_file, uri, names, text.pad_id, text.max_length)
    if not huggingface.same_vocabulary(tokenizer_file, tokenizer_path(dataset_dir, meta) or tokenizer_file):
        raise StepError(
            f"the data's token ids come from a tokenizer ({text.tokenizer_origin}) whose vocabulary differs "
            f"from teacher.uri {uri}'s tokenizer.json: set data.tokenizer: auto so the data is tokenized with the "
            "teacher's own tokenizer"
        )
    spec = model_spec(ModelConfig(arch=huggingface.ARCH, params=params), meta, "teacher", run_id)
    return model, spec | {"imported_from": uri}


def onnx_teacher(cfg: PipelineConfig, meta: DatasetMeta, tmp: str, run_id: str) -> tuple[OrtModule, dict[str, Any]]:
    """The ONNX classifier at ``teacher.uri`` as an ONNX Runtime artifact's model, and its spec.

    ``teacher.input_normalization`` is folded into the graph (``taking_raw_inputs``): the
    module takes raw inputs, and its spec (``arch: onnx``) says so, as every ONNX artifact's.

    Returns:
        ``(model, spec)``: an ``OrtModule`` mapping raw ``[B, *input_shape]`` to ``[B, C]``.

    Raises:
        StorageError: the file cannot be fetched.
        StepError: the file is not a one-input ONNX graph, takes another input shape than the
            data's, refuses a batch of the data, or returns another number of logits than classes.
    """
    uri = cfg.teacher.uri or ""
    local = Path(storage.fetch(uri, tmp, cfg.tracking.retry))
    declared = cfg.teacher.input_normalization
    norm = {} if declared in (None, "raw") else declared.model_dump()  # type: ignore[union-attr]
    try:
        blob = taking_raw_inputs(local.read_bytes(), norm, uri)
        model = OrtModule(blob, source=uri)
    except ArtifactError as err:
        raise StepError(f"teacher.uri {uri}: {err.cause}", err.fix) from None
    shape = list(meta.input_shape)
    declared_shape = list(model.input_shape)
    if len(declared_shape) != len(shape) or any(
        d is not None and d != s for d, s in zip(declared_shape, shape, strict=True)
    ):
        raise StepError(
            f"teacher.uri {uri} takes samples of shape {list(model.input_shape)}, but the data's are {shape}: "
            "use a teacher trained for this data"
        )
    probe = torch.zeros(2, *shape)  # two samples: a graph with a fixed batch of 1 fails here
    try:
        classes = model(probe).shape[-1]
    except ValueError as err:
        raise StepError(f"teacher.uri: {err}", "export the teacher with a dynamic batch axis") from None
    if classes != meta.num_classes:
        raise StepError(
            f"teacher.uri {uri} returns {classes} logits per sample, but the data has {meta.num_classes} classes: "
            "use a teacher trained for these classes (its first output must be the logits)"
        )
    base = model_spec(ModelConfig(arch="onnx", params={}), meta, "teacher", run_id)
    spec = base | {"normalization": norm or dict(IDENTITY_NORMALIZATION), "imported_from": uri}
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "teacher.onnx"
        path.write_bytes(blob)
        save_onnx_model(path, spec, Path(work) / "artifact", scheme="onnx_fp32")
        model, written = load_onnx_model(Path(work) / "artifact")
    return model, written


def _from_registry(
    run: StepRun, uri: str, tmp: str, dataset_dir: str | Path, meta: DatasetMeta
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The registered model ``uri`` names: a kdflow model with its own spec (renamed to this run's
    teacher), or a model of MLflow's ``transformers`` flavor (a text classifier, loaded as
    ``teacher.source: huggingface`` loads a directory)."""
    name, alias, version = parse_models_uri(uri)
    with registry_errors(run.client.tracking_uri, name, action="read", permission="READ"):
        try:
            version, model_dir = ModelRegistry(run.client, name).download_ref(
                tmp, alias, version, accept_transformers=True
            )
        except RegistryError as err:
            raise StepError(f"teacher.uri: {err}") from None
    flavor = transformers_flavor(model_dir)
    if flavor is not None and not (model_dir / SPEC_FILE).is_file():
        source = f"models:/{name}/{version}"
        return _hugging_face_model(flavor[0], flavor[1], source, dataset_dir, meta, run.run_id)
    model, spec = quantization.load_model(model_dir)
    return model, dict(spec, role="teacher", mlflow_run_id=run.run_id, imported_from=f"models:/{name}/{version}")


def registered_tokenizer(run: StepRun, uri: str, tmp: str) -> Path | None:
    """The ``tokenizer.json`` of the registered teacher ``uri`` (for ``data.tokenizer: auto``), or None.

    A model of MLflow's ``transformers`` flavor keeps it as its tokenizer component; a kdflow
    text model carries it beside its weights; other models have none.

    Raises:
        ConfigError: a malformed URI.
        StepError: the model or version is missing from the registry.
    """
    name, alias, version = parse_models_uri(uri)
    with registry_errors(run.client.tracking_uri, name, action="read", permission="READ"):
        try:
            _, model_dir = ModelRegistry(run.client, name).download_ref(tmp, alias, version, accept_transformers=True)
        except RegistryError as err:
            raise StepError(f"teacher.uri: {err}") from None
    flavor = transformers_flavor(model_dir)
    found = flavor[1] if flavor is not None else model_dir / TOKENIZER_FILE
    return found if found.is_file() else None


def _from_checkpoint(cfg: PipelineConfig, meta: DatasetMeta, uri: str, tmp: str) -> torch.nn.Module:
    """``teacher.model`` with the ``state_dict`` file at ``uri`` (local or ``s3://``) loaded into it."""
    local = storage.fetch(uri, tmp, cfg.tracking.retry)
    torch.manual_seed(0)
    params = model_params(cfg.teacher.model, meta)  # text data: + vocab_size, pad_id
    model = build_model(cfg.teacher.model.arch, params, tuple(meta.input_shape), meta.num_classes)
    try:
        state = torch.load(local, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
    except Exception as err:  # noqa: BLE001 (torch raises many types for a bad file)
        raise StepError(
            f"teacher.uri {uri}: not a state_dict of teacher.model {cfg.teacher.model.arch} "
            f"{cfg.teacher.model.params} ({type(err).__name__}: {str(err)[:300]}); fix teacher.model or the file"
        ) from None
    return model
