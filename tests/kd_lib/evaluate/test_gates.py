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
