"""ONNX Runtime as a deployment backend beside torch: export, int8 quantization, save, load, run.

An ONNX artifact is a model directory (``kd_lib.artifacts.model_dir``) holding ``model.onnx``
and ``spec.json``. The ONNX file is one self-contained graph (weights inline) made by
``torch.onnx.export`` (the dynamo exporter) with a dynamic batch axis, input ``x`` and output
``logits``, and the train split's normalization folded in: the graph computes
``(x - mean) / std`` itself, so it takes RAW features, as the source data holds them. Its spec
therefore says ``normalization = {"mean": 0.0, "std": 1.0}`` and keeps the statistics it
folded in as ``folded_normalization``; the export also writes them into the ONNX file's
metadata (``kdflow.normalization``), which is where ``save_onnx_model`` reads them from.

Schemes (``kd_lib.config.compress.ONNX_SCHEMES``):

- ``onnx_fp32``: the export as it is. The exporter folds eval-mode BatchNorm into the
  convolutions; ONNX Runtime fuses Conv + ReLU and Gemm + activation when it builds its session.
- ``onnx_static_int8``: ORT's ``quantize_static``: QDQ format, int8 weights per output
  channel, uint8 activations with MinMax scales from calibration batches (raw inputs, as
  the graph takes them). BatchNorm is already folded into the convolutions by the exporter;
  ``quant_pre_process`` (shape inference, ORT's basic fusions) runs first.
- ``onnx_dynamic_int8``: ORT's ``quantize_dynamic``: int8 weights, activations quantized
  per batch at run time, on MatMul/Gemm nodes only (like torch's ``dynamic_int8``, Linear
  only: ORT's ConvInteger is several times slower than its fp32 Conv on CPU).

The choices were measured (p50, 1 thread, a 2-core Xeon with AVX512-VNNI, random weights,
28x28 inputs): uint8 activations beat int8 ones for convolutions (a width-16 ResNet at batch
64: 5.8 vs 14.5 ms) and tie for the wide 784-1200-1200-10 MLP (0.39 vs 0.41 ms);
``quant_pre_process`` changed no latency beyond noise. ``bench/quantization.py`` puts these
artifacts beside every torch scheme on trained mnist5k models.

``OrtModule`` runs such a file as an ``nn.Module`` (eval-mode, no parameters, CPU), so the
evaluation and latency code treat it like any torch model; its ONNX Runtime session uses as
many intra-op threads as ``torch.get_num_threads()`` says at call time.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from kd_lib.artifacts import model_dir
from kd_lib.artifacts.errors import ArtifactError
from kd_lib.artifacts.model_dir import ModelSpec
from kd_lib.compress.base import QuantizationError
from kd_lib.config.compress import ONNX_SCHEMES

BACKEND = "onnxruntime"
FORMAT = model_dir.ONNX_FORMAT
INPUT_NAME = "x"
OUTPUT_NAME = "logits"
# The ONNX metadata key holding the normalization the graph applies itself (JSON).
NORMALIZATION_KEY = "kdflow.normalization"
IDENTITY_NORMALIZATION: dict[str, Any] = {"mean": 0.0, "std": 1.0}

__all__ = [
    "BACKEND",
    "FORMAT",
    "IDENTITY_NORMALIZATION",
    "INPUT_NAME",
    "NORMALIZATION_KEY",
    "ONNX_SCHEMES",
    "OUTPUT_NAME",
    "Normalized",
    "OrtModule",
    "build_onnx_artifact",
    "export_fp32_onnx",
    "folded_normalization",
    "graph_io",
    "load_onnx_model",
    "quantize_onnx_file",
    "run_onnx",
    "save_onnx_model",
    "taking_raw_inputs",
    "versions",
    "weight_count",
]


def versions() -> dict[str, str]:
    """The libraries that made an ONNX artifact: ONNX Runtime (runs and quantizes it), onnx and
    onnxscript (the exporter's graph libraries) and torch (the exporter). onnxscript's version is
    read from its metadata: importing it costs ~0.5 s."""
    return {
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "onnxscript": metadata.version("onnxscript"),
        "torch": torch.__version__,
    }


# --------------------------------------------------------------------------------------------
# export


def _stat(value: Any, rank: int, key: str) -> Tensor:
    """A mean or std as a tensor broadcasting over ``[B, *input_shape]`` (``rank`` = len(input_shape))."""
    t = torch.as_tensor(value, dtype=torch.float32)
    if t.ndim > 1:
        raise ValueError(f"normalization {key} must be a number or a list of numbers (one per channel), got {value!r}")
    # One value per channel: [C, 1, 1] over [B, C, H, W]; per feature for a flat input [B, F].
    return t.reshape(-1, *([1] * (rank - 1))) if t.ndim == 1 else t


class Normalized(nn.Module):
    """``model((x - mean) / std)``: a model trained on normalized inputs, fed raw ones.

    Statistics are scalars or one value per channel (``kd_lib.data.normalization``); an empty
    mapping is the identity. ``model`` stays a child named ``model``.

    Args:
        model: Maps normalized ``[B, *input_shape]`` to ``[B, C]``.
        normalization: ``{"mean": m, "std": s}``.
        input_shape: One sample's shape (to broadcast per-channel statistics).
    """

    mean: Tensor
    std: Tensor

    def __init__(self, model: nn.Module, normalization: Mapping[str, Any], input_shape: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        rank = len(input_shape)
        self.register_buffer("mean", _stat(normalization.get("mean", 0.0), rank, "mean"))
        self.register_buffer("std", _stat(normalization.get("std", 1.0), rank, "std"))
        if bool((self.std == 0).any()):
            raise ValueError(f"normalization std must not be 0, got {normalization.get('std')!r}")

    def forward(self, x: Tensor) -> Tensor:
        return self.model((x - self.mean) / self.std)


def _is_identity(normalization: Mapping[str, Any] | None) -> bool:
    if not normalization:
        return True
    mean = torch.as_tensor(normalization.get("mean", 0.0), dtype=torch.float64)
    std = torch.as_tensor(normalization.get("std", 1.0), dtype=torch.float64)
    return bool((mean == 0).all() and (std == 1).all())


def export_fp32_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    normalization: Mapping[str, Any] | None,
    path: str | Path,
    token_ids: bool = False,
) -> Path:
    """Export an fp32 module to one self-contained ONNX file taking RAW inputs.

    A text model (``token_ids``) takes int64 ids ``[B, L]`` with dynamic batch AND sequence
    axes (``L`` up to ``input_shape[0]``, the max length); nothing is normalized or folded.

    The graph computes ``model((x - mean) / std)`` (``Normalized``), with a dynamic batch axis,
    input ``x`` ``[B, *input_shape]`` float32 and output ``logits`` ``[B, C]`` float32. The model
    is exported in eval mode (BatchNorm with its running statistics, no dropout) from a copy on
    CPU: ``model`` itself is left as it was. The folded normalization is written into the file's
    metadata as ``kdflow.normalization`` (JSON).

    Args:
        model: Maps normalized ``[B, *input_shape]`` float32 to ``[B, C]`` logits.
        input_shape: One sample's shape, e.g. ``(1, 28, 28)``.
        normalization: ``{"mean", "std"}`` of the train split the model was trained on
            (scalars or per-channel lists); None or ``{}`` when its inputs are not normalized.
        path: The ``.onnx`` file to write (its directory is created).
        token_ids: The model takes token ids (``kd_lib.models.text``), not float features.

    Returns:
        ``path``.

    Raises:
        QuantizationError: ``torch.onnx.export`` cannot export this model (named, with the
            exporter's first line).
        ValueError: a malformed normalization.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    shape = tuple(int(s) for s in input_shape)
    norm = dict(normalization or {})
    body = copy.deepcopy(model).cpu().eval()
    if token_ids and not _is_identity(norm):
        raise ValueError(f"a text model takes token ids: nothing to normalize, got normalization {norm}")
    wrapped = body if _is_identity(norm) else Normalized(body, norm, shape).eval()
    # Batch 2, not 1: the exporter specializes a size-1 dimension, even one marked dynamic.
    example = torch.zeros(2, *shape)
    dynamic: dict[int, Any] = {0: torch.export.Dim("batch")}
    if token_ids:
        # Ids of real tokens (1), not padding: the sequence axis is dynamic up to the max length.
        example = torch.ones(2, *shape, dtype=torch.int64)
        dynamic[1] = torch.export.Dim("sequence", min=2, max=max(2, shape[0]))
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    try:
        # The exporter warns about its own internals (deprecated onnxscript APIs, opset
        # conversions) and logs every torchvision operator it cannot register; its result is
        # checked by the callers' tests, not by these messages.
        exporter_log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                wrapped,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=(dynamic,),
                dynamo=True,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many types; each means "not exportable"
        raise QuantizationError(
            f"torch.onnx.export cannot export this {type(model).__name__} to ONNX ({_export_failure(err)})",
            "choose a torch scheme instead (quantize.scheme / quantize.candidates without the onnx_* schemes), "
            "or make the model exportable by torch.export (no data-dependent Python control flow)",
        ) from err
    finally:
        exporter_log.setLevel(level)
    if program is None:  # only with dynamo=False; kept for the type checker
        raise QuantizationError(f"torch.onnx.export returned no program for this {type(model).__name__}")
    proto = program.model_proto
    _strip_debug_info(proto)
    _set_metadata(proto, {NORMALIZATION_KEY: json.dumps(norm, sort_keys=True)})
    # One file, weights inline: its size is the model's size.
    onnx.save_model(proto, str(out), save_as_external_data=False)
    return out


def _export_failure(err: BaseException) -> str:
    """The root cause of an export error in one line, and the model's line that raised it."""
    root = err
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(root).splitlines()]
    lines = [line for line in lines if line]
    text = f"{type(root).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")
    full = [line.strip() for line in str(err).splitlines()]
    if "The following call raised this error:" in full:
        at = full.index("The following call raised this error:")
        where = " ".join(full[at + 1 : at + 3]).strip()
        if where:
            text += f"; at {where[:300]}"
    return text


