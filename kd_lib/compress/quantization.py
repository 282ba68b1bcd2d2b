"""Quantization schemes behind one interface, several backends per scheme, pickle-free save/load.

A *scheme* is what a config asks for (``quantize.scheme: static_int8``); a *backend* is the
implementation that produces it (torch.ao eager mode with the x86 engine, torchao, ...).
PyTorch's quantization APIs are in flux (torch.ao is deprecated, PT2E moved to torchao,
torchao's int8 kernels need ``torch.compile`` on CPU), so every implementation is one more
registered ``Quantizer`` and the default backend of each scheme is chosen by measurement
(``bench/quantization.py``; the numbers behind each choice are in the class docstrings).

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

A saved model is a directory with ``weights.bin`` (the state dict in kdflow's pickle-free
format: raw tensor bytes plus a JSON index, int8 weights as their integers with per-channel
scales; see ``kd_lib.artifacts.weights_file``) and ``spec.json`` (architecture, params, input shape,
classes, scheme, backend and library versions). Every scheme, fp32 included, uses the same
format, so size ratios compare like with like. Loading rebuilds the fp32 architecture from the
spec, turns it into the quantized structure with the recorded backend's ``prepare_for_load``,
then loads the weights: no pickled code, and the same predictions as before saving. Artifacts
from before this format (``weights.pt``, ``torch.save``) still load, with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from kd_lib.artifacts import weights_file
from kd_lib.artifacts.weights_file import ArtifactError
from kd_lib.errors import KdflowError
from kd_lib.models.builders import build_model
from kd_lib.plugins import Registry

WEIGHTS_FILE = "weights.bin"
# Written by kdflow before weights.bin (torch.save of the state dict); still read, never written.
LEGACY_WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "spec.json"
REQUIRED_SPEC_KEYS = ("arch", "params", "input_shape", "num_classes", "quantization")

# Layer types that hold the weights quantization is about. Any other module with parameters
# of its own (BatchNorm left unfused, LayerNorm, Embedding, ...) is "a layer the scheme may
# not cover", checked per scheme.
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_WEIGHT_LAYERS = (nn.Linear, *_CONV)


class QuantizationError(KdflowError, ValueError):
    """A scheme cannot be applied to this model (a layer type it does not cover, missing
    calibration data, ...); the message names the scheme, the backend and what to do."""


@dataclass
class QuantizeContext:
    """What some schemes need beyond the model.

    Attributes:
        calibration: Batches ``[B, *input_shape]`` float32 run through the model to calibrate
            activation scales (``static_int8``); a few training batches.
        finetune: Trains a fake-quantized model in place (``qat_int8``); the quantize step
            builds it from the teacher's logits and the KD loss.
        allow_fp32_layers: When a layer type is not covered by the scheme, keep it in fp32
            with a warning (True) or raise QuantizationError (False).
    """

    calibration: Sequence[Tensor] = ()
    finetune: Callable[[nn.Module], None] | None = None
    allow_fp32_layers: bool = True


class Quantizer(Protocol):
    """The interface every (scheme, backend) implementation follows."""

    name: str  # the scheme
    backend: str  # the implementation, recorded in the spec
    covers: tuple[type[nn.Module], ...]  # layer types it quantizes

    def apply(self, model: nn.Module, context: QuantizeContext) -> nn.Module:
        """Return a NEW quantized module in eval mode on CPU; ``model`` is left untouched."""
        ...

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        """Turn a freshly built fp32 architecture into the structure ``apply`` produces,
        so that ``load_state_dict`` of a saved quantized state dict fits it exactly."""
        ...

    def versions(self) -> dict[str, str]:
        """Versions of the libraries that produced (and are needed to load) the artifact."""
        ...


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


@contextlib.contextmanager
def _quiet_torch_ao() -> Iterator[None]:
    # torch.ao.quantization is deprecated in torch 2.13 (its successor is torchao) and warns on
    # every call. We chose it by measurement (see DESIGN.md), so silence only those warnings,
    # only here, and leave every other warning visible.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated", category=UserWarning)
        # Serializing the packed int8 weights goes through TypedStorage, which also warns.
        warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated", category=UserWarning)
        # prepare_for_load converts without calibrating: the observers' scales are overwritten
        # by load_state_dict right after, so their "run the observer first" warning is moot.
        warnings.filterwarnings("ignore", message=r"must run observer before calling calculate_qparams")
        warnings.filterwarnings("ignore", message=r"Please use quant_min and quant_max", category=UserWarning)
        yield


@contextlib.contextmanager
def _engine(name: str) -> Iterator[None]:
    # The quantized engine decides how int8 weights are packed (fbgemm, oneDNN, x86 = both).
    # It is process-global, so set it only while packing and put the caller's back.
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous


def _own_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def uncovered_layers(model: nn.Module, covers: tuple[type[nn.Module], ...]) -> list[str]:
    """Layers with weights of their own that a scheme covering ``covers`` leaves in float.

    Args:
        model: The fp32 module.
        covers: Layer types the scheme quantizes.

    Returns:
        ``"name (Type)"`` per uncovered layer, in module order; ``[]`` when all are covered.
    """
    return [
        f"{name or '<root>'} ({type(m).__name__})"
        for name, m in model.named_modules()
        if _own_parameters(m) and not isinstance(m, covers)
    ]


def fp32_layers(model: nn.Module, scheme: str, backend: str | None = None) -> list[str]:
    """Which layers of ``model`` stay in fp32 under ``scheme`` (see ``uncovered_layers``)."""
    return uncovered_layers(model, get_quantizer(scheme, backend).covers)


def _check_coverage(quantizer: Quantizer, model: nn.Module, context: QuantizeContext) -> None:
    covered_names = "/".join(f"nn.{t.__name__}" for t in quantizer.covers)
    if not any(isinstance(m, quantizer.covers) for m in model.modules()):
        raise QuantizationError(
            f"quantization scheme {quantizer.name!r} applies to {covered_names} layers only and this "
            f"{type(model).__name__} has none; choose scheme 'none', 'fp16' or 'bf16', or add such layers"
        )
    left = uncovered_layers(model, quantizer.covers)
    if not left:
        return
    types = sorted({entry.rsplit("(", 1)[1].rstrip(")") for entry in left})
    message = (
        f"quantization scheme {quantizer.name!r} (backend {quantizer.backend}) quantizes {covered_names} "
        f"layers only; {', '.join(types)} layer(s) {', '.join(left)} "
    )
    if not context.allow_fp32_layers:
        raise QuantizationError(
            message + "cannot be quantized by it. Set quantize.allow_fp32_layers: true to keep them in fp32, "
            "or choose a scheme that covers them (static_int8 covers Conv and Linear)."
        )
    warnings.warn(message + "stay in fp32 (recorded as fp32_layers in the model's spec)", stacklevel=3)


def _torch_versions(**extra: str) -> dict[str, str]:
    return {"torch": torch.__version__, **extra}


# --------------------------------------------------------------------------------------------
# none, fp16, bf16


class NoQuantization:
    """Keeps the model in fp32: the baseline every other scheme is measured against."""

    name = "none"
    backend = "none"
    covers: tuple[type[nn.Module], ...] = (nn.Module,)

    def apply(self, model: nn.Module, context: QuantizeContext) -> nn.Module:
        return copy.deepcopy(model).cpu().eval()

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        return model.cpu().eval()

    def versions(self) -> dict[str, str]:
        return _torch_versions()


class CastModel(nn.Module):
    """Runs ``module`` in ``dtype``: casts the input to it and the logits back to float32.

    Callers keep feeding float32 and reading float32, so the pyfunc and the evaluation code
    need not know the model is half precision.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.module = module.to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x.to(self.dtype)).float()


