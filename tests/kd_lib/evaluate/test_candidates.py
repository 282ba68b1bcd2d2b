"""kd_lib.evaluate.candidates: the deployment artifact chosen from measured candidates."""

from __future__ import annotations

import pytest

from kd_lib.evaluate.candidates import Candidate, select


def _c(name: str, drop: float, size: int, b1: float, b64: float, backend: str = "x") -> Candidate:
    return Candidate(
        name=name,
        backend=backend,
        val_accuracy=0.9 - drop / 100,
        drop_points=drop,
        size_bytes=size,
        latency_ms={1: b1, 64: b64},
    )


FP32 = _c("none", 0.0, 20_000, 0.060, 2.80, "eager")
ORT_FP32 = _c("onnx_fp32", 0.0, 19_000, 0.013, 0.45, "onnxruntime")
ORT_STATIC = _c("onnx_static_int8", 0.2, 6_000, 0.024, 0.98, "onnxruntime")
ORT_DYNAMIC = _c("onnx_dynamic_int8", 0.1, 6_500, 0.059, 3.14, "onnxruntime")  # slower than fp32 at b64


def test_fastest_takes_the_lowest_geometric_mean_latency_and_says_how_much_faster():
    chosen = select([FP32, ORT_FP32, ORT_STATIC, ORT_DYNAMIC], "fastest", max_drop=1.0)
    assert chosen.chosen == "onnx_fp32"
    assert chosen.found
    assert "vs torch fp32: 4.62x at b1, 6.22x at b64" in chosen.reason
    verdicts = {c.name: c.verdict for c in chosen.candidates}
    assert verdicts == {
        "none": "qualifies",
        "onnx_fp32": "chosen",
        "onnx_static_int8": "qualifies",
        "onnx_dynamic_int8": "slower than torch fp32 at b64",
    }


def test_an_int8_artifact_slower_than_fp32_at_any_batch_size_is_never_the_fastest_choice():
    # Fastest by far at batch 64, but slower than torch fp32 at batch 1: excluded.
    fast_big_slow_small = _c("dynamic_int8", 0.0, 6_000, 0.130, 0.05)
    chosen = select([FP32, fast_big_slow_small], "fastest", max_drop=1.0)
    assert chosen.chosen == "none"
    assert chosen.candidates[1].verdict == "slower than torch fp32 at b1"


def test_smallest_takes_the_fewest_bytes_within_the_accuracy_budget():
    chosen = select([FP32, ORT_FP32, ORT_STATIC, ORT_DYNAMIC], "smallest", max_drop=1.0)
    assert chosen.chosen == "onnx_static_int8"
    assert "6000 bytes" in chosen.reason
    # Over the budget: the next smallest.
    chosen = select([FP32, ORT_FP32, ORT_STATIC, ORT_DYNAMIC], "smallest", max_drop=0.15)
    assert chosen.chosen == "onnx_dynamic_int8"
    assert chosen.candidates[2].verdict == "accuracy drop 0.20 > 0.15 points"


def test_a_drop_exactly_at_the_budget_qualifies():
    assert select([FP32, ORT_STATIC], "smallest", max_drop=0.2).chosen == "onnx_static_int8"


def test_ties_go_to_the_earlier_candidate():
    twin = _c("onnx_fp32", 0.0, 20_000, 0.060, 2.80)
    assert select([FP32, twin], "fastest", max_drop=1.0).chosen == "none"
    assert select([twin, FP32], "fastest", max_drop=1.0).chosen == "onnx_fp32"


def test_nothing_qualifies_says_why_for_each_candidate():
    broken = Candidate(name="static_int8", error="cannot quantize layers.0.bn1 (BatchNorm2d)")
    chosen = select([broken, ORT_STATIC], "fastest", max_drop=0.1, reference=FP32)
    assert chosen.chosen is None and not chosen.found
    assert "static_int8: not applicable: cannot quantize layers.0.bn1" in chosen.reason
    assert "onnx_static_int8: accuracy drop 0.20 > 0.1 points" in chosen.reason
    table = chosen.table()
    assert "static_int8" in table and "not applicable" in table


def test_a_reference_outside_the_list_still_bars_slower_candidates():
    chosen = select([ORT_DYNAMIC, ORT_STATIC], "fastest", max_drop=1.0, reference=FP32)
    assert chosen.chosen == "onnx_static_int8"
    assert chosen.candidates[0].verdict == "slower than torch fp32 at b64"


def test_without_any_candidate_it_refuses():
    with pytest.raises(ValueError, match="at least one candidate"):
        select([], "fastest", max_drop=1.0)


def test_to_dict_is_json_ready():
    row = select([FP32, ORT_FP32], "fastest", max_drop=1.0).candidates[1].to_dict()
    assert row == {
        "name": "onnx_fp32",
        "backend": "onnxruntime",
        "verdict": "chosen",
        "val_accuracy": 0.9,
        "drop_points": 0.0,
        "size_bytes": 19_000,
        "latency_ms": {"1": 0.013, "64": 0.45},
    }


def test_a_candidate_larger_than_the_gate_allows_does_not_qualify():
    chosen = select(
        [FP32, ORT_FP32, ORT_STATIC], "fastest", max_drop=1.0, max_bytes=10_000, size_rule="gate.max_size_mb 0.01"
    )
    assert chosen.chosen == "onnx_static_int8"
    assert chosen.candidates[1].verdict == "19000 bytes > 10000 allowed by gate.max_size_mb 0.01"
