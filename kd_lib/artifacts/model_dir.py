"""A saved model directory: ``spec.json`` (what the model is) + ``weights.bin`` (its state dict),
or, for an ONNX Runtime artifact, ``spec.json`` + ``model.onnx``.

This module is the file format only. Turning a directory back into an ``nn.Module`` needs the
model builders and the quantization backends, which sit above this layer:
``kd_lib.compress.quantization.load_model`` does that with ``read_spec`` and ``read_weights``
from here, and ``save_model`` writes through ``write_model_dir``.

``spec.json`` is sorted, indented JSON: the architecture (``arch``, ``params``), the data it
takes (``input_shape``, ``num_classes``, ``normalization``), the quantization ``scheme`` and
``backend``, the library versions that produced it, and whatever provenance the steps add
(run ids, validation numbers, ``auto`` tries). ``weights.bin`` is kdflow's pickle-free
weights file (``kd_lib.artifacts.weights_file``). Directories written before that format hold
``weights.pt`` (``torch.save`` of the state dict) instead; they are still read, with
``torch.load(weights_only=True)``, never written.

An ONNX artifact's spec says ``format: onnx`` and ``backend: onnxruntime``; its
``model.onnx`` is one self-contained ONNX graph (weights inline) that takes raw inputs (the
normalization is folded in, kept as ``folded_normalization``). This layer only stores and
reads its bytes; running it (``OrtModule``) is ``kd_lib.compress.onnx_runtime``, and
``kd_lib.compress.quantization.load_model`` dispatches on the spec. A directory holds either
``model.onnx`` or a weights file, never both: each writer removes the other kind.

Neither torch nor the weights format is imported until weights are read or written: reading
a spec (the report, the CLI, the select step) stays light; nothing here imports onnx or
onnxruntime.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, Field, ValidationError

from kd_lib.artifacts.base import Bool, Int, Number, Record, Str, describe, read_json, validate
from kd_lib.artifacts.errors import ArtifactError

WEIGHTS_FILE = "weights.bin"
# Written by kdflow before weights.bin (torch.save of the state dict); still read, never written.
LEGACY_WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "spec.json"
# An ONNX Runtime artifact's model (kd_lib.compress.onnx_runtime), in place of the weights file.
ONNX_FILE = "model.onnx"
# A text model's tokenizer (a tokenizers JSON file, kd_lib.data.text): raw strings -> the ids it
# takes. Beside the weights (or model.onnx) of every text model; the same file as the dataset's.
TOKENIZER_FILE = "tokenizer.json"
# spec.json's ``format`` of an ONNX artifact, and the ``backend`` that runs it.
ONNX_FORMAT = "onnx"
ONNX_BACKEND = "onnxruntime"
# How the quantize step chose this artifact: every candidate it measured, with latencies. Beside
# the spec, not in it, and not part of the model's size: measurements differ run to run, and two
# runs of the same recipe must ship byte-identical models of one size.
SELECTION_FILE = "selection.json"
# Files of a model directory that describe how it was made rather than the model itself.
PROVENANCE_FILES = (SELECTION_FILE,)
REQUIRED_SPEC_KEYS = ("arch", "params", "input_shape", "num_classes", "quantization")
_LAYOUT = f"a saved model directory holds {SPEC_FILE} and {WEIGHTS_FILE} (or, an ONNX artifact, {ONNX_FILE})"


class ModelSpec(Record):
    """``spec.json``: the keys kdflow's steps write, typed; any other key is kept as it is.

    Attributes:
        arch: Builder name (``kd_lib.models.builders``).
        params: Builder parameters.
        input_shape: One sample's shape, e.g. ``[1, 8, 8]``.
        num_classes: Number of logits.
        quantization: The scheme (``none`` for fp32).
        backend: The implementation of the scheme; always set in a written spec (the
            scheme's default when none was asked for).
        torch_version: torch that wrote the weights.
        versions: Libraries the backend needs to load them (torch, the quantized engine, torchao).
        role: ``teacher``, ``student``, ``baseline`` or ``quantized_student``.
        normalization: ``{"mean", "std"}`` of the train split this model was trained on
            (floats, or one per channel).
        dataset_fingerprint: The dataset's sha256 (``DatasetMeta.fingerprint``).
        mlflow_run_id: The MLflow run of the step that wrote it.
        imported_from: Where an imported teacher came from (``models:/...`` or a checkpoint URI).
        fp32_layers: Layers the scheme left in fp32 (``"name (Type)"``).
        validation: ``fp32_accuracy`` and, after quantizing, ``accuracy`` and ``drop_points``.
        calibration: ``batches`` and ``batch_size`` of static / QAT calibration.
        quantization_auto: What the quantize step chose (``found``, ``chosen``, ``select``);
            its measurements of every candidate are in ``selection.json`` beside the spec.
        format: ``onnx`` for an ONNX Runtime artifact (``model.onnx``); absent for torch weights.
        folded_normalization: The normalization an ONNX artifact's graph applies itself (its
            ``normalization`` is then the identity: it takes raw inputs).
        text: A text model's ``DatasetMeta.text`` (``pad_id``, ``max_length``, ``vocab_size``,
            ``tokenizer_origin``, ``tokenizer_file``); its directory holds ``tokenizer.json``.
    """

    model_config = ConfigDict(extra="allow")

    arch: Str
    params: dict[str, Any]
    input_shape: list[Int] = Field(min_length=1)
    num_classes: Int = Field(ge=1)
    quantization: Str
    backend: Str | None = None
    torch_version: Str | None = None
    versions: dict[str, Str] | None = None
    role: Str | None = None
    normalization: dict[str, Number | list[Number]] | None = None
    dataset_fingerprint: Str | None = None
    mlflow_run_id: Str | None = None
    imported_from: Str | None = None
    fp32_layers: list[Str] | None = None
    validation: dict[str, Number] | None = None
    calibration: dict[str, Int] | None = None
    quantization_auto: dict[str, Any] | None = None
    format: Str | None = None
    folded_normalization: dict[str, Number | list[Number]] | None = None
    text: dict[str, Any] | None = None


class SelectionRecord(Record):
    """``selection.json``: what ``quantize.scheme: auto`` (or one named scheme) measured and chose.

    Attributes:
        select: ``fastest``, ``smallest``, or ``named`` (one scheme asked for).
        found: Whether a candidate qualified (else the torch fp32 model was kept).
        chosen: The chosen candidate's name, or None.
        reason: One sentence: what was chosen and why, or why nothing qualified.
        threads: CPU threads latencies were measured with.
        fp32_val_accuracy: The fp32 model's validation accuracy, the base of every drop.
        candidates: Each candidate's measurements and verdict (``kd_lib.evaluate.candidates``).
        reference: The torch fp32 measurements the candidates were compared with.
    """

    model_config = ConfigDict(extra="allow")

    select: Str
    found: Bool
    chosen: Str | None = None
    reason: Str = ""
    threads: Int | None = None
    fp32_val_accuracy: Number | None = None
    candidates: list[dict[str, Any]] = Field(default_factory=list)
    reference: dict[str, Any] | None = None


def write_selection(directory: str | Path, record: SelectionRecord | Mapping[str, Any]) -> Path:
    """Write ``selection.json`` into a model directory (validated first)."""
    data = record if isinstance(record, SelectionRecord) else validate(SelectionRecord, dict(record), SELECTION_FILE)
    path = Path(directory) / SELECTION_FILE
    path.write_text(json.dumps(data.to_dict(), indent=2, sort_keys=True) + "\n")
    return path


def read_selection(directory: str | Path) -> SelectionRecord | None:
    """``selection.json`` of a model directory, or None when it has none (not a quantize output).

    Raises:
        ArtifactError: the file exists but is not a valid record (naming the file and field).
    """
    path = Path(directory) / SELECTION_FILE
    if not path.is_file():
        return None
    return validate(SelectionRecord, read_json(path), path)


def missing_spec_keys(spec: Mapping[str, Any]) -> list[str]:
    """The keys of REQUIRED_SPEC_KEYS that ``spec`` lacks, in that order."""
    return [key for key in REQUIRED_SPEC_KEYS if key not in spec]


def require_spec_keys(spec: Mapping[str, Any]) -> None:
    """Raise ValueError naming the required keys ``spec`` lacks (a caller's mistake, before saving)."""
    missing = missing_spec_keys(spec)
    if missing:
        raise ValueError(f"model spec is missing {', '.join(missing)}; required keys: {', '.join(REQUIRED_SPEC_KEYS)}")


def has_model(directory: str | Path | None) -> bool:
    """Whether ``directory`` holds a saved model (its ``spec.json``, beside ``weights.bin`` or
    ``model.onnx``); False for None."""
    return directory is not None and (Path(directory) / SPEC_FILE).is_file()


def is_onnx(spec: ModelSpec | Mapping[str, Any]) -> bool:
    """Whether ``spec`` is an ONNX Runtime artifact's (``format: onnx`` or ``backend: onnxruntime``)."""
    data = spec.to_dict() if isinstance(spec, ModelSpec) else spec
    return data.get("format") == ONNX_FORMAT or data.get("backend") == ONNX_BACKEND


def read_spec(directory: str | Path) -> ModelSpec:
    """Read and validate ``spec.json`` of a saved model directory.

    Raises:
        ArtifactError: the file is missing, not JSON, not an object, lacks a required key,
            or a field has the wrong type; the message names the file (and the field).
    """
    path = Path(directory) / SPEC_FILE
    raw = read_json(path, _LAYOUT)
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: must hold a JSON object")
    missing = missing_spec_keys(raw)
    if missing:
        raise ArtifactError(f"{path}: missing key(s) {', '.join(missing)}")
    return validate(ModelSpec, raw, path)


def weights_path(directory: str | Path) -> Path:
    """The weights file to read: ``weights.bin``, or ``weights.pt`` in a directory of the older format.

    Raises:
        ArtifactError: neither is there, or both are (one of them is stale).
    """
    root = Path(directory)
    current, legacy = root / WEIGHTS_FILE, root / LEGACY_WEIGHTS_FILE
    if current.is_file() and legacy.is_file():
        raise ArtifactError(
            f"{root}: holds both {WEIGHTS_FILE} and {LEGACY_WEIGHTS_FILE}; one is stale. Save the model again "
            f"(save_model writes {WEIGHTS_FILE} and removes {LEGACY_WEIGHTS_FILE}) or delete the stale file"
        )
    if current.is_file():
        return current
    if legacy.is_file():
        return legacy
    raise ArtifactError(f"{current}: missing; {_LAYOUT}")


def onnx_path(directory: str | Path) -> Path:
    """The ``model.onnx`` of an ONNX artifact's directory.

    Raises:
        ArtifactError: it is missing or empty (named).
    """
    path = Path(directory) / ONNX_FILE
    if not path.is_file():
        raise ArtifactError(f"{path}: missing; an ONNX model directory holds {SPEC_FILE} and {ONNX_FILE}")
    if path.stat().st_size == 0:
        raise ArtifactError(f"{path}: empty; not an ONNX model")
    return path


def read_onnx(directory: str | Path) -> bytes:
    """The bytes of the ``model.onnx`` in ``directory`` (parsed by the caller, ``kd_lib.compress``).

    Raises:
        ArtifactError: it is missing, empty or unreadable (named).
    """
    path = onnx_path(directory)
    try:
        return path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"{path}: cannot be read ({err.strerror or err})") from None


