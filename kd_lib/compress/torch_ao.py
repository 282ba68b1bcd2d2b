"""The ``torch.ao`` eager-mode backends: ``dynamic_int8``, ``static_int8`` and ``qat_int8``.

torch.ao.quantization is deprecated in favour of torchao but measured best on CPU for these
schemes (the class docstrings give the numbers); its deprecation warnings are silenced here
only (``quiet_torch_ao``). int8 weights are packed for the quantized engine current at the
time, so every packing and loading runs under the backend's engine (``quantized_engine``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.ao import quantization as tq

from kd_lib.compress.base import (
    BATCHNORM_LAYERS,
    CONV_LAYERS,
    WEIGHT_LAYERS,
    QuantizationError,
    QuantizeContext,
    check_coverage,
    quantized_engine,
    quiet_torch_ao,
    torch_versions,
    uncovered_layers,
)

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
        with quiet_torch_ao(), quantized_engine(self.engine):
            return tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)

    def apply(self, model: nn.Module, context: QuantizeContext) -> nn.Module:
        check_coverage(self, model, context)
        # Copy first: quantize_dynamic(inplace=False) would still need the model on CPU, and
        # moving the caller's model there would be a side effect.
        return self._quantize(copy.deepcopy(model).cpu().eval()).eval()

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        # The int8 structure (packed-params modules) only depends on which layers are Linear,
        # so quantizing the random fresh weights gives the right shape; load_state_dict then
        # overwrites every packed weight, scale and zero point.
        return self._quantize(model.cpu().eval()).eval()

    def versions(self) -> dict[str, str]:
        return torch_versions(quantized_engine=self.engine)


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
            if isinstance(children[i], CONV_LAYERS) and isinstance(nxt, BATCHNORM_LAYERS):
                size = 3 if isinstance(after, nn.ReLU) else 2
            elif isinstance(children[i], WEIGHT_LAYERS) and isinstance(nxt, nn.ReLU):
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
    covers: tuple[type[nn.Module], ...] = (*WEIGHT_LAYERS, *BATCHNORM_LAYERS)

    def __init__(self, name: str, engine: str, qat: bool) -> None:
        self.name = name
        self.engine = engine
        self.qat = qat
        self.backend = f"torch.ao.quantization.eager{'_qat' if qat else ''}[{engine}]"

    def _prepared(self, model: nn.Module, train: bool) -> nn.Module:
        model = model.cpu().train(train)
        groups = _fusion_groups(model)
        if groups:
            (tq.fuse_modules_qat if train else tq.fuse_modules)(model, groups, inplace=True)
        # BatchNorm that did not follow a Conv (fused away above) would receive int8 tensors.
        self._refuse_uncovered(model, WEIGHT_LAYERS)
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
        with quiet_torch_ao(), quantized_engine(self.engine):
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
        # The same fuse/wrap/convert, uncalibrated: the structure (and the packed weight
        # layout of the engine) is what matters; load_state_dict fills weights and scales.
        with quiet_torch_ao(), quantized_engine(self.engine):
            return tq.convert(self._prepared(model, train=False).eval(), inplace=True).eval()

    def versions(self) -> dict[str, str]:
        return torch_versions(quantized_engine=self.engine)