class HalfPrecision:
    """``fp16`` / ``bf16``: every parameter and buffer cast to a 16-bit float (2x smaller).

    Every layer type is covered. On a CPU with AVX512-BF16 + AMX bf16 matmuls are fast: the
    wide MLP at batch 64 ran 0.71 ms vs 2.29 ms fp32 (1 thread), while fp16 ran at fp32 speed
    (2.13 ms); convolutions gain nothing (CNN student bf16 2.14 ms, fp16 2.97, fp32 2.12). On an
    AVX2-only CPU both are emulated and 6-12x slower than fp32 at batch 64: size only.
    """

    covers: tuple[type[nn.Module], ...] = (nn.Module,)

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self.dtype = dtype
        self.backend = f"torch.cast[{str(dtype).removeprefix('torch.')}]"

    def apply(self, model: nn.Module, context: QuantizeContext) -> nn.Module:
        return CastModel(copy.deepcopy(model).cpu(), self.dtype).eval()

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        return CastModel(model.cpu(), self.dtype).eval()

    def versions(self) -> dict[str, str]:
        return _torch_versions()


# --------------------------------------------------------------------------------------------
# dynamic_int8


class DynamicInt8:
    """Dynamic int8 quantization of ``nn.Linear`` layers with ``torch.ao``.

    Weights are stored as int8 (about 4x smaller); activations are quantized on the fly per
    batch, so no calibration data is needed. Convolutions are not covered (they stay fp32 and
    are reported). Chosen over torchao's Int8DynamicActivationInt8Weight by bench/quantization.py
    (mnist5k, 1 thread, batch-64 p50): wide MLP torch.ao 0.65 ms, torchao eager 1.3-3.1 ms,
    torchao + torch.compile 0.5-1.5 ms (and a compile in every serving process), fp32 2.3 ms;
    MLP student 0.074 ms vs torchao 0.38 ms (fp32 0.089).
    """

    name = "dynamic_int8"
    backend = "torch.ao.quantization.quantize_dynamic"
    covers: tuple[type[nn.Module], ...] = (nn.Linear,)
    engine = "x86"

    def _quantize(self, model: nn.Module) -> nn.Module:
        from torch.ao.quantization import quantize_dynamic

        with _quiet_torch_ao(), _engine(self.engine):
            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)

    def apply(self, model: nn.Module, context: QuantizeContext) -> nn.Module:
        _check_coverage(self, model, context)
        # Copy first: quantize_dynamic(inplace=False) would still need the model on CPU, and
        # moving the caller's model there would be a side effect.
        return self._quantize(copy.deepcopy(model).cpu().eval()).eval()

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        # The int8 structure (packed-params modules) only depends on which layers are Linear,
        # so quantizing the random fresh weights gives the right shape; load_state_dict then
        # overwrites every packed weight, scale and zero point.
        return self._quantize(model.cpu().eval()).eval()

    def versions(self) -> dict[str, str]:
        return _torch_versions(quantized_engine=self.engine)