def model_file(directory: str | Path) -> Path:
    """The file that holds the model itself: ``model.onnx`` for an ONNX artifact (by its
    ``spec.json``), else the weights file (``weights_path``).

    Raises:
        ArtifactError: ``spec.json`` or the model file is missing or unreadable (named).
    """
    return onnx_path(directory) if is_onnx(read_spec(directory)) else weights_path(directory)


def read_weights(path: str | Path, template: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    """The state dict in ``path`` (from ``weights_path``), tensors on CPU; never unpickles code.

    Args:
        path: ``weights.bin`` (read by ``weights_file.read_state_dict``) or a legacy
            ``weights.pt`` (``torch.load(weights_only=True)``).
        template: The state dict of the module it will be loaded into; it gives tensor
            subclasses (torchao) their class: the file supplies only tensor bytes.

    Raises:
        ArtifactError: the file is unreadable or corrupt (named).
    """
    path = Path(path)
    if path.name != LEGACY_WEIGHTS_FILE:
        # lazy: torch comes in with the weights format, only when weights are read.
        from kd_lib.artifacts import weights_file

        return weights_file.read_state_dict(path, template=template)
    import torch  # lazy: only an artifact of the older format needs torch.load

    try:
        state: Mapping[str, Any] = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # torch raises several types for a bad file; all mean "corrupt"
        raise ArtifactError(f"{path}: not a loadable weights-only state dict ({err})") from None
    return state


def write_model_dir(directory: str | Path, spec: ModelSpec | Mapping[str, Any], state: Mapping[str, Any]) -> Path:
    """Write ``spec.json`` and ``weights.bin`` into ``directory`` (created if missing).

    Everything that can fail is checked before the directory is touched; a ``weights.pt``
    left from the older format, or a ``model.onnx``, is removed, so the directory is never ambiguous.

    Args:
        directory: The model directory.
        spec: The full spec as it should be written (``compress.quantization.save_model``
            fills in ``backend`` and ``versions``); written sorted and indented.
        state: The module's state dict.

    Returns:
        The directory.

    Raises:
        ValueError: a required key is missing, a field has the wrong type, the spec is not
            JSON-able, or the state dict holds something the weights file cannot store (named).
    """
    spec_text = _spec_text(spec)
    # lazy: torch comes in with the weights format, only when weights are written.
    from kd_lib.artifacts import weights_file

    blob = weights_file.encode_state_dict(state)  # before touching the directory
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS_FILE).write_bytes(blob)
    (out / LEGACY_WEIGHTS_FILE).unlink(missing_ok=True)
    (out / ONNX_FILE).unlink(missing_ok=True)
    (out / SPEC_FILE).write_text(spec_text + "\n")
    return out