def _strip_debug_info(proto: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debug records (FX node, class hierarchy, the source file's
    path and line): a quarter of a small model's file (17 of 63 kB for a width-16 ResNet), and
    they would make the artifact's bytes depend on where the code was checked out."""
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            graphs += [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]
        for value in [*graph.input, *graph.output, *graph.value_info, *graph.initializer]:
            del value.metadata_props[:]
    for function in proto.functions:
        for node in function.node:
            del node.metadata_props[:]
            node.doc_string = ""


def _set_metadata(proto: onnx.ModelProto, entries: Mapping[str, str]) -> None:
    kept = [p for p in proto.metadata_props if p.key not in entries]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)


def _metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}


def folded_normalization(path: str | Path) -> dict[str, Any] | None:
    """The normalization an exported file applies itself (``kdflow.normalization``), None when
    the file does not say (not exported by ``export_fp32_onnx``)."""
    proto = onnx.load_model(str(path), load_external_data=False)
    text = _metadata(proto).get(NORMALIZATION_KEY)
    return None if text is None else dict(json.loads(text))


def graph_io(model_bytes: bytes, source: str) -> tuple[str, list[int | None], list[str]]:
    """The one input of an ONNX graph and its outputs: ``(input name, per-sample shape, output names)``.

    The per-sample shape drops the batch axis; a symbolic dimension is None.

    Raises:
        ArtifactError: not an ONNX model, or not exactly one input besides the initializers
            (names ``source``).
    """
    try:
        proto = onnx.load_model_from_string(model_bytes)
    except Exception as err:  # protobuf's DecodeError and onnx's own types
        raise ArtifactError(f"{source}: not an ONNX model ({type(err).__name__}: {str(err)[:200]})") from None
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1 or not proto.graph.output:
        raise ArtifactError(
            f"{source}: a classifier graph takes one input [B, *input_shape] and returns logits [B, C]; this one "
            f"has inputs {[i.name for i in inputs]} and outputs {[o.name for o in proto.graph.output]}"
        )
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in list(dims)[1:]]
    return inputs[0].name, shape, [o.name for o in proto.graph.output]


