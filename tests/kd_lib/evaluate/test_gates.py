from __future__ import annotations

import json

import pytest

from kd_lib.config import GateConfig
from kd_lib.evaluate.gates import GateCheck, GateDecision, decide

# Thresholds that every check passes easily, so one check at a time can be put on its edge.
LENIENT = dict(
    min_accuracy=0.0,
    max_accuracy_drop=100.0,
    max_quantization_drop=100.0,
    max_size_mb=1e9,
    min_compression_ratio=1e-9,
)
TEACHER = {"accuracy": 0.97, "size_bytes": 4_000_000}


def _cand(accuracy: float = 0.95, size_bytes: int = 1_000_000) -> dict:
    return {"accuracy": accuracy, "size_bytes": size_bytes}


# (check, threshold, candidate, fp32_student, expected pass); "at" cases sit exactly on the bar.
EDGES = [
    ("min_accuracy", 0.95, _cand(0.95), None, True),
    ("min_accuracy", 0.95, _cand(0.9501), None, True),
    ("min_accuracy", 0.95, _cand(0.9499), None, False),
    ("max_accuracy_drop", 2.0, _cand(0.95), None, True),  # (0.97 - 0.95) * 100 = 2.0000000000000018
    ("max_accuracy_drop", 2.0, _cand(0.9501), None, True),
    ("max_accuracy_drop", 2.0, _cand(0.9499), None, False),
    ("max_quantization_drop", 1.0, _cand(0.95), {"accuracy": 0.96}, True),
    ("max_quantization_drop", 1.0, _cand(0.9501), {"accuracy": 0.96}, True),
    ("max_quantization_drop", 1.0, _cand(0.9499), {"accuracy": 0.96}, False),
    ("max_size_mb", 1.0, _cand(size_bytes=1_000_000), None, True),
    ("max_size_mb", 1.0, _cand(size_bytes=999_999), None, True),
    ("max_size_mb", 1.0, _cand(size_bytes=1_000_001), None, False),
    ("min_compression_ratio", 4.0, _cand(size_bytes=1_000_000), None, True),
    ("min_compression_ratio", 4.0, _cand(size_bytes=999_999), None, True),
    ("min_compression_ratio", 4.0, _cand(size_bytes=1_000_001), None, False),
]


@pytest.mark.parametrize(("name", "threshold", "candidate", "fp32", "expected"), EDGES)
def test_each_check_at_and_around_its_threshold(
    name: str, threshold: float, candidate: dict, fp32: dict | None, expected: bool
) -> None:
    thresholds = GateConfig(**{**LENIENT, name: threshold})
    decision = decide(candidate, TEACHER, thresholds, fp32_student=fp32)
    by_name = {c.name: c for c in decision.checks}
    assert by_name[name].passed is expected
    assert by_name[name].threshold == threshold
    assert decision.passed is expected
    assert [c.name for c in decision.failed()] == ([] if expected else [name])


def test_values_and_units() -> None:
    decision = decide(_cand(0.95, 500_000), TEACHER, GateConfig(**LENIENT), fp32_student={"accuracy": 0.955})
    values = {c.name: (c.value, c.op, c.unit) for c in decision.checks}
    assert values == {
        "min_accuracy": (0.95, ">=", "fraction"),
        "max_accuracy_drop": (2.0, "<=", "points"),
        "max_quantization_drop": (0.5, "<=", "points"),
        "max_size_mb": (0.5, "<=", "MB"),
        "min_compression_ratio": (8.0, ">=", "x"),
    }


def test_quantization_check_only_with_fp32_student_and_champion_ignored() -> None:
    names = [c.name for c in decide(_cand(), TEACHER, GateConfig()).checks]
    assert names == ["min_accuracy", "max_accuracy_drop", "max_size_mb", "min_compression_ratio"]
    with_champion = decide(_cand(), TEACHER, GateConfig(), champion={"accuracy": 1.0, "size_bytes": 1})
    assert with_champion == decide(_cand(), TEACHER, GateConfig())


def test_round_trip_through_json() -> None:
    decision = decide(_cand(0.5), TEACHER, GateConfig(), fp32_student={"accuracy": 0.9})
    assert not decision.passed
    again = GateDecision.from_dict(json.loads(json.dumps(decision.to_dict())))
    assert again == decision
    assert isinstance(again.checks[0], GateCheck)
    with pytest.raises(ValueError, match="not a GateDecision"):
        GateDecision.from_dict({"passed": True})


