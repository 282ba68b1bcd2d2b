"""The quantization backends that need no ``torch.ao`` quantized modules.

- ``none``: fp32, the baseline;
- ``fp16`` / ``bf16``: the whole model cast to half precision;
- ``weight_only_int8``: int8 weights per output channel, dequantized once to fp32;
- the torchao backends of ``dynamic_int8`` and ``weight_only_int8`` (optional, selectable
  with ``quantize.backend``; torchao is imported only when one is used).

The ``torch.ao`` ones (``dynamic_int8``, ``static_int8``, ``qat_int8``) are in
``kd_lib.compress.torch_ao``. Each class docstring gives the measurements behind its choice.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any, cast

import torch
from torch import Tensor, nn

from kd_lib.compress.base import (
    WEIGHT_LAYERS,
    QuantizationError,
    QuantizeContext,
    check_coverage,
    torch_versions,
)

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
        return torch_versions()


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
        return torch_versions()


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

    weight_int8: Tensor
    weight_scale: Tensor

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        q, scale = int8_per_channel(cast(Tensor, layer.weight))
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
    covers: tuple[type[nn.Module], ...] = WEIGHT_LAYERS

    def apply(self, model: nn.Module, context: QuantizeContext) -> nn.Module:
        check_coverage(self, model, context)
        return self.prepare_for_load(copy.deepcopy(model))

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        model = model.cpu().eval()
        if isinstance(model, WEIGHT_LAYERS):
            return Int8WeightLayer(model).eval()
        _replace_layers(model, WEIGHT_LAYERS, Int8WeightLayer)
        return model.eval()

    def versions(self) -> dict[str, str]:
        return torch_versions()


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
            import torchao.quantization as tao  # lazy: optional, slow to import, only for its backends
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
        check_coverage(self, model, context)
        return self._quantize(copy.deepcopy(model).cpu().eval())

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        return self._quantize(model.cpu().eval())

    def versions(self) -> dict[str, str]:
        try:
            return torch_versions(torchao=metadata.version("torchao"))
        except metadata.PackageNotFoundError:
            return torch_versions(torchao="not installed")
