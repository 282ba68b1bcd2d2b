"""How the distilled student is compressed (``quantize:``)."""

from __future__ import annotations

from pydantic import Field

from kd_lib.config.base import _Strict


class QuantizeConfig(_Strict):
    scheme: str = Field(
        "dynamic_int8",
        description="A name in kd_lib.compress.quantization.QUANTIZERS ('none', 'dynamic_int8', 'static_int8', "
        "'weight_only_int8', 'fp16', 'bf16', 'qat_int8') or 'auto' (the first of auto_order within "
        "gate.max_quantization_drop on the validation split).",
    )
    backend: str | None = Field(
        None,
        description="A backend of the scheme (kd_lib.compress.quantization.backends); None = the measured default.",
    )
    calibration_batches: int = Field(8, ge=1, description="static_int8: training batches run to calibrate scales.")
    calibration_batch_size: int = Field(64, ge=1, description="static_int8: samples per calibration batch.")
    qat_epochs: int = Field(2, ge=1, description="qat_int8: epochs of fake-quantized fine-tuning with the KD loss.")
    qat_lr: float = Field(
        1e-4, gt=0, description="qat_int8: learning rate of that fine-tuning (distill.train otherwise)."
    )
    allow_fp32_layers: bool = Field(
        True,
        description="Layers a scheme cannot quantize (Conv2d under dynamic_int8) stay fp32 and are recorded; "
        "false makes that an error.",
    )
    auto_order: list[str] = Field(
        default_factory=lambda: ["static_int8", "qat_int8", "dynamic_int8", "weight_only_int8", "bf16", "fp16"],
        min_length=1,
        description="scheme 'auto': schemes to try, in this order (smallest/fastest expected first).",
    )
    export_onnx: bool = Field(
        False, description="Also export the fp32 and quantized student to ONNX and check them with onnxruntime."
    )
