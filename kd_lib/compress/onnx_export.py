"""The older ONNX export API (``quantize.export_onnx``), kept as a thin layer over ``onnx_runtime``.

torch.ao's quantized modules do not export to ONNX (the dynamo exporter has no quantized
kernels), so the quantized ONNX file is made the way ONNX users make one: ONNX Runtime's own
quantizer applied to the fp32 export, with the same recipe as the torch scheme (dynamic int8
weights; or static int8 QDQ with per-channel weights, calibrated on the same batches).
Schemes without such a counterpart (weight_only_int8, fp16, bf16, qat_int8, whose QAT weights
only exist as torch.ao modules) export the fp32 model only and say why.

These files take the inputs the torch model takes (normalized; nothing folded in). The ONNX
Runtime deployment artifacts, which take raw inputs, are ``kd_lib.compress.onnx_runtime``'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn

from kd_lib.compress import onnx_runtime

# The torch schemes with an ONNX Runtime counterpart (or none: the fp32 export is the model).
ONNX_SCHEMES = ("none", "dynamic_int8", "static_int8")
_COUNTERPART = {"dynamic_int8": "onnx_dynamic_int8", "static_int8": "onnx_static_int8"}
_HOW = {
    "dynamic_int8": "onnxruntime quantize_dynamic, int8 weights",
    "static_int8": "onnxruntime quantize_static, QDQ, per-channel int8 weights, same calibration batches",
}


def export_fp32(model: nn.Module, input_shape: Sequence[int], path: str | Path) -> Path:
    """Export an fp32 module to ONNX with a dynamic batch dimension (no normalization folded in).

    Args:
        model: Maps ``[B, *input_shape]`` float32 to ``[B, C]`` logits.
        input_shape: One sample's shape.
        path: The ``.onnx`` file to write.

    Returns:
        ``path``.
    """
    return onnx_runtime.export_fp32_onnx(model, input_shape, None, path)


def quantize_onnx(
    fp32_path: str | Path, out_path: str | Path, scheme: str, calibration: Sequence[Tensor]
) -> tuple[Path | None, str]:
    """The ONNX Runtime counterpart of a torch scheme, applied to an fp32 ONNX file.

    Args:
        fp32_path: From ``export_fp32``.
        out_path: Where to write the quantized file.
        scheme: The torch scheme being mirrored.
        calibration: Batches ``[B, *input_shape]`` for static int8 (the inputs the file takes).

    Returns:
        ``(path, how)``, or ``(None, why not)`` for schemes without a counterpart.
    """
    if scheme in _COUNTERPART:
        return onnx_runtime.quantize_onnx_file(fp32_path, out_path, _COUNTERPART[scheme], calibration), _HOW[scheme]
    if scheme == "none":
        return None, "scheme 'none': the fp32 export is the model"
    return None, f"scheme {scheme!r} has no onnxruntime counterpart here; only the fp32 model was exported"


def run_onnx(path: str | Path, x: Tensor, batch_size: int = 512) -> Tensor:
    """Logits of an ONNX model on ``x`` ``[N, *input_shape]``, with ONNX Runtime on CPU.

    Returns:
        ``[N, C]`` float32 tensor.
    """
    return onnx_runtime.run_onnx(path, x, batch_size=batch_size)