# --------------------------------------------------------------------------------------------
# static_int8 and qat_int8 (torch.ao eager mode)


def _fusion_groups(model: nn.Module) -> list[list[str]]:
    """Names of consecutive ``Conv -> BatchNorm (-> ReLU)``, ``Conv -> ReLU`` and
    ``Linear -> ReLU`` children of every nn.Sequential in ``model``, for ``fuse_modules``."""
    groups: list[list[str]] = []
    for prefix, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        children = [parent._modules[n] for n in names]
        i = 0
        while i < len(children):
            size = 1
            nxt = children[i + 1] if i + 1 < len(children) else None
            after = children[i + 2] if i + 2 < len(children) else None
            if isinstance(children[i], _CONV) and isinstance(nxt, _BATCHNORM):
                size = 3 if isinstance(after, nn.ReLU) else 2
            elif isinstance(children[i], _WEIGHT_LAYERS) and isinstance(nxt, nn.ReLU):
                size = 2
            if size > 1:
                groups.append([f"{prefix}.{n}" if prefix else n for n in names[i : i + size]])
            i += size
    return groups


class EagerInt8:
    """int8 weights (per output channel) and activations with ``torch.ao`` eager mode.

    The model is fused (Conv + BatchNorm + ReLU, Linear + ReLU), wrapped in a
    ``QuantWrapper`` (quantize the input, dequantize the logits) and converted to quantized
    modules; everything between runs on int8 tensors. Static: observers calibrate activation
    scales on training batches. QAT: fake-quantized fine-tuning first (``context.finetune``).

    Backend choice (bench/quantization.py, mnist5k, 1 thread, batch-64 p50): the "x86" engine
    ran the wide MLP in 0.56 ms, the CNN student in 1.20 ms and the CNN teacher in 1.62 ms; the
    "onednn" engine 0.57, 1.22 and 1.67 ms (fp32: 2.29, 2.12, 4.38 ms); at batch 1 they tie.
    PT2E with the x86 inductor quantizer reached 0.44 ms on the wide MLP only under
    torch.compile with freezing (a compile in every serving process), failed to compile both
    CNNs, and its converted program keeps fp32 weights (12 MB vs 2.4 MB). So: eager torch.ao,
    x86 engine by default, onednn selectable.

    Those numbers came from an AVX512-VNNI/AMX CPU. On an AVX2-only CPU (2-core EPYC, no VNNI;
    ``bench/quantization.py --profile``) the picture splits: the x86 engine stays best for
    Linear layers (wide MLP batch 64: 1.9x fp32, onednn 1.5x) but its int8 convolutions are
    slower than fp32 (CNN student batch 64: quantized conv 7.9 vs fp32 1.7 ms per pass, most of
    it the 1-channel input conv), while onednn's are faster (1.0 ms: the CNN runs about 2x fp32
    at batch 64). At batch 1 every int8 CNN is slower than fp32 there (x86 0.28 vs 0.14 ms):
    the int8 conv kernels cost twice the fp32 ones, and quantize/dequantize is only ~3-7%.
    For a CNN served in batches on such a CPU, choose ``quantize.backend`` onednn.
    """

    # BatchNorm counts as covered: it is folded into the Conv before it (a BatchNorm anywhere
    # else is refused by _prepared, after fusion).
    covers: tuple[type[nn.Module], ...] = (*_WEIGHT_LAYERS, *_BATCHNORM)

    def __init__(self, name: str, engine: str, qat: bool) -> None:
        self.name = name
        self.engine = engine
        self.qat = qat
        self.backend = f"torch.ao.quantization.eager{'_qat' if qat else ''}[{engine}]"

    def _prepared(self, model: nn.Module, train: bool) -> nn.Module:
        from torch.ao import quantization as tq

        model = model.cpu().train(train)
        groups = _fusion_groups(model)
        if groups:
            (tq.fuse_modules_qat if train else tq.fuse_modules)(model, groups, inplace=True)
        # BatchNorm that did not follow a Conv (fused away above) would receive int8 tensors.
        self._refuse_uncovered(model, _WEIGHT_LAYERS)
        wrapper = tq.QuantWrapper(model)
        # The observers of the x86 engine for every engine: activations in 7 bits
        # (reduce_range), weights per-channel symmetric int8. onednn's own default uses all 8
        # activation bits, which its u8*s8 kernels saturate on CPUs without VNNI (this AVX2
        # machine: logits off by 0.048 on the test MLP, vs 0.007), so the same artifact would
        # give different numbers on different CPUs. The engine still picks the kernels.
        if train:
            wrapper.qconfig = tq.get_default_qat_qconfig("x86")
            tq.prepare_qat(wrapper, inplace=True)
        else:
            wrapper.qconfig = tq.get_default_qconfig("x86")
            tq.prepare(wrapper, inplace=True)
        return wrapper

    def _refuse_uncovered(self, model: nn.Module, covers: tuple[type[nn.Module], ...]) -> None:
        # Everything between QuantStub and DeQuantStub runs on int8 tensors, so a layer this
        # backend cannot convert cannot stay fp32 either: always an error, never a warning.
        left = uncovered_layers(model, covers)
        if left:
            raise QuantizationError(
                f"quantization scheme {self.name!r} (backend {self.backend}) quantizes every layer and "
                f"cannot quantize {', '.join(left)}: only Linear and Conv layers (with a BatchNorm/ReLU "
                "right after them) are supported; choose dynamic_int8, weight_only_int8, fp16 or bf16"
            )

    def apply(self, model: nn.Module, context: QuantizeContext) -> nn.Module:
        from torch.ao import quantization as tq

        self._refuse_uncovered(model, self.covers)
        if not context.calibration and not self.qat:
            raise QuantizationError(
                f"quantization scheme {self.name!r} needs calibration batches (the quantize step passes "
                "quantize.calibration_batches training batches); pass QuantizeContext(calibration=[...])"
            )
        if self.qat and context.finetune is None:
            raise QuantizationError(
                f"quantization scheme {self.name!r} needs a fine-tuning function (the quantize step builds "
                "one from the teacher's logits and the KD loss); pass QuantizeContext(finetune=...)"
            )
        with _quiet_torch_ao(), _engine(self.engine):
            prepared = self._prepared(copy.deepcopy(model), train=self.qat)
            if self.qat:
                assert context.finetune is not None
                context.finetune(prepared)
            prepared = prepared.cpu().eval()
            with torch.no_grad():
                for batch in context.calibration:
                    prepared(batch)
            quantized = tq.convert(prepared.cpu(), inplace=True).eval()
            probe = context.calibration[0][:2] if context.calibration else None
            if probe is not None:
                try:
                    with torch.no_grad():
                        quantized(probe)
                except (RuntimeError, NotImplementedError) as err:
                    raise QuantizationError(
                        f"quantization scheme {self.name!r} (backend {self.backend}) produced a model that "
                        f"cannot run: {str(err).splitlines()[0]}. Eager-mode int8 needs a model built from "
                        "modules (nn.Sequential-like); use dynamic_int8 or weight_only_int8 instead"
                    ) from None
        return quantized

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        from torch.ao import quantization as tq

        # The same fuse/wrap/convert, uncalibrated: the structure (and the packed weight
        # layout of the engine) is what matters; load_state_dict fills weights and scales.
        with _quiet_torch_ao(), _engine(self.engine):
            return tq.convert(self._prepared(model, train=False).eval(), inplace=True).eval()

    def versions(self) -> dict[str, str]:
        return _torch_versions(quantized_engine=self.engine)


