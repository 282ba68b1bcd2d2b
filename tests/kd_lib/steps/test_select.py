"""The select step on hand-made candidate outputs (no training) against a real sqlite MLflow store:
pairing by content whatever the order, the chosen one handed on, the record on the parent run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from mlflow import MlflowClient

from kd_lib import report
from kd_lib.adapters import tracking
from kd_lib.config import PipelineConfig
from kd_lib.evaluate import sweep
from kd_lib.evaluate.gates import GateCheck, GateDecision
from kd_lib.steps.common import StepError
from kd_lib.steps.select import select
from tests.helpers import tiny_config

STUDENTS = [{"arch": "mlp", "params": {"width": w, "depth": 1}} for w in (8, 16, 32)]


def _cfg(tmp_path: Path) -> PipelineConfig:
    return tiny_config(tmp_path, sweep={"students": STUDENTS, "schemes": ["dynamic_int8"]})


def _outputs(
    tmp_path: Path, cfg: PipelineConfig, measured: dict[str, tuple[float, int, list[str]]]
) -> dict[str, list[Path]]:
    """Files as evaluate, quantize and gate write them, for candidate name -> (accuracy, bytes, failed checks)."""
    out: dict[str, list[Path]] = {"evaluations": [], "decisions": [], "quantized": []}
    for candidate in sweep.expand(cfg):
        accuracy, size, failed = measured[candidate.name]
        run_id = f"quantize-run-{candidate.index}"
        evaluation = {
            "teacher": {"accuracy": 0.97, "size_bytes": 400_000},
            "student": {"accuracy": accuracy, "size_bytes": size * 4},
            "quantized": {"accuracy": accuracy, "size_bytes": size, "latency_b1_p50_ms": 0.1, "mlflow_run_id": run_id},
        }
        path = tmp_path / f"{candidate.name}.evaluation.json"
        path.write_text(json.dumps(evaluation))
        out["evaluations"].append(path)
        model = tmp_path / f"{candidate.name}.quantized"
        model.mkdir()
        spec = {
            "arch": "mlp",
            "params": {"width": 8, "depth": 1},
            "input_shape": [64],
            "num_classes": 10,
            "quantization": "dynamic_int8",
            "mlflow_run_id": run_id,
            "candidate_marker": candidate.name,
        }
        (model / "spec.json").write_text(json.dumps(spec))
        checks = [GateCheck(n, 0.5, 0.8, ">=", n not in failed, "fraction") for n in ("min_accuracy", "max_size_mb")]
        decision = GateDecision(all(c.passed for c in checks), checks).to_dict()
        decision |= {
            "action": "promote" if not failed else "reject",
            "candidate": candidate.name,
            "quantized_run_id": run_id,
        }
        path = tmp_path / f"{candidate.name}.decision.json"
        path.write_text(json.dumps(decision))
        out["decisions"].append(path)
        out["quantized"].append(model)
    for paths in out.values():
        random.Random(len(paths)).shuffle(paths)  # Collected promises no order
    return out


def _select(cfg: PipelineConfig, tmp_path: Path, files: dict[str, list[Path]]):
    out = tmp_path / "out"
    result = select(
        cfg,
        "sweep-run-1",
        sweep.candidate_configs(cfg),
        files["evaluations"],
        files["decisions"],
        files["quantized"],
        out / "quantized",
        out / "evaluation.json",
        out / "decision.json",
        out / "summary.md",
    )
    return result, out


def test_the_chosen_candidate_is_handed_on_and_recorded_on_the_parent(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    names = [c.name for c in sweep.expand(cfg)]
    measured = {names[0]: (0.70, 3000, ["min_accuracy"]), names[1]: (0.90, 5000, []), names[2]: (0.95, 9000, [])}
    files = _outputs(tmp_path, cfg, measured)
    with tracking.step_run(cfg, "sweep-run-1", "prepare_data"):
        pass  # the parent run, as the DAG's first step makes it
    (selection, chosen_config), out = _select(cfg, tmp_path, files)

    assert selection.chosen.name == names[1] and selection.action == "promote"
    assert json.loads(chosen_config)["candidate"] == names[1]
    assert json.loads((out / "quantized" / "spec.json").read_text())["candidate_marker"] == names[1]
    assert json.loads((out / "evaluation.json").read_text())["quantized"]["size_bytes"] == 5000
    assert json.loads((out / "decision.json").read_text())["candidate"] == names[1]
    assert f"**{names[1]}**" in (out / "summary.md").read_text()

    client = MlflowClient(cfg.tracking.tracking_uri)
    parent = tracking.find_parent_run(client, cfg.tracking.experiment, "sweep-run-1")
    assert parent is not None  # the prepare_data run above made it
    record = tracking.pipeline_record(client, parent)
    assert record["tags"]["kdflow.sweep_selected"] == names[1]
    assert record["tags"]["kdflow.gate_status"] == "passed"
    assert record["sweep"]["chosen"] == names[1] and len(record["sweep"]["candidates"]) == 3
    assert record["gate"]["passed"] is True
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"sweep.json", "sweep.md", "sweep.txt", "sweep_front.png", "gate.json", "gate.txt"} <= artifacts
    select_run = client.get_run(record["steps"]["select"])
    assert select_run.data.params["chosen"] == names[1] and select_run.data.metrics["sweep.passed"] == 2
    # The final report draws every candidate on the accuracy-versus-size plot.
    pareto = report.from_pipeline_record(record).pareto
    assert pareto is not None
    assert [p["label"] for p in pareto] == names


def test_no_passing_candidate_leaves_placeholders_and_a_table_of_why(tmp_path: Path, capsys) -> None:
    cfg = _cfg(tmp_path)
    names = [c.name for c in sweep.expand(cfg)]
    measured = {
        n: (0.5, 3000 * (i + 1), ["min_accuracy"] + (["max_size_mb"] if i else [])) for i, n in enumerate(names)
    }
    (selection, chosen_config), out = _select(cfg, tmp_path, _outputs(tmp_path, cfg, measured))

    assert selection.chosen is None and selection.action == "reject"
    assert json.loads(chosen_config).get("sweep") is not None  # the base config: nothing to register
    assert (out / "quantized" / "NO_CANDIDATE.txt").is_file()
    decision = json.loads((out / "decision.json").read_text())
    assert decision["action"] == "reject" and decision["passed"] is False
    assert [c["name"] for c in decision["checks"]] == [f"candidate {n}" for n in names]
    printed = capsys.readouterr().out
    assert "chosen: none" in printed and all(n in printed for n in names)

    client = MlflowClient(cfg.tracking.tracking_uri)
    parent = tracking.find_parent_run(client, cfg.tracking.experiment, "sweep-run-1")
    assert parent is not None
    record = tracking.pipeline_record(client, parent)
    assert record["tags"]["kdflow.sweep_selected"] == "none"
    assert record["tags"]["kdflow.gate_status"] == "failed" and record["tags"]["kdflow.gate_action"] == "reject"
    assert "evaluate" not in record["steps"] and record["sweep"]["chosen"] is None
    assert report.decision_of(report.from_pipeline_record(record)).verdict == "REJECTED"


def test_outputs_that_do_not_match_the_candidates_are_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    names = [c.name for c in sweep.expand(cfg)]
    files = _outputs(tmp_path, cfg, {n: (0.9, 1000, []) for n in names})
    files["decisions"] = files["decisions"][:2]
    with pytest.raises(StepError, match="results for"):
        _select(cfg, tmp_path, files)
    files["evaluations"] = files["evaluations"][:1]
    with pytest.raises(
        StepError, match="does not name a candidate whose evaluation and quantized model were collected"
    ):
        _select(cfg, tmp_path, files)
