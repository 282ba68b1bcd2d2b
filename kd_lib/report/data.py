"""What a report shows, as plain JSON-able values, and how to rebuild it from what MLflow holds.

The evaluate step fills :class:`ReportData` from its own measurements; the exit handler and
``kdflow report`` rebuild it from the parent run with :func:`from_pipeline_record`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

# Report stages: the evaluate step knows measurements and thresholds, not yet the decision;
# the exit handler (and `kdflow report`) know everything that happened.
STAGE_EVALUATE = "evaluate"
STAGE_FINAL = "final"

# Section ids, in page order; tests and anchors rely on them.
SECTIONS = ("decision", "models", "training", "confusion", "tradeoff", "gate", "config")


@dataclass
class ReportData:
    """Everything a report shows, as plain JSON-able values.

    Attributes:
        name: The pipeline config's ``name``.
        evaluation: Role (``teacher``, ``student``, ``quantized``) -> the dict of
            ``evaluation.evaluate_model`` (accuracy, macro_f1, size_bytes, num_params,
            latency_b{bs}_p50_ms/p95_ms, confusion_matrix, optionally ``vs_teacher``: the
            dict of ``evaluation.agreement``).
        histories: ``teacher`` / ``student`` -> per-epoch dicts of ``TrainResult.history``
            (epoch, train_loss, val_loss, val_accuracy, ...). Missing roles (an imported
            teacher) are shown as such.
        gate: ``GateDecision.to_dict()``, or None when the gate never ran.
        thresholds: The config's ``gate`` section; used for the plot when ``gate`` is None.
        registration: ``{"model_name", "version", "alias"}`` when a version was registered.
        stage: ``"evaluate"`` (written before the gate/registration) or ``"final"``.
        state: The pipeline's final state (``SUCCEEDED``, ``FAILED``, ...) in the final stage.
        error: The pipeline's error message, if it failed.
        run: Identifiers shown in the header (pipeline_run_id, mlflow_parent_run_id,
            dataset_fingerprint, config_hash).
        config: The resolved pipeline config (nested), shown at the end for audit.
        class_names: One name per class; defaults to the class indices.
        pareto: Candidates of a sweep, ``[{"label", "accuracy", "size_bytes"}]``: drawn on
            the accuracy-versus-size plot with their Pareto front.
    """

    name: str = "kdflow"
    evaluation: dict[str, dict[str, Any]] = field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    registration: dict[str, str] | None = None
    stage: str = STAGE_FINAL
    state: str = ""
    error: str = ""
    run: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    pareto: list[dict[str, Any]] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReportData:
        """Build from a dict with (a subset of) the attribute names; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown report field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**dict(data))


def _param_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # strings were logged as they are


def config_from_params(params: Mapping[str, str]) -> dict[str, Any]:
    """Rebuild the nested config from the parent run's flat params (``a.b.c`` -> value)."""
    tree: dict[str, Any] = {}
    for key in sorted(params):
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = _param_value(params[key])
    return tree


def from_pipeline_record(record: Mapping[str, Any], state: str | None = None, error: str | None = None) -> ReportData:
    """The final report's data from ``tracking.pipeline_record`` (what MLflow holds of a run).

    Args:
        record: The dict of ``tracking.pipeline_record``.
        state: The pipeline's final state when known better than the parent run's tags
            (the exit handler knows it before it tags the run).
        error: The pipeline's error message, likewise.

    Returns:
        The data of the final-stage report.
    """
    tags = record.get("tags", {})
    config = config_from_params(record.get("params", {}))
    meta = record.get("dataset_meta") or {}
    registration = None
    if tags.get("kdflow.registered_version"):
        registry = config.get("registry", {})
        registration = {
            "model_name": str(registry.get("model_name", "")),
            "version": tags["kdflow.registered_version"],
            "alias": tags.get("kdflow.alias", str(registry.get("alias", ""))),
        }
    return ReportData(
        name=str(config.get("name", "kdflow")),
        evaluation=record.get("evaluation") or {},
        histories=record.get("histories") or {},
        gate=record.get("gate"),
        thresholds=config.get("gate", {}),
        registration=registration,
        stage=STAGE_FINAL,
        state=state or tags.get("kdflow.pipeline_state", ""),
        error=error if error is not None else tags.get("kdflow.pipeline_error", ""),
        run={
            "pipeline_run_id": tags.get("kdflow.pipeline_run_id", ""),
            "mlflow_parent_run_id": record.get("parent_run_id", ""),
            "dataset_fingerprint": tags.get("kdflow.dataset_fingerprint", ""),
            "config_hash": tags.get("kdflow.config_hash", ""),
        },
        config=config,
        class_names=meta.get("class_names"),
        # A sweep's candidates, drawn with their front on the accuracy-versus-size plot.
        pareto=[
            {"label": r["candidate"], "accuracy": r["accuracy"], "size_bytes": r["size_bytes"]}
            for r in (record.get("sweep") or {}).get("candidates", [])
        ]
        or None,
    )