def taking_raw_inputs(model_bytes: bytes, normalization: Mapping[str, Any] | None, source: str) -> bytes:
    """An ONNX classifier made into kdflow's ONNX artifact graph: RAW inputs, normalization folded in.

    A file trained on ``(raw - mean) / std`` gets ``Sub`` and ``Div`` nodes in front of its own
    (per-channel statistics broadcast over ``[B, C, H, W]``), so it takes the data's raw values
    like ``export_fp32_onnx``'s graphs; only the first output (the logits) is kept. The folded
    statistics go into the ``kdflow.normalization`` metadata, where ``save_onnx_model`` reads them.

    Args:
        model_bytes: The ``.onnx`` file's content: one input ``[B, *input_shape]`` float32,
            first output ``[B, C]`` logits.
        normalization: ``{"mean", "std"}`` the file expects, scalars or per-channel lists;
            None or ``{}`` when it takes raw values.
        source: The file, named in errors.

    Returns:
        The new model's bytes.

    Raises:
        ArtifactError: not an ONNX model, or not one input (``graph_io``).
    """
    name, shape, _ = graph_io(model_bytes, source)
    proto = onnx.load_model_from_string(model_bytes)
    del proto.graph.output[1:]  # logits only: a second output (probabilities) would confuse OrtModule
    norm = dict(normalization or {})
    if not _is_identity(norm):
        normalized = f"{name}__kdflow_normalized"
        for node in proto.graph.node:
            for i, value in enumerate(node.input):
                if value == name:
                    node.input[i] = normalized
        rank = len(shape)
        stats = []
        for key, default in (("mean", 0.0), ("std", 1.0)):
            t = np.asarray(norm.get(key, default), dtype=np.float32)
            if t.ndim == 1 and rank >= 1:  # per channel: [C, 1, ..., 1] against [B, C, ...]
                t = t.reshape(-1, *([1] * (rank - 1)))
            stats.append(onnx.numpy_helper.from_array(t, name=f"{name}__kdflow_{key}"))
        proto.graph.initializer.extend(stats)
        centered = f"{name}__kdflow_centered"
        front = [
            onnx.helper.make_node("Sub", [name, stats[0].name], [centered], name="kdflow_input_sub"),
            onnx.helper.make_node("Div", [centered, stats[1].name], [normalized], name="kdflow_input_div"),
        ]
        nodes = [*front, *proto.graph.node]
        del proto.graph.node[:]
        proto.graph.node.extend(nodes)
    _set_metadata(proto, {NORMALIZATION_KEY: json.dumps(norm, sort_keys=True)})
    return proto.SerializeToString()