# --------------------------------------------------------------------------------------------
# weight_only_int8


def int8_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization with one scale per output channel (dim 0).

    Args:
        weight: ``[out, ...]`` float weights.

    Returns:
        ``(q, scale)``: ``q`` int8 of ``weight``'s shape in [-127, 127] and ``scale``
        ``[out]`` float32 with ``weight ~= q * scale`` (error at most ``scale / 2``).
    """
    w = weight.detach().float()
    max_abs = w.abs().reshape(len(w), -1).amax(dim=1)
    scale = (max_abs / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w / scale.view(shape)).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8WeightLayer(nn.Module):
    """A Linear/Conv layer whose weight is kept as int8 + per-channel scales in the state dict.

    The fp32 weight used for compute is rebuilt once from them (at creation and after every
    ``load_state_dict``) and is not itself saved, so the artifact holds 1 byte per weight.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        q, scale = int8_per_channel(layer.weight)
        del layer.weight  # drop the fp32 Parameter; a plain tensor attribute replaces it below
        self.layer = layer
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self._dequantize()
        self.register_load_state_dict_post_hook(lambda module, _keys: module._dequantize())

    def _dequantize(self) -> None:
        shape = (-1,) + (1,) * (self.weight_int8.dim() - 1)
        # A plain attribute, not a buffer or parameter: it is derived data and stays out of
        # state_dict (and out of .parameters(), so nothing trains it).
        self.layer.weight = self.weight_int8.float() * self.weight_scale.view(shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


def _replace_layers(
    model: nn.Module, types: tuple[type[nn.Module], ...], make: Callable[[nn.Module], nn.Module]
) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, types):
            setattr(model, name, make(child))
        else:
            _replace_layers(child, types, make)


