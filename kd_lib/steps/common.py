"""What every step module shares, torch-free (the gate, select, register and finalize tasks
start without loading torch): the step error, a model's spec, the gate record."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from kd_lib.adapters.model_registry import gate_tags
from kd_lib.artifacts import EvaluationRecord, parse_evaluation
from kd_lib.artifacts.dataset_dir import DatasetMeta, tokenizer_path
from kd_lib.artifacts.model_dir import TOKENIZER_FILE
from kd_lib.config import PipelineConfig
from kd_lib.errors import KdflowError
from kd_lib.evaluate import gates


class StepError(KdflowError, RuntimeError):
    """A step was asked to do something its inputs do not allow (e.g. register a failed gate)."""


class Recorder(Protocol):
    """What the steps log through: ``kd_lib.adapters.tracking.StepRun``, or on a non-main rank
    of a training step a stand-in that records nothing (``kd_lib.steps.training.NullRun``)."""

    run_id: str

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def set_tags(self, tags: dict[str, Any], on_parent: bool = False) -> None: ...
    def log_dict(self, obj: Any, filename: str, on_parent: bool = False) -> None: ...
    def log_text(self, text: str, filename: str, on_parent: bool = False) -> None: ...
    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None: ...


def owns_parent(cfg: PipelineConfig) -> bool:
    """Whether this step may write the parent run's record (gate table, tags).

    Not a sweep candidate's step: the candidates run side by side under one parent, and the
    select step writes the chosen one's record there.
    """
    return cfg.candidate is None


def model_spec(
    model_cfg: Any, meta: DatasetMeta, role: str, run_id: str, params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``spec.json`` of a model a step trained (or imported from a checkpoint) on this data.

    On text data the spec also holds ``text`` (``meta.text``: the tokenizer's pad id, max
    length, vocabulary size and origin); the model directory carries the ``tokenizer.json``
    itself (``carry_tokenizer``).

    Args:
        model_cfg: The ``ModelConfig`` it was built from (architecture and parameters).
        meta: The dataset it was trained on (input shape, classes, normalization, fingerprint).
        role: ``teacher``, ``student`` or ``baseline``.
        run_id: The MLflow run of the step that made it.
        params: The params it was built with when they differ from ``model_cfg.params`` (text
            data adds ``vocab_size`` and ``pad_id``: ``kd_lib.steps.inputs.model_params``).
    """
    spec = {
        "role": role,
        "arch": model_cfg.arch,
        "params": dict(model_cfg.params if params is None else params),
        "input_shape": list(meta.input_shape),
        "num_classes": meta.num_classes,
        "quantization": "none",
        "normalization": dict(meta.normalization),
        "dataset_fingerprint": meta.fingerprint,
        "mlflow_run_id": run_id,
    }
    if meta.text is not None:
        spec["text"] = meta.text.model_dump()
    return spec


def carry_tokenizer(dataset_dir: str | Path, meta: DatasetMeta, directory: str | Path) -> None:
    """Copy text data's ``tokenizer.json`` into a model directory (``model_dir.TOKENIZER_FILE``),
    so the model turns raw strings into the ids it was trained on; nothing for other data.

    Raises:
        ArtifactError: the data is text and its tokenizer file is missing.
    """
    source = tokenizer_path(dataset_dir, meta)
    if source is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, Path(directory) / TOKENIZER_FILE)


def gate_decision(
    cfg: PipelineConfig,
    results: EvaluationRecord | Mapping[str, Any],
    champion: Mapping[str, Any] | None = None,
) -> gates.GateDecision:
    """The gate's pure decision on the evaluate step's measurements (and the champion's).

    Raises:
        StepError: the evaluation lacks the teacher, the student or the quantized student.
    """
    rows = parse_evaluation(results).roles()
    missing = [role for role in ("quantized", "teacher", "student") if role not in rows]
    if missing:
        raise StepError(f"the evaluation has no {', '.join(missing)} row; it must come from the evaluate step")
    # The fp32 model that was quantized: the KD student, or the baseline distill.promote sent on.
    source = rows["quantized"].source_role or "student"
    if source not in rows:
        raise StepError(f"the quantized model came from the {source} but the evaluation has no {source} row")
    return gates.decide(rows["quantized"], rows["teacher"], cfg.gate, fp32_student=rows[source], champion=champion)


def log_gate(run: Recorder, decision: gates.GateDecision, action: str, table: str, on_parent: bool) -> None:
    """The gate's table and JSON on the step's run and, with ``on_parent``, its record on the
    parent run (tags and failed checks included)."""
    for parent in (False, True) if on_parent else (False,):
        run.log_text(table, "gate.txt", on_parent=parent)
        run.log_dict(decision.to_dict(), "gate.json", on_parent=parent)
    parent_tags = {"kdflow.gate_status": "passed" if decision.passed else "failed", "kdflow.gate_action": action}
    if not decision.passed:
        parent_tags["kdflow.gate_failed_checks"] = ",".join(c.name for c in decision.failed())
        parent_tags |= {k: v for k, v in gate_tags(decision).items() if k.startswith("gate.")}
    run.set_tags(parent_tags, on_parent=on_parent)