# Initializer element types that hold weights (float, or 8-bit in a quantized graph); int64 and
# int32 initializers are shapes and indices.
_WEIGHT_TYPES = {
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8,
}


def weight_count(model_bytes: bytes) -> int:
    """Number of weights of an ONNX model: the elements of its float and 8-bit initializers.

    The counterpart of ``kd_lib.models.builders.count_parameters`` for a graph that has no
    torch module, e.g. an imported ONNX teacher. BatchNorm folded into convolutions by the
    exporter counts as the convolutions' bias (a few fewer than torch counts); a quantized
    graph's scales and zero points count too.
    """
    proto = onnx.load_model_from_string(model_bytes)
    graphs, total = [proto.graph], 0
    while graphs:
        graph = graphs.pop()
        total += sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type in _WEIGHT_TYPES)
        graphs += [a.g for n in graph.node for a in n.attribute if a.HasField("g")]
    return total


# --------------------------------------------------------------------------------------------
# int8


class _CalibrationBatches:
    """ORT's ``CalibrationDataReader`` protocol (``get_next``, ``rewind``) over tensors."""

    def __init__(self, batches: Sequence[Tensor], input_name: str) -> None:
        self._feeds = [{input_name: b.detach().cpu().float().contiguous().numpy()} for b in batches]
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._feeds):
            return None
        self._next += 1
        return self._feeds[self._next - 1]

    def rewind(self) -> None:
        self._next = 0


