"""How the quantized student is measured (``evaluate:``) and the thresholds it must pass (``gate:``).

Accuracies are fractions in [0, 1]; *drops* are percentage points (teacher 0.97 and student
0.95 is a drop of 2.0 points).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kd_lib.config.base import _Strict

# Samples per forward pass when a model's test predictions are computed: by evaluate, and by
# register's fresh-process verification of the registered version, which must batch the same way.
# A dynamically quantized model (ONNX Runtime dynamic int8) takes its activation ranges from each
# batch, so its predictions on a near tie can depend on which samples share the batch.
PREDICT_BATCH_SIZE = 512


class EvaluateConfig(_Strict):
    latency_warmup: int = Field(5, ge=0)
    latency_iters: int = Field(30, ge=1)
    batch_sizes: list[int] = Field(default_factory=lambda: [1, 64])
    threads: int = Field(1, ge=1, description="torch CPU threads while timing latency.")


class GateConfig(_Strict):
    min_accuracy: float = Field(0.80, ge=0, le=1, description="Quantized student test accuracy, fraction.")
    max_accuracy_drop: float = Field(5.0, ge=0, description="Teacher minus quantized student accuracy, points.")
    max_quantization_drop: float = Field(
        1.0, ge=0, description="fp32 student minus quantized student accuracy, points."
    )
    max_size_mb: float = Field(1.0, gt=0, description="Quantized student artifact size, MB (10^6 bytes).")
    min_compression_ratio: float = Field(
        4.0, gt=0, description="Teacher artifact bytes / quantized student artifact bytes."
    )
    max_latency_ms: float | None = Field(
        None,
        gt=0,
        description="The chosen artifact's p50 latency at every evaluate.batch_sizes (ms per forward pass, "
        "evaluate.threads threads, on the machine that runs evaluate) must be at most this; None = no check.",
    )
    min_speedup: float | None = Field(
        None,
        gt=0,
        description="Teacher p50 latency / chosen artifact p50 latency, at every evaluate.batch_sizes, must be at "
        "least this; None = no check.",
    )
    champion_policy: Literal["ignore", "must_not_regress"] = Field(
        "ignore",
        description="must_not_regress: the candidate's test accuracy may be at most champion_tolerance points below "
        "the current @champion's (both measured on this run's test split), and it may not be larger unless it is "
        "more accurate.",
    )
    champion_tolerance: float = Field(0.0, ge=0, description="Allowed accuracy drop against the champion, points.")