def test_table_lists_every_check_with_its_verdict() -> None:
    decision = decide(_cand(0.5), TEACHER, GateConfig(min_accuracy=0.8))
    lines = decision.table().splitlines()
    assert lines[0].split() == ["check", "value", "op", "threshold", "verdict"]
    row = next(line for line in lines if line.startswith("min_accuracy"))
    assert row.split() == ["min_accuracy", "0.5", "fraction", ">=", "0.8", "fraction", "FAIL"]
    assert any(line.startswith("max_size_mb") and line.endswith("PASS") for line in lines)
    assert lines[-1] == "overall: FAIL"
    # Columns are aligned: every verdict starts at the same offset.
    offsets = {line.rfind("PASS") if "PASS" in line else line.rfind("FAIL") for line in lines[2:-1]}
    assert len(offsets) == 1


def test_missing_metrics_and_zero_size_are_errors() -> None:
    with pytest.raises(ValueError, match="candidate metrics lack 'size_bytes'"):
        decide({"accuracy": 0.9}, TEACHER, GateConfig())
    with pytest.raises(ValueError, match="size_bytes must be > 0"):
        decide(_cand(size_bytes=0), TEACHER, GateConfig())


def _timed(b1: float, b64: float, **row: object) -> dict:
    return {**_cand(), "latency_b1_p50_ms": b1, "latency_b64_p50_ms": b64, "latency_b1_p95_ms": 99.0, **row}


def test_latency_and_speedup_are_checked_at_every_measured_batch_size() -> None:
    teacher = {**TEACHER, "latency_b1_p50_ms": 0.5, "latency_b64_p50_ms": 10.0}
    gate = GateConfig(**LENIENT, max_latency_ms=0.25, min_speedup=20.0)
    decision = decide(_timed(0.25, 0.4), teacher, gate)
    checks = {c.name: c for c in decision.checks}
    assert checks["max_latency_ms.b1"].passed and checks["max_latency_ms.b1"].unit == "ms"
    assert not checks["max_latency_ms.b64"].passed  # 0.4 > 0.25 (p95 is not what is checked)
    assert not checks["min_speedup.b1"].passed and checks["min_speedup.b1"].value == 2.0
    assert checks["min_speedup.b64"].passed and checks["min_speedup.b64"].value == 25.0
    assert [c.name for c in decision.failed()] == ["max_latency_ms.b64", "min_speedup.b1"]


def test_latency_checks_are_off_by_default_and_need_measurements_when_on() -> None:
    names = [c.name for c in decide(_timed(1.0, 2.0), TEACHER, GateConfig(**LENIENT)).checks]
    assert not [n for n in names if "latency" in n or "speedup" in n]
    with pytest.raises(ValueError, match="max_latency_ms is set but"):
        decide(_cand(), TEACHER, GateConfig(**LENIENT, max_latency_ms=1.0))
    with pytest.raises(ValueError, match="min_speedup is set but"):
        decide(_timed(1.0, 2.0), TEACHER, GateConfig(**LENIENT, min_speedup=1.0))


@pytest.mark.parametrize(
    ("worse", "source", "passed"),
    [(False, "student", True), (True, "baseline", True), (True, "student", False)],
)
def test_a_kd_student_its_baseline_beats_fails_only_when_it_went_on(worse: bool, source: str, passed: bool) -> None:
    reason = "the baseline is significantly more accurate (KD gain -1.30 points, exact McNemar p = 0.0106)"
    cand = {**_cand(), "kd_significantly_worse": worse, "source_role": source, "promotion_reason": reason}
    decision = decide(cand, TEACHER, GateConfig(**LENIENT))
    check = {c.name: c for c in decision.checks}["kd_not_worse"]
    assert check.passed is passed and decision.passed is passed
    assert check.detail == (reason if worse else "")
    if not passed:
        assert "kd_not_worse: the baseline is significantly more accurate" in decision.table()
    # Without a baseline there is nothing to compare: no check.
    assert "kd_not_worse" not in [c.name for c in decide(_cand(), TEACHER, GateConfig(**LENIENT)).checks]