def quantize_onnx_file(
    fp32_path: str | Path,
    out_path: str | Path,
    scheme: str,
    calibration_raw: Sequence[Tensor],
) -> Path:
    """ONNX Runtime's int8 quantization of an fp32 export.

    Args:
        fp32_path: From ``export_fp32_onnx``.
        out_path: The quantized ``.onnx`` file to write.
        scheme: ``onnx_static_int8`` (``quantize_static``: QDQ, per-channel int8 weights, uint8
            activations, MinMax calibration) or ``onnx_dynamic_int8`` (``quantize_dynamic``:
            int8 weights, activations quantized per batch at run time).
        calibration_raw: Batches ``[B, *input_shape]`` float32 of RAW inputs (the graph
            normalizes them itself); a few training batches. Needed by static int8 only.

    Returns:
        ``out_path``; its metadata keeps the fp32 file's (the folded normalization).

    Raises:
        QuantizationError: an unknown scheme, static int8 without calibration batches, or
            ONNX Runtime's quantizer failing on this graph.
    """
    # lazy: onnxruntime.quantization (0.1 s, onnx's helpers) is needed only to quantize
    from onnxruntime import quantization as ortq
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if scheme not in ("onnx_static_int8", "onnx_dynamic_int8"):
        raise QuantizationError(
            f"quantize_onnx_file: scheme {scheme!r} is not an ONNX Runtime int8 scheme; "
            "use onnx_static_int8 or onnx_dynamic_int8 (onnx_fp32 is the export itself)"
        )
    if scheme == "onnx_static_int8" and not calibration_raw:
        raise QuantizationError(
            "onnx_static_int8 needs calibration batches (raw training inputs) to set activation scales; "
            "got none. Set quantize.calibration_batches >= 1"
        )
    source, out = Path(fp32_path), Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = _metadata(onnx.load_model(str(source), load_external_data=False))
    try:
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ORT's quantizer warns about its own preferences
            # Shape inference + ORT's basic graph optimizations first, as ORT's quantization
            # guide advises (the exporter has already folded BatchNorm into the convolutions;
            # this fuses what is left and marks the file, which stops the quantizer warning).
            prepared = Path(tmp) / "prepared.onnx"
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            if scheme == "onnx_static_int8":
                ortq.quantize_static(
                    str(prepared),
                    str(out),
                    _CalibrationBatches(calibration_raw, _input_name(source)),
                    quant_format=ortq.QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=ortq.QuantType.QUInt8,
                    weight_type=ortq.QuantType.QInt8,
                    calibrate_method=ortq.CalibrationMethod.MinMax,
                )
            else:
                # MatMul/Gemm, like torch's dynamic_int8 (nn.Linear only): ORT's ConvInteger
                # runs 4-6x slower than its fp32 Conv here (1 thread; CNN student b1 0.101 vs
                # 0.026 ms, ResNet b1 0.90 vs 0.15 ms); convolutions are static int8's. A text
                # model's embedding tables (Gather on int64 ids) hold most of its weights: they
                # are stored int8 too (one scale per table, dequantized after the lookup).
                ops = ["MatMul", "Gemm"] + (["Gather"] if _takes_token_ids(source) else [])
                ortq.quantize_dynamic(
                    str(prepared), str(out), weight_type=ortq.QuantType.QInt8, op_types_to_quantize=ops
                )
    except Exception as err:  # ORT's quantizer raises many types; each means "cannot quantize this graph"
        raise QuantizationError(
            f"ONNX Runtime {scheme} failed on {source.name} ({type(err).__name__}: {str(err)[:300]})",
            "use onnx_fp32 or a torch scheme for this model",
        ) from err
    proto = onnx.load_model(str(out), load_external_data=False)
    _set_metadata(proto, metadata)
    onnx.save_model(proto, str(out), save_as_external_data=False)
    return out


def _graph_input(path: Path) -> onnx.ValueInfoProto:
    """The graph's first input that is not an initializer: the samples it takes."""
    proto = onnx.load_model(str(path), load_external_data=False)
    initializers = {i.name for i in proto.graph.initializer}
    return next(i for i in proto.graph.input if i.name not in initializers)


