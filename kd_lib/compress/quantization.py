"""Quantization schemes behind one interface, several backends per scheme, pickle-free save/load.

A *scheme* is what a config asks for (``quantize.scheme: static_int8``); a *backend* is the
implementation that produces it (torch.ao eager mode with the x86 engine, torchao, ...).
PyTorch's quantization APIs are in flux (torch.ao is deprecated, PT2E moved to torchao,
torchao's int8 kernels need ``torch.compile`` on CPU), so every implementation is one more
registered ``Quantizer`` (``kd_lib.compress.base``) and the default backend of each scheme is
chosen by measurement (``bench/quantization.py``; the numbers behind each choice are in the
class docstrings of ``kd_lib.compress.schemes`` and ``kd_lib.compress.torch_ao``).

Schemes (``SCHEMES``):

- ``none``: fp32, the baseline.
- ``dynamic_int8``: int8 weights, activations quantized per batch at run time; nn.Linear only.
- ``static_int8``: int8 weights (per output channel) and activations, with scales calibrated
  on training batches; nn.Linear and nn.Conv1d/2d/3d (Conv + BatchNorm + ReLU fused first).
- ``weight_only_int8``: int8 weights (per output channel), fp32 compute.
- ``fp16`` / ``bf16``: the whole model cast to half precision; inputs are cast on the way in.
- ``qat_int8``: quantization-aware fine-tuning (fake quantization in the forward pass), then
  the same int8 modules as ``static_int8``.

A layer type a scheme cannot quantize is never skipped silently: ``fp32_layers`` lists it,
``apply`` warns (or raises ``QuantizationError`` when ``allow_fp32_layers`` is False), and the
quantize step records the list in the model's spec.

A saved model is a directory (``kd_lib.artifacts.model_dir``) with ``weights.bin`` (the state
dict in kdflow's pickle-free format: raw tensor bytes plus a JSON index, int8 weights as their
integers with per-channel scales; see ``kd_lib.artifacts.weights_file``) and ``spec.json``
(architecture, params, input shape, classes, scheme, backend and library versions). Every
scheme, fp32 included, uses the same format, so size ratios compare like with like. Loading
rebuilds the fp32 architecture from the spec, turns it into the quantized structure with the
recorded backend's ``prepare_for_load``, then loads the weights: no pickled code, and the same
predictions as before saving. Artifacts from before this format (``weights.pt``,
``torch.save``) still load, with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lib.artifacts import model_dir
from kd_lib.artifacts.errors import ArtifactError
from kd_lib.artifacts.model_dir import SPEC_FILE, ModelSpec
from kd_lib.compress.base import (
    QuantizationError,
    QuantizeContext,
    Quantizer,
    quantized_engine,
    quiet_torch_ao,
    uncovered_layers,
)
from kd_lib.compress.schemes import (
    CastModel,
    HalfPrecision,
    Int8WeightLayer,
    NoQuantization,
    TorchaoLinear,
    WeightOnlyInt8,
    _import_torchao,
    int8_per_channel,
)
from kd_lib.compress.torch_ao import DynamicInt8, EagerInt8, _fusion_groups
from kd_lib.models.builders import build_model
from kd_lib.plugins import Registry

# The names steps, tests and the bench import from here; the schemes live in the modules above,
# the saved model directory's format in kd_lib.artifacts.model_dir.
__all__ = [
    "AUTO_ORDER",
    "QUANTIZERS",
    "SCHEMES",
    "CastModel",
    "DynamicInt8",
    "EagerInt8",
    "HalfPrecision",
    "Int8WeightLayer",
    "NoQuantization",
    "QuantizationError",
    "QuantizeContext",
    "Quantizer",
    "TorchaoLinear",
    "WeightOnlyInt8",
    "_fusion_groups",
    "_import_torchao",
    "backends",
    "fp32_layers",
    "get_quantizer",
    "int8_per_channel",
    "load_model",
    "quantize",
    "register",
    "save_model",
    "uncovered_layers",
]

# kd_lib.plugins.PROVIDERS names this registry by module path (config lists its names that way).
QUANTIZERS: Registry[Quantizer] = Registry("quantizer")
"""Scheme name -> its default backend (the one the benchmark chose)."""

_BACKENDS: dict[str, dict[str, Quantizer]] = {}


def register(quantizer: Quantizer, default: bool = False) -> Quantizer:
    """Register a backend of a scheme; ``default=True`` also makes it what the scheme name means."""
    per_scheme = _BACKENDS.setdefault(quantizer.name, {})
    if quantizer.backend in per_scheme:
        raise ValueError(f"backend {quantizer.backend!r} of scheme {quantizer.name!r} is already registered")
    per_scheme[quantizer.backend] = quantizer
    if default:
        QUANTIZERS.register(quantizer.name)(quantizer)
    return quantizer


def backends(scheme: str) -> list[str]:
    """Every registered backend of ``scheme``, the default first."""
    default = QUANTIZERS.get(scheme).backend
    return [default] + sorted(b for b in _BACKENDS[scheme] if b != default)


def get_quantizer(scheme: str, backend: str | None = None) -> Quantizer:
    """The implementation of ``scheme``: its default, or the named ``backend``.

    Raises:
        UnknownNameError: unknown scheme.
        QuantizationError: ``backend`` is not a backend of ``scheme``.
    """
    default = QUANTIZERS.get(scheme)
    if backend is None or backend == default.backend:
        return default
    try:
        return _BACKENDS[scheme][backend]
    except KeyError:
        raise QuantizationError(
            f"scheme {scheme!r} has no backend {backend!r}; available: {', '.join(backends(scheme))}"
        ) from None


def fp32_layers(model: nn.Module, scheme: str, backend: str | None = None) -> list[str]:
    """Which layers of ``model`` stay in fp32 under ``scheme`` (see ``uncovered_layers``)."""
    return uncovered_layers(model, get_quantizer(scheme, backend).covers)


register(NoQuantization(), default=True)
register(DynamicInt8(), default=True)
register(TorchaoLinear("dynamic_int8", "Int8DynamicActivationInt8WeightConfig"))
register(EagerInt8("static_int8", "x86", qat=False), default=True)
register(EagerInt8("static_int8", "onednn", qat=False))
register(EagerInt8("qat_int8", "x86", qat=True), default=True)
register(WeightOnlyInt8(), default=True)
register(TorchaoLinear("weight_only_int8", "Int8WeightOnlyConfig"))
register(HalfPrecision("fp16", torch.float16), default=True)
register(HalfPrecision("bf16", torch.bfloat16), default=True)

SCHEMES = ("none", "dynamic_int8", "static_int8", "weight_only_int8", "fp16", "bf16", "qat_int8")
# `auto` tries these in this order (smallest and fastest expected first; see the bench):
# static int8 quantizes every layer; QAT costs training but recovers what static loses; dynamic
# int8 leaves convolutions in fp32; weight-only is small but fp32-fast; bf16 and fp16 are 2x.
AUTO_ORDER = ("static_int8", "qat_int8", "dynamic_int8", "weight_only_int8", "bf16", "fp16")


def quantize(
    model: nn.Module,
    scheme: str,
    context: QuantizeContext | None = None,
    backend: str | None = None,
) -> nn.Module:
    """Quantize with a registered scheme.

    Args:
        model: fp32 module mapping ``[B, *input_shape]`` to ``[B, C]``; left untouched.
        scheme: A name in ``QUANTIZERS`` (see ``SCHEMES``).
        context: Calibration batches (static_int8), a fine-tuning function (qat_int8), and
            whether uncovered layers may stay fp32. Defaults to an empty context.
        backend: A backend of the scheme (``backends(scheme)``); None means the default.

    Returns:
        A new module in eval mode on CPU, same input and output shapes (float32 logits).

    Raises:
        UnknownNameError: unknown scheme.
        QuantizationError: the scheme does not apply to this model (a layer type it cannot
            quantize, no layer it can, missing calibration data or fine-tuning function).
    """
    return get_quantizer(scheme, backend).apply(model, context or QuantizeContext())


def save_model(model: nn.Module, spec: Mapping[str, Any] | ModelSpec, directory: str | Path) -> Path:
    """Write a model as ``weights.bin`` + ``spec.json``, loadable without pickle by ``load_model``.

    ``weights.bin`` is kdflow's weights file (``kd_lib.artifacts.weights_file``): the state dict's raw
    tensor bytes behind a JSON index; quantized tensors as their integers plus scales and zero
    points. The same format for every scheme, so artifact sizes compare like with like.

    Args:
        model: The (possibly quantized) module; its state dict is saved.
        spec: JSON-able description: ``arch``, ``params``, ``input_shape``, ``num_classes``,
            ``quantization`` (scheme name), optionally ``backend`` (default: the scheme's
            default), plus anything else the caller wants kept (e.g. normalization). Not
            modified; ``backend``, ``torch_version`` and ``versions`` are set in the written copy.
        directory: Created if missing.

    Returns:
        The directory.

    Raises:
        ValueError: a required spec key is missing, the spec is not JSON-able, the state
            dict holds something the weights file cannot store exactly (named), or the spec
            is an ONNX artifact's and the model is not an ``OrtModule``.
        UnknownNameError: ``spec["quantization"]`` is not a registered scheme.
        QuantizationError: ``spec["backend"]`` is not a backend of that scheme.
    """
    data = spec.to_dict() if isinstance(spec, ModelSpec) else dict(spec)
    model_dir.require_spec_keys(data)
    if model_dir.is_onnx(data):
        # An ONNX Runtime artifact loaded with load_model (an imported teacher, a champion):
        # written back as it came, its graph and spec (backend and versions) unchanged.
        # lazy: onnxruntime loads only for ONNX artifacts
        from kd_lib.compress.onnx_runtime import OrtModule

        if not isinstance(model, OrtModule):
            raise ValueError(
                f"spec says an ONNX artifact ({data.get('quantization')}) but the model is a {type(model)}"
            )
        return model_dir.write_onnx_model_dir(directory, data, model.model_bytes)
    quantizer = get_quantizer(data["quantization"], data.get("backend"))
    written = {
        **data,
        "input_shape": list(data["input_shape"]),
        "backend": quantizer.backend,
        "torch_version": torch.__version__,
        "versions": quantizer.versions(),
    }
    with quiet_torch_ao():  # packed int8 weights warn while their state dict is serialized
        return model_dir.write_model_dir(directory, written, model.state_dict())


def load_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model written by ``save_model`` (or an ONNX artifact); never unpickles code.

    Args:
        directory: Holds ``spec.json`` and ``weights.bin`` (or, written by an older kdflow,
            ``weights.pt``, read with ``torch.load(weights_only=True)``), or, for an ONNX
            Runtime artifact (spec ``format: onnx`` / ``backend: onnxruntime``), ``model.onnx``.

    Returns:
        ``(model, spec)``: the module in eval mode on CPU, mapping ``[B, *input_shape]`` to
        ``[B, num_classes]``, and the spec as written. An ONNX artifact comes back as an
        ``onnx_runtime.OrtModule``, which takes RAW inputs (its spec's ``normalization`` is the
        identity; ``folded_normalization`` is what it applies itself).

    Raises:
        ArtifactError: a file is missing or corrupt, the weights do not fit the spec, or the
            spec names a scheme/backend this kdflow does not have; the message names the file.
    """
    spec = model_dir.read_spec(directory)
    if model_dir.is_onnx(spec):
        # lazy: onnx and onnxruntime load only when an ONNX artifact is read
        from kd_lib.compress.onnx_runtime import load_onnx_model

        return load_onnx_model(directory)
    spec_path = Path(directory) / SPEC_FILE
    weights_path = model_dir.weights_path(directory)
    try:
        quantizer = get_quantizer(spec.quantization, spec.backend)
    except ValueError as err:  # UnknownNameError and QuantizationError are both ValueErrors
        raise ArtifactError(f"{spec_path}: {err}") from None

    model = build_model(spec.arch, spec.params, tuple(spec.input_shape), spec.num_classes)
    model = quantizer.prepare_for_load(model)
    with quiet_torch_ao():
        state = model_dir.read_weights(weights_path, template=model.state_dict())
        # Quantized modules repack their int8 weights while loading, for the engine current at
        # that moment: it must be the one that produced them, or an onednn model comes back
        # packed for x86 and its logits differ (by 0.02 on the test CNN).
        engine = getattr(quantizer, "engine", None)
        try:
            with quantized_engine(engine) if engine else contextlib.nullcontext():
                # assign=True: torchao's int8 tensor subclasses cannot be copied into the freshly
                # quantized parameters, only put in their place; for plain tensors it is the same.
                model.load_state_dict(state, strict=True, assign=True)
        except (RuntimeError, TypeError, AttributeError, ValueError) as err:
            raise ArtifactError(f"{weights_path}: does not match the architecture in {spec_path} ({err})") from None
    return model.eval(), spec.to_dict()
