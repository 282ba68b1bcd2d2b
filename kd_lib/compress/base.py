"""The interface every quantization backend implements, and what the backends share.

A ``Quantizer`` is one (scheme, backend) pair: ``apply`` quantizes a model, ``prepare_for_load``
rebuilds the quantized structure from a fresh fp32 architecture so a saved state dict fits
it, ``versions`` names the libraries the artifact needs. The backends are in
``kd_lib.compress.schemes`` and ``kd_lib.compress.torch_ao``; the registry, ``quantize`` and
save/load are in ``kd_lib.compress.quantization``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from kd_lib.errors import KdflowError

# Layer types that hold the weights quantization is about. Any other module with parameters
# of its own (BatchNorm left unfused, LayerNorm, Embedding, ...) is "a layer the scheme may
# not cover", checked per scheme.
CONV_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_LAYERS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
WEIGHT_LAYERS = (nn.Linear, *CONV_LAYERS)


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


@contextlib.contextmanager
def quiet_torch_ao() -> Iterator[None]:
    """Silence torch.ao's deprecation and calibration warnings (only those) inside the block."""
    # torch.ao.quantization is deprecated in torch 2.13 (its successor is torchao) and warns on
    # every call. We chose it by measurement (`make bench`, bench/quantization.py), so silence
    # only those warnings, only here, and leave every other warning visible.
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
def quantized_engine(name: str) -> Iterator[None]:
    """Make ``name`` (``x86``, ``onednn``, ...) torch's quantized engine inside the block."""
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


def check_coverage(quantizer: Quantizer, model: nn.Module, context: QuantizeContext) -> None:
    """Refuse a model with no layer ``quantizer`` covers; warn about (or, when
    ``context.allow_fp32_layers`` is False, refuse) layers it leaves in fp32.

    The warning points at the caller of ``quantize`` (``apply`` -> here is two frames below it).

    Raises:
        QuantizationError: naming the scheme, the backend, the layers and what to do.
    """
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


def torch_versions(**extra: str) -> dict[str, str]:
    """``{"torch": <version>}`` plus ``extra``: what a backend records as ``versions`` in the spec."""
    return {"torch": torch.__version__, **extra}
