"""How the distilled student is compressed and packaged for deployment (``quantize:``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kd_lib import plugins
from kd_lib.config.base import _Strict

# The ONNX Runtime artifacts (kd_lib.compress.onnx_runtime): the fp32 student exported with
# torch.onnx.export (normalization folded in), and ONNX Runtime's own int8 quantizations of it.
ONNX_SCHEMES = ("onnx_fp32", "onnx_static_int8", "onnx_dynamic_int8")
# What `scheme: auto` measures when the config does not say: torch fp32 and the ONNX Runtime
# artifacts. No deprecated torch.ao scheme is a default; list them in `candidates` to compare.
DEFAULT_CANDIDATES = ("none", *ONNX_SCHEMES)
# The torch schemes kd_lib.compress.quantization registers (a test keeps the two equal): known
# here so that validating a config does not import torch just to look the names up.
TORCH_SCHEMES = ("none", "dynamic_int8", "static_int8", "weight_only_int8", "fp16", "bf16", "qat_int8")


def scheme_names() -> list[str]:
    """Every name ``quantize.scheme`` / ``quantize.candidates`` accept (``auto`` aside)."""
    # Found by module path (kd_lib.plugins): the torch quantizers sit above config and import torch.
    return [*plugins.names("quantizer"), *ONNX_SCHEMES]


def _check_names(names: list[str], field: str) -> None:
    builtin = {*TORCH_SCHEMES, *ONNX_SCHEMES}
    if all(n in builtin for n in names) and len(set(names)) == len(names):
        return
    known = scheme_names()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{field}: unknown scheme(s) {unknown}; use names from: {', '.join(known)}")
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise ValueError(f"{field}: scheme(s) {dups} listed more than once; list each once")


class QuantizeConfig(_Strict):
    scheme: str = Field(
        "auto",
        description="'auto' (default): build every artifact in `candidates`, measure each (validation accuracy; "
        "latency at every evaluate.batch_sizes with evaluate.threads threads) and keep the best by `select` within "
        "gate.max_quantization_drop. Or one scheme by name: a torch scheme of kd_lib.compress.quantization "
        "('none', 'dynamic_int8', 'static_int8', 'weight_only_int8', 'fp16', 'bf16', 'qat_int8') or an ONNX "
        "Runtime artifact ('onnx_fp32', 'onnx_static_int8', 'onnx_dynamic_int8').",
    )
    candidates: list[str] = Field(
        default_factory=lambda: list(DEFAULT_CANDIDATES),
        min_length=1,
        description="scheme 'auto': the artifacts built and measured. Torch fp32 ('none') is always measured too, "
        "as the reference an artifact must not be slower than.",
    )
    select: Literal["fastest", "smallest"] = Field(
        "fastest",
        description="scheme 'auto': 'fastest' keeps the candidate with the lowest latency (geometric mean over "
        "evaluate.batch_sizes) among those no slower than torch fp32 at any batch size; 'smallest' the one with "
        "the fewest artifact bytes (then the fastest). Only candidates within gate.max_quantization_drop count.",
    )
    backend: str | None = Field(
        None,
        description="A backend of a torch scheme (kd_lib.compress.quantization.backends); None = the measured "
        "default. Only with a single named scheme.",
    )
    calibration_batches: int = Field(
        8, ge=1, description="static_int8 / onnx_static_int8: training batches run to calibrate scales."
    )
    calibration_batch_size: int = Field(64, ge=1, description="Samples per calibration batch.")
    qat_epochs: int = Field(2, ge=1, description="qat_int8: epochs of fake-quantized fine-tuning with the KD loss.")
    qat_lr: float = Field(
        1e-4, gt=0, description="qat_int8: learning rate of that fine-tuning (distill.train otherwise)."
    )
    allow_fp32_layers: bool = Field(
        True,
        description="Layers a torch scheme cannot quantize (Conv2d under dynamic_int8) stay fp32 and are "
        "recorded; false makes that an error.",
    )
    export_onnx: bool = Field(
        False,
        description="Also export the fp32 student and an ONNX Runtime counterpart of a torch scheme to the "
        "quantize step's onnx output and check them (the onnx_* schemes need no such flag).",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "auto_order" in data:
            raise ValueError(
                "quantize.auto_order was replaced by quantize.candidates: 'auto' now measures every candidate and "
                "keeps the best by quantize.select (fastest | smallest); rename the field"
            )
        return data

    @field_validator("scheme")
    @classmethod
    def _known_scheme(cls, scheme: str) -> str:
        if scheme != "auto":
            _check_names([scheme], "quantize.scheme")
        return scheme

    @field_validator("candidates")
    @classmethod
    def _known_candidates(cls, names: list[str]) -> list[str]:
        _check_names(names, "quantize.candidates")
        return names

    @model_validator(mode="after")
    def _backend_of_one_scheme(self) -> QuantizeConfig:
        if self.backend is not None and (self.scheme == "auto" or self.scheme in ONNX_SCHEMES):
            raise ValueError(
                f"quantize.backend names a backend of one torch scheme; scheme {self.scheme!r} has none: "
                "remove quantize.backend or name a torch scheme"
            )
        return self
