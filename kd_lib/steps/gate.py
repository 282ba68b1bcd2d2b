"""The ``gate`` step: the thresholds (and the champion comparison) applied to the quantized student."""

from __future__ import annotations

from pathlib import Path

from kd_lib.adapters.tracking import step_run
from kd_lib.artifacts import read_evaluation, write_decision
from kd_lib.config import PipelineConfig
from kd_lib.evaluate import gates
from kd_lib.steps.common import gate_decision, log_gate, owns_parent


def gate(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    evaluation_path: str | Path,
    decision_path: str | Path,
) -> tuple[gates.GateDecision, str]:
    """Apply the thresholds (and the champion comparison) to the quantized student.

    Returns the decision and the action the DAG takes: ``promote``, ``challenger`` or
    ``reject``. The table goes to MLflow either way (to the parent run too, unless this is a
    sweep candidate: then the decision file also names the candidate and its quantize run,
    which is how the select step pairs it with the candidate's other outputs).
    """
    with step_run(cfg, pipeline_run_id, "gate") as run:
        results = read_evaluation(evaluation_path)
        champion = None
        if cfg.gate.champion_policy != "ignore":
            # lazy: measuring the champion loads torch; a gate without the comparison starts without it
            from kd_lib.steps.champion import champion_metrics
            from kd_lib.steps.inputs import open_dataset

            with open_dataset(cfg, dataset_dir) as splits:
                champion = champion_metrics(cfg, splits, run)
            if champion:
                run.log_metrics(
                    {"champion.accuracy": champion["accuracy"], "champion.size_bytes": champion["size_bytes"]}
                )
                run.set_tags({"kdflow.champion_version": champion["version"]})

        decision = gate_decision(cfg, results, champion)
        action = decision.action(cfg.registry.keep_rejected)
        record = decision.to_record(action)
        if cfg.candidate:
            # The select step pairs this decision with the candidate's model by its quantize run.
            run_id = results.quantized.mlflow_run_id if results.quantized is not None else None
            record = decision.to_record(action, cfg.candidate, run_id or "")
        write_decision(decision_path, record)

        run.log_metrics({f"gate.{c.name}": c.value for c in decision.checks} | {"gate.passed": float(decision.passed)})
        log_gate(run, decision, action, decision.table(), on_parent=owns_parent(cfg))
        return decision, action
