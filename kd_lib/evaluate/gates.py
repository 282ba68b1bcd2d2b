"""Promotion gates: is the quantized student good and small enough to become the champion?

``decide`` compares measured metrics with the thresholds of ``GateConfig`` and returns every
check with its value, so a failed run says exactly which bar it missed and by how much. The
metrics are rows of the evaluate step's record (``kd_lib.artifacts.records.ModelMetrics``, or
plain dicts of the same shape); the decision is written as a ``DecisionRecord``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from pydantic import ValidationError
from tabulate import tabulate

from kd_lib.artifacts.base import describe
from kd_lib.artifacts.errors import ArtifactError
from kd_lib.artifacts.records import DecisionRecord, ModelMetrics, parse_decision
from kd_lib.config import GateConfig

# Values are rounded before comparing so that float noise cannot fail a run sitting exactly on
# a threshold: (0.97 - 0.95) * 100 is 2.0000000000000018 in binary floating point.
_DECIMALS = 9
# evaluation.json's p50 latency keys: latency_b<batch size>_p50_ms.
_P50_KEY = re.compile(r"latency_b(\d+)_p50_ms")


@dataclass(frozen=True)
class GateCheck:
    """One comparison of a measured value with its threshold.

    Attributes:
        name: The GateConfig field it checks (``min_accuracy``, ...).
        value: The measured value, in ``unit``.
        threshold: The configured bar, in ``unit``.
        op: ``">="`` or ``"<="``: how ``value`` must compare with ``threshold`` to pass.
        passed: Whether it did (equality passes).
        unit: ``"fraction"``, ``"points"``, ``"MB"``, ``"x"`` or ``"bool"`` (1 true, 0 false).
        detail: Why, in words, when the number alone does not say (e.g. what ``auto`` tried,
            or that a larger candidate passed because it is more accurate than the champion).
        group: ``"threshold"`` (the absolute bars) or ``"champion"`` (the comparison with the
            current champion); a candidate failing only champion checks may become a challenger.
    """

    name: str
    value: float
    threshold: float
    op: str
    passed: bool
    unit: str
    detail: str = ""
    group: str = "threshold"


@dataclass(frozen=True)
class GateDecision:
    """The verdict: passed only when every check passed.

    Attributes:
        passed: All checks passed.
        checks: Every check made, in a fixed order.
    """

    passed: bool
    checks: list[GateCheck]

    def failed(self) -> list[GateCheck]:
        """The checks that did not pass."""
        return [c for c in self.checks if not c.passed]

    def action(self, keep_rejected: bool) -> str:
        """``"promote"`` when everything passed; ``"challenger"`` when only champion checks
        failed and rejected candidates are kept; else ``"reject"``."""
        if self.passed:
            return "promote"
        if keep_rejected and all(c.group == "champion" for c in self.failed()):
            return "challenger"
        return "reject"

    def to_record(
        self, action: str | None = None, candidate: str | None = None, quantized_run_id: str | None = None
    ) -> DecisionRecord:
        """The ``decision.json`` record: the checks, plus the action and (in a sweep) the
        candidate and its quantize run, each only when given."""
        extra = {"action": action, "candidate": candidate, "quantized_run_id": quantized_run_id}
        return DecisionRecord.model_validate(
            {"passed": self.passed, "checks": [asdict(c) for c in self.checks]}
            | {key: value for key, value in extra.items() if value is not None}
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what ``gate.json`` holds); ``GateDecision.from_dict`` inverts it."""
        return self.to_record().to_dict()

    @classmethod
    def from_record(cls, record: DecisionRecord) -> GateDecision:
        """The decision a ``DecisionRecord`` (a read ``decision.json``) holds."""
        checks = [
            GateCheck(
                name=c.name,
                value=float(c.value),
                threshold=float(c.threshold),
                op=c.op,
                passed=c.passed,
                unit=c.unit,
                detail=c.detail,
                group=c.group,
            )
            for c in record.checks
        ]
        return cls(passed=record.passed, checks=checks)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | DecisionRecord) -> GateDecision:
        """Rebuild a decision from ``to_dict`` output (e.g. after a JSON round trip).

        Raises:
            ArtifactError: ``data`` is not a decision (naming the field); a ValueError.
        """
        try:
            return cls.from_record(parse_decision(data))
        except ArtifactError as err:
            raise ArtifactError(f"not a GateDecision dict ({err.cause})") from None

    def table(self) -> str:
        """Plain-text aligned table, one row per check, for logs and run descriptions."""
        header = ("check", "value", "op", "threshold", "verdict")
        rows = [
            (
                c.name,
                f"{c.value:.6g} {c.unit}",
                c.op,
                f"{c.threshold:.6g} {c.unit}",
                "PASS" if c.passed else "FAIL",
            )
            for c in self.checks
        ]
        lines = [tabulate(rows, header, tablefmt="simple", disable_numparse=True)]
        lines += [f"{c.name}: {c.detail}" for c in self.checks if c.detail and not c.passed]
        lines.append(f"overall: {'PASS' if self.passed else 'FAIL'}")
        return "\n".join(lines)


