"""Typed records of the JSON files steps hand each other: evaluation, gate decision, history.

- ``evaluation.json`` (evaluate -> gate, report, register, select): role (``teacher``,
  ``student``, ``quantized``, optionally ``baseline``) -> that model's test metrics.
- ``decision.json`` (gate -> register, select): the gate's checks, its verdict and the action
  the DAG takes; in a sweep also the candidate and the quantize run it judged.
- ``history.json`` (training steps -> report): one row per epoch.

Each ``read_*`` validates (a wrong file is an ArtifactError naming the file and the field);
each ``write_*`` takes a record or a plain dict of the same shape and writes the same bytes
the steps wrote before these records existed (``json.dumps`` of the dict, keys in their
order). The same records read what MLflow holds of a run (``evaluation.json`` and
``history.json`` of the step runs, ``gate.json`` of the parent run) through ``parse_*``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import ConfigDict, Field, RootModel, model_validator

from kd_lib.artifacts.base import Bool, Int, Number, Record, Str, read_json, validate, write_json

EVALUATION_FILE = "evaluation.json"
DECISION_FILE = "decision.json"
HISTORY_FILE = "history.json"
# What the gate step logs to MLflow: a decision without action or candidate.
GATE_FILE = "gate.json"

# What the DAG does after the gate (``GateDecision.action``), best first.
Action = Literal["promote", "challenger", "reject"]
ACTIONS: tuple[str, ...] = get_args(Action)
_LATENCY_KEY = re.compile(r"latency_b\d+_p\d+_ms")


class Agreement(Record):
    """Where a student's predictions differ from the teacher's (``metrics.agreement``)."""

    model_config = ConfigDict(extra="allow")

    agreement: Number
    n_disagree: Int
    other_right: Int
    reference_right: Int
    both_wrong: Int
    pairs: list[list[Int]]


class KdGain(Record):
    """The distilled student against the same student trained without KD (``metrics.paired_gain``)."""

    model_config = ConfigDict(extra="allow")

    gain_points: Number
    n: Int
    kd_only_right: Int
    baseline_only_right: Int
    p_value: Number
    significant: Bool


class ModelMetrics(Record):
    """One model's row of ``evaluation.json`` (``metrics.evaluate_model`` plus what the evaluate
    step adds). Every field is optional: a row holds what its model was measured for, and
    ``latency_b{batch}_p{50,95}_ms`` come as extra keys, one pair per timed batch size."""

    model_config = ConfigDict(extra="allow")

    accuracy: Number | None = None
    macro_f1: Number | None = None
    size_bytes: Number | None = None
    weights_bytes: Number | None = None
    num_params: Int | None = None
    predictions: list[Int] | None = None
    confusion_matrix: list[list[Int]] | None = None
    mlflow_run_id: Str | None = None
    quantization: Str | None = None
    backend: Str | None = None
    quantization_auto_found: Bool | None = None
    quantization_auto_reason: Str | None = None
    candidates: list[dict[str, Any]] | None = None
    latency_threads: Int | None = None
    source_role: Str | None = None
    promotion_reason: Str | None = None
    kd_significantly_worse: Bool | None = None
    kd_gain_points: Number | None = None
    kd_gain: KdGain | None = None
    vs_teacher: Agreement | None = None

    @model_validator(mode="after")
    def _latencies_are_numbers(self) -> ModelMetrics:
        for key, value in (self.model_extra or {}).items():
            if _LATENCY_KEY.fullmatch(key) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{key} must be a number of milliseconds, got {value!r}")
        return self

    def latency_ms(self, batch_size: int, percentile: int = 50) -> float | None:
        """``latency_b{batch_size}_p{percentile}_ms``, or None when it was not measured."""
        value = (self.model_extra or {}).get(f"latency_b{batch_size}_p{percentile}_ms")
        return float(value) if value is not None else None


class EvaluationRecord(Record):
    """``evaluation.json``: role -> ModelMetrics, in the order the evaluate step wrote them.

    The select step writes ``{}`` when no candidate was chosen: every role is optional.
    """

    model_config = ConfigDict(extra="allow")
    # Roles beyond the known ones (a report of an older or newer run) are still metric rows.
    __pydantic_extra__: dict[str, ModelMetrics] = Field(init=False)

    teacher: ModelMetrics | None = None
    student: ModelMetrics | None = None
    quantized: ModelMetrics | None = None
    baseline: ModelMetrics | None = None

    def roles(self) -> dict[str, ModelMetrics]:
        """Every role present, in file order."""
        given = dict.fromkeys([*self._order, *sorted(self.model_fields_set), *(self.model_extra or {})])
        return {role: row for role in given if (row := self.get(role)) is not None}


class CheckRecord(Record):
    """One gate check as written (``kd_lib.evaluate.gates.GateCheck``)."""

    model_config = ConfigDict(extra="allow")

    name: Str
    value: Number
    threshold: Number
    op: Literal[">=", "<="]
    passed: Bool
    unit: Str
    detail: Str = ""
    group: Str = "threshold"


class DecisionRecord(Record):
    """``decision.json`` (and the ``gate.json`` logged to MLflow, which has no ``action``)."""

    model_config = ConfigDict(extra="allow")

    passed: Bool
    checks: list[CheckRecord]
    action: Action | None = None
    candidate: Str | None = None
    quantized_run_id: Str | None = None


class EpochRecord(Record):
    """One epoch of a training history (``TrainResult.history``); per-term losses are extra keys."""

    model_config = ConfigDict(extra="allow")

    epoch: Int
    train_loss: Number | None = None
    val_loss: Number | None = None
    val_accuracy: Number | None = None
    lr: Number | None = None
    seconds: Number | None = None


class HistoryRecord(RootModel[list[EpochRecord]]):
    """``history.json``: the epochs in order; ``[]`` for a teacher that was imported, not trained."""

    def to_list(self) -> list[dict[str, Any]]:
        """The JSON-able rows, as written."""
        return [row.to_dict() for row in self.root]


def parse_evaluation(data: Mapping[str, Any] | EvaluationRecord, origin: str = "evaluation") -> EvaluationRecord:
    """Validate an evaluation dict (e.g. what MLflow holds); ``origin`` names it in the error."""
    return data if isinstance(data, EvaluationRecord) else validate(EvaluationRecord, data, origin)


def parse_decision(data: Mapping[str, Any] | DecisionRecord, origin: str = "decision") -> DecisionRecord:
    """Validate a decision (or ``gate.json``) dict; ``origin`` names it in the error."""
    return data if isinstance(data, DecisionRecord) else validate(DecisionRecord, data, origin)


def parse_history(data: Any, origin: str = "history") -> HistoryRecord:
    """Validate a list of epoch rows; ``origin`` names it in the error."""
    return data if isinstance(data, HistoryRecord) else validate(HistoryRecord, data, origin)


def read_evaluation(path: str | Path) -> EvaluationRecord:
    """Read ``evaluation.json``.

    Raises:
        ArtifactError: the file is missing, not JSON, or a field has the wrong type (named).
    """
    return validate(EvaluationRecord, read_json(path, "the evaluate step writes it"), path)


def write_evaluation(path: str | Path, record: EvaluationRecord | Mapping[str, Any]) -> Path:
    """Write ``evaluation.json`` (validated first; the same bytes as ``json.dumps`` of the dict)."""
    return write_json(path, parse_evaluation(record, str(path)).to_dict())


def read_decision(path: str | Path) -> DecisionRecord:
    """Read ``decision.json``.

    Raises:
        ArtifactError: the file is missing, not JSON, or a field has the wrong type (named).
    """
    return validate(DecisionRecord, read_json(path, "the gate step writes it"), path)


def write_decision(path: str | Path, record: DecisionRecord | Mapping[str, Any]) -> Path:
    """Write ``decision.json`` (validated first; the same bytes as ``json.dumps`` of the dict)."""
    return write_json(path, parse_decision(record, str(path)).to_dict())


def read_history(path: str | Path, missing_ok: bool = False) -> HistoryRecord:
    """Read ``history.json``.

    Args:
        path: The file.
        missing_ok: A missing or empty file is an empty history (the report leaves that
            curve out) instead of an error.

    Raises:
        ArtifactError: the file is missing (unless ``missing_ok``), not JSON, or a row is malformed.
    """
    path = Path(path)
    if missing_ok and (not path.is_file() or not path.read_text().strip()):
        return HistoryRecord([])
    return validate(HistoryRecord, read_json(path, "the training step writes it"), path)


def write_history(path: str | Path, record: HistoryRecord | Sequence[Mapping[str, Any]]) -> Path:
    """Write ``history.json`` (validated first; the same bytes as ``json.dumps`` of the rows)."""
    return write_json(path, parse_history(record, str(path)).to_list())