def _takes_token_ids(path: Path) -> bool:
    """Whether the graph's input is int64: a text model's token ids."""
    return bool(_graph_input(path).type.tensor_type.elem_type == onnx.TensorProto.INT64)


def _input_name(path: Path) -> str:
    return str(_graph_input(path).name)


# --------------------------------------------------------------------------------------------
# artifacts


def save_onnx_model(
    onnx_path: str | Path,
    spec: Mapping[str, Any] | ModelSpec,
    directory: str | Path,
    scheme: str | None = None,
) -> Path:
    """Write an ONNX file as a model directory: ``model.onnx`` + ``spec.json``.

    The written spec is ``spec`` plus ``quantization`` (the scheme), ``backend``
    (``onnxruntime``), ``format`` (``onnx``), ``normalization`` ``{"mean": 0.0, "std": 1.0}``
    (the file takes raw inputs), ``folded_normalization`` (what the file applies itself, read
    from its ``kdflow.normalization`` metadata), ``versions`` and ``torch_version``.

    Args:
        onnx_path: An ``.onnx`` file from ``export_fp32_onnx`` (or ``quantize_onnx_file``).
        spec: The fp32 model's spec (``arch``, ``params``, ``input_shape``, ``num_classes``,
            ``normalization``, provenance); not modified.
        directory: The model directory (created if missing); a ``weights.bin`` or
            ``weights.pt`` there is removed.
        scheme: ``onnx_fp32``, ``onnx_static_int8`` or ``onnx_dynamic_int8``; None means
            ``spec["quantization"]``, which must then be one of them.

    Returns:
        The directory.

    Raises:
        ValueError: no ONNX scheme given, a required spec key missing, a file without the
            ``kdflow.normalization`` metadata, or a ``spec["normalization"]`` that differs
            from what the file folded in.
    """
    data = spec.to_dict() if isinstance(spec, ModelSpec) else dict(spec)
    name = scheme if scheme is not None else data.get("quantization")
    if name not in ONNX_SCHEMES:
        raise ValueError(f"save_onnx_model: scheme {name!r} is not one of {', '.join(ONNX_SCHEMES)}")
    blob = Path(onnx_path).read_bytes()
    proto = onnx.load_model_from_string(blob)
    text = _metadata(proto).get(NORMALIZATION_KEY)
    if text is None:
        raise ValueError(
            f"{onnx_path}: has no {NORMALIZATION_KEY} metadata, so what it expects as input is unknown; "
            "export it with kd_lib.compress.onnx_runtime.export_fp32_onnx"
        )
    folded = json.loads(text)
    given = data.get("normalization")
    if data.get("format") == FORMAT:  # an ONNX artifact's spec given back: its statistics are the folded ones
        given = data.get("folded_normalization")
    if given and not _is_identity(given) and not _same_normalization(given, folded):
        raise ValueError(
            f"{onnx_path}: folds in normalization {folded}, but the spec says the model was trained with {given}; "
            "export with the spec's normalization"
        )
    written = {
        **data,
        "quantization": name,
        "backend": BACKEND,
        "format": FORMAT,
        "normalization": dict(IDENTITY_NORMALIZATION),
        "folded_normalization": folded,
        "versions": versions(),
        "torch_version": torch.__version__,
    }
    if "input_shape" in written:
        written["input_shape"] = list(written["input_shape"])
    return model_dir.write_onnx_model_dir(directory, written, blob)


