"""`kdflow models`, `kdflow report`, help texts and error lines, against a real sqlite MLflow
store filled by real pipeline runs: the kd_lib steps run in this process, in DAG order, exactly
as the components call them (the kfp.local path is covered by tests/e2e)."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from kd_lib.config import PipelineConfig
from kd_lib.steps.distill import distill
from kd_lib.steps.evaluate import evaluate
from kd_lib.steps.finalize import finalize
from kd_lib.steps.gate import gate
from kd_lib.steps.prepare_data import prepare_data
from kd_lib.steps.quantize import quantize
from kd_lib.steps.register import register
from kd_lib.steps.train_teacher import train_teacher
from pipelines.cli import COMMANDS, build_parser, main
from tests.helpers import tiny_config


@dataclass
class Run:
    pipeline_run_id: str
    parent_run_id: str
    passed: bool


def run_pipeline_in_process(cfg: PipelineConfig, work: Path, pipeline_run_id: str) -> Run:
    """prepare -> teacher -> distill -> quantize -> evaluate -> gate -[passed]-> register, then finalize."""
    d = work / pipeline_run_id
    models: dict[str, str | Path] = {"teacher": d / "teacher", "student": d / "student", "quantized": d / "quantized"}
    prepare_data(cfg, pipeline_run_id, d / "dataset")
    train_teacher(cfg, pipeline_run_id, d / "dataset", models["teacher"], d / "teacher_history.json")
    distill(cfg, pipeline_run_id, d / "dataset", models["teacher"], models["student"], d / "student_history.json")
    quantize(cfg, pipeline_run_id, d / "dataset", models["student"], models["quantized"])
    evaluate(cfg, pipeline_run_id, d / "dataset", models, d / "evaluation.json")
    decision, action = gate(cfg, pipeline_run_id, d / "dataset", d / "evaluation.json", d / "decision.json")
    if action != "reject":
        register(cfg, pipeline_run_id, d / "dataset", models["quantized"], d / "evaluation.json", d / "decision.json")
    parent = finalize(cfg, pipeline_run_id, "SUCCEEDED")
    assert parent is not None
    return Run(pipeline_run_id, parent, decision.passed)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[PipelineConfig, list[Run]]:
    """Two passing runs (versions 1 and 2, champion on 2), then one the gate rejects."""
    work = tmp_path_factory.mktemp("cli")
    cfg = tiny_config(work)
    strict = cfg.model_copy(deep=True)
    strict.gate.min_accuracy = 0.999
    runs = [
        run_pipeline_in_process(cfg, work, "kdflow-cli-run-1"),
        run_pipeline_in_process(cfg, work, "kdflow-cli-run-2"),
        run_pipeline_in_process(strict, work, "kdflow-cli-run-3"),
    ]
    assert [r.passed for r in runs] == [True, True, False]
    return cfg, runs


def _kdflow(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _assert_two_line_error(err: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("error: ") and lines[1].startswith("fix: ")
    assert "Traceback" not in err


def test_models_lists_versions_with_aliases_gate_status_and_metrics(store, capsys) -> None:
    cfg, runs = store
    code, out, _ = _kdflow(capsys, "models", cfg.registry.model_name, "--tracking-uri", cfg.tracking.tracking_uri)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"{cfg.registry.model_name}: 2 version(s)"
    headers = ["version", "aliases", "gate", "test_acc", "size", "quantization", "created", "pipeline", "run"]
    assert lines[1].split() == headers
    rows = [line.split() for line in lines[3:]]
    assert [r[0] for r in rows] == ["2", "1"]  # newest first
    assert rows[0][1] == "@champion" and rows[1][1] == "-"
    assert [r[2] for r in rows] == ["passed", "passed"]
    assert [r[-1] for r in rows] == ["kdflow-cli-run-2", "kdflow-cli-run-1"]
    # The metrics are the ones registered on each version.
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)
    for row in rows:
        tags = client.get_model_version(cfg.registry.model_name, row[0]).tags
        assert row[3] == f"{float(tags['kdflow.test_accuracy']):.4f}"
        assert row[4:6] == [f"{int(tags['kdflow.size_bytes']) / 1e3:.1f}", "KB"]
        assert row[6] == "dynamic_int8"


def test_models_without_a_name_lists_the_registered_models(store, capsys) -> None:
    cfg, _ = store
    code, out, _ = _kdflow(capsys, "models", "--tracking-uri", cfg.tracking.tracking_uri)
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith(cfg.registry.model_name))
    assert row.split()[1:] == ["2", "2", "@champion", "->", "v2"]


def test_report_rebuilds_the_final_report_from_mlflow(store, capsys, tmp_path: Path) -> None:
    cfg, runs = store
    out_file = tmp_path / "nested" / "report.html"
    code, out, _ = _kdflow(
        capsys, "report", runs[1].parent_run_id, "-o", str(out_file), "--tracking-uri", cfg.tracking.tracking_uri
    )
    assert code == 0
    assert out.strip() == f"wrote {out_file} (pipeline run kdflow-cli-run-2: PROMOTED)"
    page = out_file.read_text()
    assert f"{cfg.registry.model_name} version 2 was registered and @champion now points to it" in page
    for section in ("decision", "models", "training", "confusion", "tradeoff", "gate", "config"):
        assert f'<section id="{section}">' in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    for b64 in images:
        Image.open(io.BytesIO(base64.b64decode(b64))).load()
    # It is the report finalize logged on the parent run, rebuilt: same sections, same decision.
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri)
    logged = Path(client.download_artifacts(runs[1].parent_run_id, "report.html", str(tmp_path))).read_text()
    assert "version 2 was registered" in logged and logged.count("<section") == page.count("<section")


def test_report_of_a_rejected_run_by_pipeline_run_id_as_markdown(store, capsys, tmp_path: Path) -> None:
    cfg, runs = store
    out_file = tmp_path / "rejected.md"
    code, out, _ = _kdflow(
        capsys, "report", runs[2].pipeline_run_id, "-o", str(out_file), "--tracking-uri", cfg.tracking.tracking_uri
    )
    assert code == 0 and out.strip().endswith("REJECTED)")
    md = out_file.read_text()
    assert "**Decision: REJECTED**" in md
    assert re.search(r"- min_accuracy: 0\.\d+ fraction, needs at least 0\.999 fraction", md)
    assert "| min_accuracy |" in md and "| FAIL |" in md


def test_errors_print_a_cause_and_a_fix_and_no_traceback(store, capsys, tmp_path: Path) -> None:
    cfg, _ = store
    uri = cfg.tracking.tracking_uri
    code, _, err = _kdflow(capsys, "models", "no-such-model", "--tracking-uri", uri)
    assert code == 1
    _assert_two_line_error(err)
    assert "'no-such-model'" in err and f"use one of: {cfg.registry.model_name}" in err

    code, _, err = _kdflow(capsys, "report", "0123456789abcdef", "--tracking-uri", uri)
    assert code == 1
    _assert_two_line_error(err)
    assert "'0123456789abcdef'" in err

    missing = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    code, _, err = _kdflow(capsys, "models", "--tracking-uri", missing)
    assert code == 1
    _assert_two_line_error(err)
    assert "no MLflow store at" in err and not (tmp_path / "elsewhere.db").exists()

    code, _, err = _kdflow(capsys, "validate", str(tmp_path / "nope.yaml"))
    assert code == 2
    _assert_two_line_error(err)

    with pytest.raises(Exception, match="0123456789abcdef"):
        main(["--debug", "report", "0123456789abcdef", "--tracking-uri", uri])


def test_every_command_and_option_is_explained_with_an_example(capsys) -> None:
    parser = build_parser()
    top = parser.format_help()
    assert "examples:" in top
    subparsers = next(a for a in parser._actions if isinstance(a.choices, dict) and "run" in a.choices)
    assert isinstance(subparsers.choices, dict)
    assert set(subparsers.choices) == set(COMMANDS)
    for name, sub in subparsers.choices.items():
        assert f"kdflow {name}" in top, name  # an example per command at the top level
        text = sub.format_help()
        assert f"examples:\n  kdflow {name}" in text or "examples:\n  MLFLOW" in text, name
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 15, (name, action.dest)
            assert "e.g." in action.help, (
                f"kdflow {name} {action.option_strings or action.dest}: no example in its help"
            )