def _check(name: str, value: float, threshold: float, op: str, unit: str, group: str = "threshold") -> GateCheck:
    value = round(float(value), _DECIMALS)
    passed = value >= threshold if op == ">=" else value <= threshold
    return GateCheck(name=name, value=value, threshold=float(threshold), op=op, passed=passed, unit=unit, group=group)


def _champion_checks(cand_acc: float, cand_size: float, champion: ModelMetrics, t: GateConfig) -> list[GateCheck]:
    champ_acc = _metric(champion, "accuracy", "champion")
    champ_size = _metric(champion, "size_bytes", "champion")
    drop = _check(
        "champion_accuracy_drop", (champ_acc - cand_acc) * 100, t.champion_tolerance, "<=", "points", "champion"
    )
    size = _check("champion_size_ratio", cand_size / champ_size, 1.0, "<=", "x", "champion")
    if not size.passed and round(cand_acc - champ_acc, _DECIMALS) > 0:
        # A larger model is acceptable when it buys accuracy.
        size = replace(size, passed=True, detail="larger than the champion but more accurate")
    return [drop, size]


def _latencies(metrics: ModelMetrics) -> dict[int, float]:
    """Batch size -> p50 ms of every latency the row holds."""
    found = {}
    for key, value in (metrics.model_extra or {}).items():
        match = _P50_KEY.fullmatch(key)
        if match and value is not None:
            found[int(match.group(1))] = float(value)
    return dict(sorted(found.items()))


def _latency_checks(candidate: ModelMetrics, teacher: ModelMetrics, t: GateConfig) -> list[GateCheck]:
    """``max_latency_ms`` and ``min_speedup``, one check per measured batch size each."""
    checks: list[GateCheck] = []
    mine, theirs = _latencies(candidate), _latencies(teacher)
    if t.max_latency_ms is not None:
        if not mine:
            raise ValueError("gate.max_latency_ms is set but the candidate's latency was not measured")
        checks += [_check(f"max_latency_ms.b{bs}", ms, t.max_latency_ms, "<=", "ms") for bs, ms in mine.items()]
    if t.min_speedup is not None:
        shared = [bs for bs in mine if bs in theirs and mine[bs] > 0]
        if not shared:
            raise ValueError("gate.min_speedup is set but the candidate's and teacher's latencies were not measured")
        checks += [_check(f"min_speedup.b{bs}", theirs[bs] / mine[bs], t.min_speedup, ">=", "x") for bs in shared]
    return checks


def _kd_check(candidate: ModelMetrics) -> GateCheck:
    """Whether a KD student that the baseline beats significantly was sent on (distill.promote: kd)."""
    worse = bool(candidate.kd_significantly_worse)
    baseline_went_on = candidate.source_role == "baseline"
    failed = worse and not baseline_went_on
    check = _check("kd_not_worse", 0.0 if failed else 1.0, 1.0, ">=", "bool")
    return replace(check, detail=str(candidate.promotion_reason or "") if worse else "")


def _row(metrics: ModelMetrics | Mapping[str, Any], role: str) -> ModelMetrics:
    """``metrics`` as a validated evaluation row."""
    if isinstance(metrics, ModelMetrics):
        return metrics
    try:
        return ModelMetrics.model_validate(metrics)
    except ValidationError as err:
        raise ValueError(f"{role} metrics: {describe(err)}") from None


def _metric(metrics: ModelMetrics, key: str, role: str) -> float:
    value = metrics.get(key)
    if value is None:
        raise ValueError(f"{role} metrics lack {key!r}; got keys {sorted(metrics.to_dict())}")
    return float(value)