def _same_normalization(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    for key, default in (("mean", 0.0), ("std", 1.0)):
        x = np.asarray(a.get(key, default), dtype=np.float64)
        y = np.asarray(b.get(key, default), dtype=np.float64)
        if x.shape != y.shape and not (x.size == 1 and y.size == 1):
            return False
        if not np.allclose(x.reshape(-1), y.reshape(-1), rtol=1e-6, atol=0):
            return False
    return True


def build_onnx_artifact(
    model: nn.Module,
    scheme: str,
    spec: Mapping[str, Any] | ModelSpec,
    calibration_raw: Sequence[Tensor],
    directory: str | Path,
) -> Path:
    """Export ``model`` (normalization folded in), quantize it with ``scheme``, save the directory.

    Args:
        model: The fp32 model (normalized inputs); left untouched.
        scheme: ``onnx_fp32``, ``onnx_static_int8`` or ``onnx_dynamic_int8``.
        spec: The fp32 model's spec: ``arch``, ``params``, ``input_shape``, ``num_classes``,
            ``normalization`` (what is folded in) and any provenance to keep.
        calibration_raw: Raw-input batches ``[B, *input_shape]`` for ``onnx_static_int8``.
        directory: The model directory to write (``model.onnx`` + ``spec.json``).

    Returns:
        The directory.

    Raises:
        QuantizationError: not exportable, an unknown scheme, or quantization failing.
    """
    if scheme not in ONNX_SCHEMES:
        raise QuantizationError(
            f"build_onnx_artifact: scheme {scheme!r} is not an ONNX Runtime scheme; "
            f"use one of {', '.join(ONNX_SCHEMES)}"
        )
    data = spec.to_dict() if isinstance(spec, ModelSpec) else dict(spec)
    normalization = data.get("normalization")
    if data.get("format") == FORMAT:
        raise QuantizationError("build_onnx_artifact: the spec given is already an ONNX artifact's; pass the fp32 spec")
    token_ids = data.get("text") is not None  # a text model's spec records its tokenizer's ids
    if token_ids and scheme == "onnx_static_int8":
        raise QuantizationError(
            "onnx_static_int8 is not offered for text models: ORT's static quantization calibrates float "
            "activations from float inputs, and a text model's input is int64 token ids",
            "use onnx_dynamic_int8 (the int8 scheme for transformers) or onnx_fp32",
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = export_fp32_onnx(model, data["input_shape"], normalization, Path(tmp) / "fp32.onnx", token_ids)
        if scheme != "onnx_fp32":
            path = quantize_onnx_file(path, Path(tmp) / "int8.onnx", scheme, calibration_raw)
            if scheme == "onnx_static_int8" and "calibration" not in data:
                data["calibration"] = {"batches": len(calibration_raw), "batch_size": int(len(calibration_raw[0]))}
        return save_onnx_model(path, data, directory, scheme=scheme)


# --------------------------------------------------------------------------------------------
# running


class OrtModule(nn.Module):
    """An ONNX model run by ONNX Runtime on CPU, as an eval-mode ``nn.Module``.

    Holds the file's bytes (nothing pickled) and a session built from them with
    ``CPUExecutionProvider``, ``intra_op_num_threads = torch.get_num_threads()`` at call time
    (the session is rebuilt when that changes: kdflow's latency timer pins threads with
    ``torch.set_num_threads``), one inter-op thread, sequential execution and every graph
    optimization. It has no parameters or buffers; ``.eval()``, ``.train()``, ``.to("cpu")``
    and ``torch.no_grad`` / ``inference_mode`` behave as for any module (training mode changes
    nothing: the graph is an inference graph). Pickling it keeps the bytes, not the session.

    Args:
        model_bytes: The ``.onnx`` file's content.
        source: What to name in error messages (the file's path).

    Raises:
        ArtifactError: ONNX Runtime cannot load the bytes (names ``source``); the session is
            built at once, so a corrupt file fails here, not at the first call.
    """

    def __init__(self, model_bytes: bytes, source: str = "<onnx bytes>") -> None:
        super().__init__()
        self.model_bytes = bytes(model_bytes)
        self.source = source
        self._session: ort.InferenceSession | None = None
        self._threads = 0
        session = self.session()
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name
        # Per-sample input shape as the graph declares it (the batch axis dropped; None = symbolic).
        self.input_shape = tuple(d if isinstance(d, int) else None for d in session.get_inputs()[0].shape[1:])
        # A text model's graph takes int64 token ids; every other one float32 features.
        self.input_dtype = torch.int64 if session.get_inputs()[0].type == "tensor(int64)" else torch.float32

    @classmethod
    def from_file(cls, path: str | Path) -> OrtModule:
        """An ``OrtModule`` over an ``.onnx`` file (read once; the file may go afterwards).

        Raises:
            ArtifactError: the file is missing, unreadable or not a loadable ONNX model.
        """
        try:
            blob = Path(path).read_bytes()
        except OSError as err:
            raise ArtifactError(f"{path}: cannot read the ONNX model ({err.strerror or err})") from None
        return cls(blob, source=str(path))

    def session(self, threads: int | None = None) -> ort.InferenceSession:
        """The session for ``threads`` intra-op threads (default ``torch.get_num_threads()``),
        built (or rebuilt) when the count differs from the current session's."""
        wanted = max(1, int(threads if threads is not None else torch.get_num_threads()))
        if self._session is None or wanted != self._threads:
            options = ort.SessionOptions()
            options.intra_op_num_threads = wanted
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3  # errors only: ORT's warnings about its own choices are noise here
            try:
                self._session = ort.InferenceSession(self.model_bytes, options, providers=["CPUExecutionProvider"])
            except Exception as err:  # ORT raises its own pybind types (Fail, InvalidGraph, ...)
                raise ArtifactError(
                    f"{self.source}: not a loadable ONNX model ({type(err).__name__}: {str(err)[:300]})",
                    "export the model again (kd_lib.compress.onnx_runtime.build_onnx_artifact) or restore the file",
                ) from None
            self._threads = wanted
        return self._session

    @property
    def threads(self) -> int:
        """Intra-op threads of the current session (the count at the last call)."""
        return self._threads

    @property
    def nbytes(self) -> int:
        """Size of the ONNX model in bytes."""
        return len(self.model_bytes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of ``x``.

        Args:
            x: ``[B, *input_shape]`` RAW inputs (cast to float32, or int64 for a text model's
                token ids; moved to CPU).

        Returns:
            ``[B, C]`` float32 logits on CPU.

        Raises:
            ValueError: ONNX Runtime refuses the input (wrong rank or shape), naming both.
        """
        feed = x.detach().to(device="cpu", dtype=self.input_dtype).contiguous().numpy()
        try:
            (logits,) = self.session().run([self.output_name], {self.input_name: feed})
        except Exception as err:  # InvalidArgument for a wrong shape, among ORT's own types
            expected = ", ".join("?" if d is None else str(d) for d in self.input_shape)
            dtype = str(self.input_dtype).removeprefix("torch.")
            raise ValueError(
                f"{self.source}: ONNX Runtime refused input of shape {tuple(x.shape)}; the model takes "
                f"[B, {expected}] {dtype} ({type(err).__name__}: {str(err)[:200]})"
            ) from None
        return torch.from_numpy(logits)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())
        state["_session"], state["_threads"] = None, 0  # rebuilt on first use
        return state

    def extra_repr(self) -> str:
        return f"source={self.source!r}, bytes={self.nbytes}, threads={self._threads}"


def load_onnx_model(directory: str | Path) -> tuple[OrtModule, dict[str, Any]]:
    """Load an ONNX model directory written by ``save_onnx_model``.

    Returns:
        ``(module, spec)``: the ``OrtModule`` (raw ``[B, *input_shape]`` in, ``[B, C]`` out) and
        the spec as written.

    Raises:
        ArtifactError: ``spec.json`` or ``model.onnx`` missing or corrupt, or the graph's input
            shape disagreeing with the spec's ``input_shape``; the message names the file.
    """
    spec = model_dir.read_spec(directory)
    path = model_dir.onnx_path(directory)
    module = OrtModule(model_dir.read_onnx(directory), source=str(path))
    declared = module.input_shape
    if len(declared) != len(spec.input_shape) or any(
        d is not None and d != s for d, s in zip(declared, spec.input_shape, strict=False)
    ):
        raise ArtifactError(
            f"{path}: takes samples of shape {list(declared)}, but {Path(directory) / model_dir.SPEC_FILE} "
            f"says input_shape {spec.input_shape}"
        )
    return module.eval(), spec.to_dict()


def run_onnx(path: str | Path, x: Tensor, batch_size: int = 512) -> Tensor:
    """Logits of the ONNX file at ``path`` on ``x`` ``[N, *input_shape]``, in batches, on CPU.

    Returns:
        ``[N, C]`` float32.
    """
    module = OrtModule.from_file(path)
    with torch.no_grad():
        return torch.cat([module(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
