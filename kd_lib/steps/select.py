"""The ``select`` step: a sweep's candidates gathered, the one to register chosen and handed on."""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd_lib.adapters.tracking import SELECTED_TAG, step_run
from kd_lib.artifacts import read_decision, read_evaluation, read_spec, write_decision, write_evaluation
from kd_lib.config import PipelineConfig, config_from_json
from kd_lib.evaluate import sweep
from kd_lib.steps.common import StepError, log_gate


def select(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    candidate_configs: Sequence[str],
    evaluation_paths: Sequence[str | Path],
    decision_paths: Sequence[str | Path],
    quantized_dirs: Sequence[str | Path],
    quantized_dir: str | Path,
    evaluation_path: str | Path,
    decision_path: str | Path,
    summary_path: str | Path | None = None,
) -> tuple[sweep.Selection, str]:
    """Gather a sweep's candidates, choose the one to register, and hand it on.

    The rule is ``kd_lib.evaluate.sweep.select``: the smallest candidate that passes every gate, ties
    by accuracy then batch-1 latency, the Pareto front reported. The chosen candidate's
    quantized model, evaluation and decision are copied to ``quantized_dir``,
    ``evaluation_path`` and ``decision_path`` (what register takes); when none passes, those
    hold placeholders and the decision (one failed check per candidate) says why.

    Logged to this step's run and to the parent run: ``sweep.json`` (every candidate with its
    front membership and failed checks), ``sweep.md``, ``sweep.txt`` and ``sweep_front.png``;
    the parent also gets the chosen candidate's gate record (``gate.json``, status tags) and
    the tag ``kdflow.sweep_selected`` (the name, or ``none``).

    Args:
        cfg: The base config (with its ``sweep`` section).
        candidate_configs: The candidates' config JSONs, in sweep order (what the DAG fanned out).
        evaluation_paths, decision_paths, quantized_dirs: Every candidate's evaluate, gate and
            quantize outputs, in any order.
        summary_path: Where to write the Markdown table (with the plot inlined), if given.

    Returns:
        The selection, and the config JSON of the chosen candidate (the base config's when
        none was chosen).

    Raises:
        StepError: the outputs do not match the candidates.
    """
    configs = {c.candidate: c for c in map(config_from_json, candidate_configs)}
    with step_run(cfg, pipeline_run_id, "select") as run:
        outputs = _candidate_outputs(evaluation_paths, decision_paths, quantized_dirs)
        if set(outputs) != set(configs):
            raise StepError(
                f"the sweep has candidates {sorted(configs, key=str)} but results for {sorted(outputs)}; "
                "every candidate must run distill, quantize, evaluate and gate"
            )

        # Choose.
        results = []
        for index, (name, candidate) in enumerate(configs.items()):
            info = {
                "student": f"{candidate.student.model.arch} {candidate.student.model.params}",
                "scheme": candidate.quantize.scheme,
                "temperature": next(
                    (
                        t.params.get("temperature")
                        for t in candidate.distill.losses
                        if t.name in sweep.TEMPERATURE_LOSSES
                    ),
                    None,
                ),
            }
            out = outputs[str(name)]
            results.append(sweep.result_from(str(name), index, out["evaluation"], out["decision"], info))
        selection = sweep.select(results)
        summary = selection.to_dict()
        table = sweep.table_text(summary)
        print(table, flush=True)  # the task's log: the why, right where the run ends
        png = sweep.plot_front(summary)
        markdown = sweep.table_markdown(summary, base64.b64encode(png).decode("ascii"))

        # Hand the chosen candidate on (or placeholders that say why there is none).
        decision = selection.decision()
        chosen = selection.chosen
        Path(decision_path).parent.mkdir(parents=True, exist_ok=True)
        Path(evaluation_path).parent.mkdir(parents=True, exist_ok=True)
        if chosen is not None:
            picked = outputs[chosen.name]
            shutil.copytree(picked["quantized_dir"], quantized_dir, dirs_exist_ok=True)
            shutil.copyfile(picked["evaluation_path"], evaluation_path)
            shutil.copyfile(picked["decision_path"], decision_path)
        else:
            # KFP uploads every declared output: leave files that say why they are empty.
            Path(quantized_dir).mkdir(parents=True, exist_ok=True)
            (Path(quantized_dir) / "NO_CANDIDATE.txt").write_text(selection.headline() + "\n")
            write_evaluation(evaluation_path, {})
            write_decision(decision_path, decision.to_record(selection.action))
        if summary_path is not None:
            Path(summary_path).parent.mkdir(parents=True, exist_ok=True)
            Path(summary_path).write_text(markdown)

        # Log.
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "sweep.json").write_text(json.dumps(summary, indent=2))
            (Path(tmp) / "sweep.md").write_text(markdown)
            (Path(tmp) / "sweep.txt").write_text(table + "\n")
            (Path(tmp) / "sweep_front.png").write_bytes(png)
            run.log_artifacts(tmp)
            run.client.log_artifacts(run.parent_run_id, tmp)
        passed = sum(r.decision.passed for r in results)
        run.log_metrics(
            {"sweep.candidates": len(results), "sweep.passed": passed, "sweep.on_front": len(selection.front)}
        )
        run.log_params({"chosen": chosen.name if chosen else "none", "action": selection.action, "rule": sweep.RULE})
        gate_table = table if chosen is None else decision.table()
        log_gate(run, decision, selection.action, gate_table, on_parent=True)
        run.set_tags({SELECTED_TAG: chosen.name if chosen else "none"}, on_parent=True)
        chosen_config = configs[chosen.name].to_json() if chosen is not None else cfg.to_json()
        return selection, chosen_config


def _candidate_outputs(
    evaluation_paths: Sequence[str | Path], decision_paths: Sequence[str | Path], quantized_dirs: Sequence[str | Path]
) -> dict[str, dict[str, Any]]:
    """Candidate name -> its evaluation, decision and quantized model directory.

    The three lists come from ``dsl.Collected`` and nothing promises they share an order, so
    they are paired by content: the gate's decision names its candidate and the quantize run
    whose model it judged; the evaluation and the model's spec carry that run id too.
    """
    evaluations = {}
    for path in evaluation_paths:
        results = read_evaluation(path)
        run_id = results.quantized.mlflow_run_id if results.quantized is not None else None
        if run_id is None:
            raise StepError(
                f"{path}: no quantized row naming its quantize run (mlflow_run_id); "
                "the select step takes the outputs of one sweep's evaluate steps"
            )
        evaluations[run_id] = (results, Path(path))
    models = {read_spec(d).mlflow_run_id: Path(d) for d in quantized_dirs}
    out: dict[str, dict[str, Any]] = {}
    for path in decision_paths:
        decision = read_decision(path)
        name, run_id = decision.candidate, decision.quantized_run_id
        if not name or run_id is None or run_id not in evaluations or run_id not in models:
            raise StepError(
                f"decision {path} does not name a candidate whose evaluation and quantized model were collected "
                f"(candidate {name!r}, quantize run {run_id!r}); "
                "the select step takes the outputs of one sweep's candidates"
            )
        results, evaluation_path = evaluations[run_id]
        out[name] = {
            "decision": decision,
            "decision_path": Path(path),
            "evaluation": results,
            "evaluation_path": evaluation_path,
            "quantized_dir": models[run_id],
        }
    return out