class WeightOnlyInt8:
    """int8 weights per output channel for Linear and Conv layers, dequantized once to fp32.

    The artifact is about 4x smaller; compute runs at fp32 speed with the dequantized weights
    (memory at run time is fp32). Chosen over torchao's Int8WeightOnlyConfig, which keeps int8
    in memory but covers Linear only and ran slower than fp32 here (bench, wide MLP, batch-64
    p50, 1 thread): this backend 2.0 ms (= fp32), torchao eager 2.6 ms, torchao + compile 2.7 ms.
    """

    name = "weight_only_int8"
    backend = "kdflow.int8_weight_dequant"
    covers: tuple[type[nn.Module], ...] = _WEIGHT_LAYERS

    def apply(self, model: nn.Module, context: QuantizeContext) -> nn.Module:
        _check_coverage(self, model, context)
        return self.prepare_for_load(copy.deepcopy(model))

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        model = model.cpu().eval()
        if isinstance(model, _WEIGHT_LAYERS):
            return Int8WeightLayer(model).eval()
        _replace_layers(model, _WEIGHT_LAYERS, Int8WeightLayer)
        return model.eval()

    def versions(self) -> dict[str, str]:
        return _torch_versions()


# --------------------------------------------------------------------------------------------
# torchao (alternative backends, selectable with quantize.backend; measured in the benchmark)