def _spec_text(spec: ModelSpec | Mapping[str, Any]) -> str:
    """``spec`` as sorted, indented JSON, after the checks every writer makes."""
    data = spec.to_dict() if isinstance(spec, ModelSpec) else dict(spec)
    require_spec_keys(data)
    try:
        ModelSpec.model_validate(data)
    except ValidationError as err:
        raise ValueError(f"model spec: {describe(err)}") from None
    try:
        return json.dumps(data, indent=2, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"model spec is not JSON-serializable: {err}") from None


def write_onnx_model_dir(directory: str | Path, spec: ModelSpec | Mapping[str, Any], onnx_bytes: bytes) -> Path:
    """Write ``spec.json`` and ``model.onnx`` into ``directory`` (created if missing).

    The spec is checked before the directory is touched; a ``weights.bin`` or ``weights.pt``
    there is removed, so the directory holds one model.

    Args:
        directory: The model directory.
        spec: The full spec as it should be written (``compress.onnx_runtime.save_onnx_model``
            fills in ``format``, ``backend``, ``versions`` and the normalization keys).
        onnx_bytes: The ONNX file's content (one self-contained graph).

    Returns:
        The directory.

    Raises:
        ValueError: a required key is missing, a field has the wrong type, the spec is not
            JSON-able or says it is not ONNX, or ``onnx_bytes`` is empty.
    """
    spec_text = _spec_text(spec)
    if not is_onnx(json.loads(spec_text)):
        raise ValueError(f"model spec of an ONNX artifact must say format: {ONNX_FORMAT}")
    if not onnx_bytes:
        raise ValueError("the ONNX model is empty (0 bytes)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / ONNX_FILE).write_bytes(onnx_bytes)
    (out / WEIGHTS_FILE).unlink(missing_ok=True)
    (out / LEGACY_WEIGHTS_FILE).unlink(missing_ok=True)
    (out / SPEC_FILE).write_text(spec_text + "\n")
    return out
