"""Optional ONNX export of the fp32 and quantized student, checked with onnxruntime.

torch.ao's quantized modules do not export to ONNX (the dynamo exporter has no quantized
kernels), so the quantized ONNX file is made the way ONNX users make one: onnxruntime's own
quantizer applied to the fp32 export, with the same recipe as the torch scheme (dynamic int8
weights; or static int8 QDQ with per-channel weights, calibrated on the same batches).
Schemes without such a counterpart (weight_only_int8, fp16, bf16, qat_int8, whose QAT weights
only exist as torch.ao modules) export the fp32 model only and say why.

Needs ``onnx``, ``onnxscript`` and ``onnxruntime`` (``pip install 'kdflow[onnx]'``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kd_lib.errors import KdflowError

ONNX_SCHEMES = ("none", "dynamic_int8", "static_int8")


class OnnxUnavailableError(KdflowError, RuntimeError):
    """The ONNX packages are not installed; the message says what to install."""


def _require() -> Any:
    try:
        # lazy: optional dependencies (kdflow[onnx]), imported only when an export is asked for.
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401  (torch's exporter needs it)
    except ImportError as err:
        raise OnnxUnavailableError(
            f"quantize.export_onnx needs onnx, onnxscript and onnxruntime ({err.name} is missing): "
            "pip install 'kdflow[onnx]', or set quantize.export_onnx: false"
        ) from None
    return onnxruntime


def export_fp32(model: nn.Module, input_shape: Sequence[int], path: str | Path) -> Path:
    """Export an fp32 module to ONNX with a dynamic batch dimension.

    Args:
        model: Maps ``[B, *input_shape]`` float32 to ``[B, C]`` logits.
        input_shape: One sample's shape.
        path: The ``.onnx`` file to write.

    Returns:
        ``path``.
    """
    _require()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.cpu().eval(),
            (example,),
            str(out),
            input_names=["x"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            dynamo=True,
            external_data=False,  # one self-contained file (weights inline), so its size is the model's
            verbose=False,
        )
    return out


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over a list of tensors."""

    def __init__(self, batches: Sequence[Tensor], input_name: str) -> None:
        self._items = iter([{input_name: b.numpy().astype(np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._items, None)


def quantize_onnx(
    fp32_path: str | Path, out_path: str | Path, scheme: str, calibration: Sequence[Tensor]
) -> tuple[Path | None, str]:
    """The onnxruntime counterpart of a torch scheme, applied to an fp32 ONNX file.

    Args:
        fp32_path: From ``export_fp32``.
        out_path: Where to write the quantized file.
        scheme: The torch scheme being mirrored.
        calibration: Batches ``[B, *input_shape]`` for static int8.

    Returns:
        ``(path, how)``, or ``(None, why not)`` for schemes without a counterpart.
    """
    _require()
    from onnxruntime import quantization as ortq  # lazy: optional (kdflow[onnx]), only to quantize an export

    out = Path(out_path)
    if scheme == "dynamic_int8":
        ortq.quantize_dynamic(str(fp32_path), str(out), weight_type=ortq.QuantType.QInt8)
        return out, "onnxruntime quantize_dynamic, int8 weights"
    if scheme == "static_int8":
        ortq.quantize_static(
            str(fp32_path),
            str(out),
            _Batches(calibration, "x"),
            quant_format=ortq.QuantFormat.QDQ,
            per_channel=True,
            activation_type=ortq.QuantType.QUInt8,
            weight_type=ortq.QuantType.QInt8,
        )
        return out, "onnxruntime quantize_static, QDQ, per-channel int8 weights, same calibration batches"
    if scheme == "none":
        return None, "scheme 'none': the fp32 export is the model"
    return None, f"scheme {scheme!r} has no onnxruntime counterpart here; only the fp32 model was exported"


def run_onnx(path: str | Path, x: Tensor, batch_size: int = 512) -> Tensor:
    """Logits of an ONNX model on ``x`` ``[N, *input_shape]``, with onnxruntime on CPU.

    Returns:
        ``[N, C]`` float32 tensor.
    """
    ort = _require()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    chunks = [session.run(None, {name: x[i : i + batch_size].numpy()})[0] for i in range(0, len(x), batch_size)]
    return torch.from_numpy(np.concatenate(chunks)).float()