def _import_torchao() -> Any:
    # torchao logs a warning per CUDA kernel library it cannot load on a CPU-only torch;
    # nothing here uses them.
    log = logging.getLogger("torchao")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import torchao.quantization as tao
    except ImportError:
        raise QuantizationError(
            "the torchao backends need torchao: pip install 'kdflow[torchao]' (torchao 0.18 fits torch 2.13)"
        ) from None
    finally:
        log.setLevel(level)
    return tao


class TorchaoLinear:
    """torchao's ``quantize_`` on nn.Linear layers (int8 tensor subclasses, weights_only-safe).

    Run it under ``torch.compile`` for speed; in eager mode on this CPU it is slower than
    torch.ao (see DynamicInt8 and WeightOnlyInt8).
    """

    covers: tuple[type[nn.Module], ...] = (nn.Linear,)

    def __init__(self, name: str, config: str) -> None:
        self.name = name
        self.config = config
        self.backend = f"torchao.{config}"

    def _quantize(self, model: nn.Module) -> nn.Module:
        tao = _import_torchao()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tao.quantize_(model, getattr(tao, self.config)())
        return model.eval()

    def apply(self, model: nn.Module, context: QuantizeContext) -> nn.Module:
        _check_coverage(self, model, context)
        return self._quantize(copy.deepcopy(model).cpu().eval())

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        return self._quantize(model.cpu().eval())

    def versions(self) -> dict[str, str]:
        try:
            return _torch_versions(torchao=metadata.version("torchao"))
        except metadata.PackageNotFoundError:
            return _torch_versions(torchao="not installed")


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