def decide(
    candidate: ModelMetrics | Mapping[str, Any],
    teacher: ModelMetrics | Mapping[str, Any],
    thresholds: GateConfig,
    *,
    fp32_student: ModelMetrics | Mapping[str, Any] | None = None,
    champion: ModelMetrics | Mapping[str, Any] | None = None,
) -> GateDecision:
    """Check a candidate (the quantized student) against the configured bars.

    Checks, each inclusive (a value exactly at its threshold passes):

    - ``min_accuracy``: candidate accuracy >= threshold (fraction).
    - ``max_accuracy_drop``: (teacher - candidate accuracy) * 100 <= threshold (points).
    - ``max_quantization_drop``: (fp32 student - candidate accuracy) * 100 <= threshold
      (points); only when ``fp32_student`` is given.
    - ``max_size_mb``: candidate ``size_bytes`` / 10^6 <= threshold (MB).
    - ``min_compression_ratio``: teacher ``size_bytes`` / candidate ``size_bytes`` >= threshold.
    - ``max_latency_ms.b<B>``: the candidate's p50 latency at batch size B <= threshold (ms),
      one check per measured batch size; only when ``max_latency_ms`` is set.
    - ``min_speedup.b<B>``: teacher p50 / candidate p50 latency at batch size B >= threshold
      (x), per batch size measured for both; only when ``min_speedup`` is set.
    - ``kd_not_worse``: only when the candidate carries ``kd_significantly_worse`` (a baseline
      was trained): fails when the baseline was significantly more accurate on the test split
      and the KD student went on anyway (``distill.promote: kd``); passes, saying so, when the
      baseline went on instead.
    - ``quantization_auto_found``: only when the candidate carries ``quantization_auto_found``
      (``quantize.scheme: auto``): 1 when auto found a scheme within
      ``max_quantization_drop`` on the validation split, else 0 and the check fails with
      ``quantization_auto_reason`` as its detail.

    Args:
        candidate: Metrics of the model to promote; needs ``accuracy`` and ``size_bytes``.
        teacher: Metrics of the teacher; needs ``accuracy`` and ``size_bytes``.
        thresholds: The gate section of the pipeline config.
        fp32_student: Metrics of the student before quantization; needs ``accuracy``.
        champion: Metrics of the current champion, measured on the same test split
            (``accuracy``, ``size_bytes``), or None when there is none. Used only when
            ``thresholds.champion_policy == "must_not_regress"``, adding two checks of group
            ``"champion"``: ``champion_accuracy_drop`` ((champion - candidate) * 100 <=
            champion_tolerance) and ``champion_size_ratio`` (candidate / champion bytes <= 1,
            also passing when the candidate is more accurate).

    Returns:
        GateDecision with every check; ``passed`` only if all passed.

    Raises:
        ValueError: a required metric is missing or not a number, or the candidate size is not positive.
    """
    candidate, teacher = _row(candidate, "candidate"), _row(teacher, "teacher")
    cand_acc = _metric(candidate, "accuracy", "candidate")
    cand_size = _metric(candidate, "size_bytes", "candidate")
    teacher_acc = _metric(teacher, "accuracy", "teacher")
    teacher_size = _metric(teacher, "size_bytes", "teacher")
    if cand_size <= 0:
        raise ValueError(f"candidate size_bytes must be > 0, got {cand_size}")

    checks = [
        _check("min_accuracy", cand_acc, thresholds.min_accuracy, ">=", "fraction"),
        _check("max_accuracy_drop", (teacher_acc - cand_acc) * 100, thresholds.max_accuracy_drop, "<=", "points"),
    ]
    if fp32_student is not None:
        fp32_acc = _metric(_row(fp32_student, "fp32_student"), "accuracy", "fp32_student")
        quantization_drop = (fp32_acc - cand_acc) * 100
        checks.append(
            _check("max_quantization_drop", quantization_drop, thresholds.max_quantization_drop, "<=", "points")
        )
    checks += [
        _check("max_size_mb", cand_size / 1e6, thresholds.max_size_mb, "<=", "MB"),
        _check("min_compression_ratio", teacher_size / cand_size, thresholds.min_compression_ratio, ">=", "x"),
    ]
    if "quantization_auto_found" in candidate.model_fields_set:
        found = bool(candidate.quantization_auto_found)
        check = _check("quantization_auto_found", float(found), 1.0, ">=", "bool")
        checks.append(replace(check, detail="" if found else str(candidate.get("quantization_auto_reason", ""))))
    checks += _latency_checks(candidate, teacher, thresholds)
    if candidate.kd_significantly_worse is not None:
        checks.append(_kd_check(candidate))
    if champion is not None and thresholds.champion_policy == "must_not_regress":
        checks += _champion_checks(cand_acc, cand_size, _row(champion, "champion"), thresholds)
    return GateDecision(passed=all(c.passed for c in checks), checks=checks)