def save_model(model: nn.Module, spec: dict[str, Any], directory: str | Path) -> Path:
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
        ValueError: a required spec key is missing, the spec is not JSON-able, or the state
            dict holds something the weights file cannot store exactly (named).
        UnknownNameError: ``spec["quantization"]`` is not a registered scheme.
        QuantizationError: ``spec["backend"]`` is not a backend of that scheme.
    """
    missing = [k for k in REQUIRED_SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(f"model spec is missing {', '.join(missing)}; required keys: {', '.join(REQUIRED_SPEC_KEYS)}")
    quantizer = get_quantizer(spec["quantization"], spec.get("backend"))
    written = {
        **spec,
        "input_shape": list(spec["input_shape"]),
        "backend": quantizer.backend,
        "torch_version": torch.__version__,
        "versions": quantizer.versions(),
    }
    try:
        spec_text = json.dumps(written, indent=2, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"model spec is not JSON-serializable: {err}") from None
    with _quiet_torch_ao():
        blob = weights_file.encode_state_dict(model.state_dict())  # before touching the directory
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS_FILE).write_bytes(blob)
    # A directory rewritten in place must not keep an older format's weights next to the new ones.
    (out / LEGACY_WEIGHTS_FILE).unlink(missing_ok=True)
    (out / SPEC_FILE).write_text(spec_text + "\n")
    return out


def load_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model written by ``save_model``; never unpickles code.

    Args:
        directory: Holds ``spec.json`` and ``weights.bin`` (or, written by an older kdflow,
            ``weights.pt``, read with ``torch.load(weights_only=True)``).

    Returns:
        ``(model, spec)``: the module in eval mode on CPU, mapping ``[B, *input_shape]`` to
        ``[B, num_classes]``, and the spec as written.

    Raises:
        ArtifactError: a file is missing or corrupt, the weights do not fit the spec, or the
            spec names a scheme/backend this kdflow does not have; the message names the file.
    """
    root = Path(directory)
    spec_path, weights_path = root / SPEC_FILE, root / WEIGHTS_FILE
    try:
        spec = json.loads(spec_path.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"{spec_path}: missing; a saved model directory holds {SPEC_FILE} and {WEIGHTS_FILE}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{spec_path}: unreadable or not JSON ({err})") from None
    if not isinstance(spec, dict):
        raise ArtifactError(f"{spec_path}: must hold a JSON object")
    missing = [k for k in REQUIRED_SPEC_KEYS if k not in spec]
    if missing:
        raise ArtifactError(f"{spec_path}: missing key(s) {', '.join(missing)}")
    legacy_path = root / LEGACY_WEIGHTS_FILE
    if weights_path.is_file() and legacy_path.is_file():
        raise ArtifactError(
            f"{root}: holds both {WEIGHTS_FILE} and {LEGACY_WEIGHTS_FILE}; one is stale. Save the model again "
            f"(save_model writes {WEIGHTS_FILE} and removes {LEGACY_WEIGHTS_FILE}) or delete the stale file"
        )
    if not weights_path.is_file() and not legacy_path.is_file():
        raise ArtifactError(f"{weights_path}: missing; a saved model directory holds {SPEC_FILE} and {WEIGHTS_FILE}")
    try:
        quantizer = get_quantizer(spec["quantization"], spec.get("backend"))
    except ValueError as err:  # UnknownNameError and QuantizationError are both ValueErrors
        raise ArtifactError(f"{spec_path}: {err}") from None

    model = build_model(spec["arch"], spec["params"], tuple(spec["input_shape"]), spec["num_classes"])
    model = quantizer.prepare_for_load(model)
    with _quiet_torch_ao():
        if weights_path.is_file():
            # The template gives torchao tensor subclasses their class and attributes: the file
            # supplies only tensor bytes, never which code to run.
            state = weights_file.read_state_dict(weights_path, template=model.state_dict())
        else:
            weights_path = legacy_path
            try:
                state = torch.load(weights_path, weights_only=True, map_location="cpu")
            except Exception as err:  # torch raises several types for a bad file; all mean "corrupt"
                raise ArtifactError(f"{weights_path}: not a loadable weights-only state dict ({err})") from None
        # Quantized modules repack their int8 weights while loading, for the engine current at
        # that moment: it must be the one that produced them, or an onednn model comes back
        # packed for x86 and its logits differ (by 0.02 on the test CNN).
        engine = getattr(quantizer, "engine", None)
        try:
            with _engine(engine) if engine else contextlib.nullcontext():
                # assign=True: torchao's int8 tensor subclasses cannot be copied into the freshly
                # quantized parameters, only put in their place; for plain tensors it is the same.
                model.load_state_dict(state, strict=True, assign=True)
        except (RuntimeError, TypeError, AttributeError, ValueError) as err:
            raise ArtifactError(f"{weights_path}: does not match the architecture in {spec_path} ({err})") from None
    return model.eval(), spec
