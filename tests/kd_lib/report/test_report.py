"""The compression report renders from plain dicts: every section, every image, escaped text."""

from __future__ import annotations

import base64
import copy
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from typing import Any

import pytest
from PIL import Image

from kd_lib import report
from kd_lib.adapters.tracking import _params
from kd_lib.config import PipelineConfig
from kd_lib.evaluate.gates import decide
from kd_lib.report import ReportData

CM_TEACHER = [[9, 1, 0], [0, 10, 0], [0, 1, 9]]
CM_STUDENT = [[8, 2, 0], [0, 10, 0], [1, 1, 8]]


def _model(acc: float, size: int, params: int, cm: list[list[int]], quant: str = "none") -> dict[str, Any]:
    return {
        "accuracy": acc,
        "macro_f1": acc - 0.01,
        "size_bytes": size,
        "num_params": params,
        "latency_b1_p50_ms": 0.03,
        "latency_b1_p95_ms": 0.05,
        "latency_b64_p50_ms": 0.1,
        "latency_b64_p95_ms": 0.2,
        "predictions": [0] * 30,
        "confusion_matrix": cm,
        "quantization": quant,
        "mlflow_run_id": "r",
    }


def _history(epochs: int, start_acc: float) -> list[dict[str, Any]]:
    return [
        {
            "epoch": e,
            "train_loss": 1.0 / e,
            "val_loss": 1.2 / e,
            "val_accuracy": min(1.0, start_acc + 0.05 * e),
            "lr": 1e-3,
            "seconds": 0.1,
        }
        for e in range(1, epochs + 1)
    ]


@pytest.fixture
def data() -> ReportData:
    cfg = PipelineConfig()
    evaluation = {
        "teacher": _model(0.9333, 340_000, 85_002, CM_TEACHER),
        "student": _model(0.8667, 12_000, 2_410, CM_STUDENT),
        "quantized": _model(0.8667, 6_600, 2_410, CM_STUDENT, quant="dynamic_int8"),
    }
    evaluation["quantized"]["vs_teacher"] = {
        "agreement": 0.9,
        "n_disagree": 3,
        "other_right": 1,
        "reference_right": 2,
        "both_wrong": 0,
        "pairs": [[0, 1, 0], [0, 0, 0], [1, 1, 0]],
    }
    gate = decide(evaluation["quantized"], evaluation["teacher"], cfg.gate, fp32_student=evaluation["student"])
    return ReportData(
        name="kdflow-demo",
        evaluation=evaluation,
        histories={"teacher": _history(8, 0.5), "student": _history(12, 0.3)},
        gate=gate.to_dict(),
        thresholds=cfg.gate.model_dump(),
        registration={"model_name": "kdflow-demo-student", "version": "7", "alias": "champion"},
        state="SUCCEEDED",
        run={"pipeline_run_id": "kdflow-distillation-1", "mlflow_parent_run_id": "abc123"},
        config=cfg.model_dump(mode="json"),
        class_names=["zero", "one", "two"],
    )


class _Page(HTMLParser):
    """Collects section ids, image sources and the visible text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.text: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "section":
            self.sections.append(a.get("id") or "")
        if tag == "img":
            self.images.append(a.get("src") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def _decode(src: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:40]
    image = Image.open(io.BytesIO(base64.b64decode(src[len(prefix) :], validate=True)))
    image.load()  # decodes every pixel: a truncated PNG fails here
    return image


def test_every_section_is_present_and_every_image_decodes(data: ReportData) -> None:
    page = _parse(report.render_html(data))
    assert page.sections == list(report.SECTIONS)
    # training curves, confusion matrices, accuracy versus size
    assert len(page.images) == 3
    for src in page.images:
        image = _decode(src)
        assert image.format == "PNG"
        assert image.width > 400 and image.height > 200
    text = " ".join(page.text)
    for expected in (
        "93.33%",
        "86.67%",
        "6.6 KB",
        "85,002",
        "51.5x",
        "PROMOTED",
        "kdflow-demo-student version 7",
        "@champion",
        "min_compression_ratio",
        "PASS",
    ):
        assert expected in text, expected
    # Self-contained: nothing is fetched from anywhere.
    assert not any(tag in page.tags for tag in ("script", "link", "iframe"))
    assert "http://" not in report.render_html(data) and "https://" not in report.render_html(data)


def test_all_text_is_escaped(data: ReportData) -> None:
    hostile = "<script>alert('x')</script> & \"q\""
    data.name = hostile
    data.class_names = ["<b>a</b>", "b", "c"]
    data.registration = {"model_name": hostile, "version": "1", "alias": "<i>champion</i>"}
    data.error = hostile
    data.config["name"] = hostile
    page = report.render_html(data)
    assert "<script>" not in page and "<b>a</b>" not in page and "<i>" not in page
    assert "&lt;script&gt;" in page
    markdown = report.render_markdown(data)
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown


def test_markdown_summary(data: ReportData) -> None:
    md = report.render_markdown(data)
    assert md.startswith("# Compression report: kdflow-demo")
    assert "**Decision: PROMOTED**" in md
    assert "| student (dynamic_int8) | 86.67% |" in md
    assert "| min_accuracy | 0.8667 fraction | ≥ | 0.8 fraction | PASS |" in md
    assert "agreement 90.00% (3 test samples differ)" in md
    # Every table row has as many cells as its header.
    for block in md.split("\n\n"):
        rows = [line for line in block.splitlines() if line.startswith("|")]
        if rows:
            assert len({row.count(" | ") for row in rows if not row.startswith("|---")}) == 1, block


def test_rejection_names_each_failed_check(data: ReportData) -> None:
    cfg = PipelineConfig()
    cfg.gate.min_accuracy = 0.95
    cfg.gate.max_size_mb = 0.001
    ev = data.evaluation
    data.gate = decide(ev["quantized"], ev["teacher"], cfg.gate, fp32_student=ev["student"]).to_dict()
    data.registration = None
    decision = report.decision_of(data)
    assert decision.verdict == "REJECTED"
    failed = [line for line in decision.lines if line.startswith(("min_accuracy", "max_size_mb"))]
    assert failed == [
        "min_accuracy: 0.8667 fraction, needs at least 0.95 fraction",
        "max_size_mb: 0.0066 MB, needs at most 0.001 MB",
    ]
    assert "nothing was registered" in " ".join(decision.lines)
    assert "verdict-fail" in report.render_html(data)


def test_decision_before_the_gate_and_after_a_failure(data: ReportData) -> None:
    pending = copy.deepcopy(data)
    pending.stage, pending.registration = report.STAGE_EVALUATE, None
    assert report.decision_of(pending).verdict == "PENDING"

    failed = ReportData(name="x", stage=report.STAGE_FINAL, state="FAILED", error="prepare_data: no such file nope.npz")
    decision = report.decision_of(failed)
    assert decision.verdict == "NO DECISION"
    assert "Error: prepare_data: no such file nope.npz" in decision.lines
    page = _parse(report.render_html(failed))
    assert page.sections == list(report.SECTIONS)  # every section says what is missing
    assert page.images == []
    assert "No evaluation" in " ".join(page.text)


def test_missing_teacher_history_is_said_not_drawn(data: ReportData) -> None:
    del data.histories["teacher"]
    text = " ".join(_parse(report.render_html(data)).text)
    assert "teacher: no training history" in text
    assert "student: 12 epochs" in text


def test_gate_thresholds_are_drawn_on_the_tradeoff_plot(data: ReportData) -> None:
    fig = report.tradeoff_figure(data)
    ax = fig.axes[0]
    lines: list[Any] = list(ax.lines)  # matplotlib types get_xdata() as ArrayLike, which mypy cannot index
    horizontal = {round(line.get_ydata()[0], 6) for line in lines if line.get_ydata()[0] == line.get_ydata()[1]}
    vertical = {round(line.get_xdata()[0], 6) for line in lines if line.get_xdata()[0] == line.get_xdata()[1]}
    th = report.thresholds_of(data)
    assert round(th["min_accuracy"] * 100, 6) in horizontal
    assert round(93.33 - th["max_accuracy_drop"], 6) in horizontal
    assert round(th["max_size_mb"] * 1e3, 6) in vertical  # KB
    assert round(340.0 / th["min_compression_ratio"], 6) in vertical
    labels = ax.get_legend_handles_labels()[1]
    assert any(label.startswith("min_accuracy") for label in labels)
    # Inside the axes, so visible, even when a bar is above every model (a rejection).
    data.gate = None
    data.thresholds = dict(data.thresholds, min_accuracy=0.99, max_size_mb=0.001)
    ax = report.tradeoff_figure(data).axes[0]
    assert ax.get_ylim()[0] < 99.0 < ax.get_ylim()[1]
    assert ax.get_xlim()[0] < 1.0 < ax.get_xlim()[1]  # 0.001 MB = 1 KB


def test_pareto_front_of_a_sweep(data: ReportData) -> None:
    points = [
        {"label": "a", "accuracy": 0.80, "size_bytes": 1000},
        {"label": "b", "accuracy": 0.90, "size_bytes": 2000},
        {"label": "c", "accuracy": 0.85, "size_bytes": 3000},  # dominated by b
        {"label": "d", "accuracy": 0.95, "size_bytes": 8000},
        {"label": "e", "accuracy": 0.79, "size_bytes": 1000},  # dominated by a
    ]
    assert [p["label"] for p in report.pareto_front(points)] == ["a", "b", "d"]
    data.pareto = points
    labels = report.tradeoff_figure(data).axes[0].get_legend_handles_labels()[1]
    assert "Pareto front" in labels and "sweep candidates" in labels


def test_rebuilt_from_what_mlflow_records(data: ReportData) -> None:
    cfg = PipelineConfig()
    # The parent run's params, exactly as tracking logs them (strings; JSON for the rest).
    params = {p.key: p.value for p in _params(cfg.flat())}
    assert report.config_from_params(params) == cfg.model_dump(mode="json")
    record = {
        "parent_run_id": "abc123",
        "params": params,
        "tags": {
            "kdflow.registered_version": "3",
            "kdflow.alias": "champion",
            "kdflow.pipeline_state": "SUCCEEDED",
            "kdflow.pipeline_run_id": "kdflow-distillation-1",
        },
        "evaluation": json.loads(json.dumps(data.evaluation)),
        "gate": data.gate,
        "histories": data.histories,
        "dataset_meta": {"num_classes": 3},
    }
    rebuilt = report.from_pipeline_record(record)
    assert rebuilt.registration == {"model_name": cfg.registry.model_name, "version": "3", "alias": "champion"}
    assert rebuilt.state == "SUCCEEDED" and rebuilt.stage == report.STAGE_FINAL
    assert rebuilt.thresholds["min_accuracy"] == cfg.gate.min_accuracy
    assert report.decision_of(rebuilt).verdict == "PROMOTED"
    assert report.from_pipeline_record(record, state="FAILED", error="boom").error == "boom"


def test_from_dict_rejects_unknown_fields() -> None:
    assert ReportData.from_dict({"name": "x"}).name == "x"
    with pytest.raises(ValueError, match="evalutaion"):
        ReportData.from_dict({"evalutaion": {}})


def _gain_line(evaluation: dict[str, Any]) -> str:
    line = report.kd_gain_line(evaluation)
    assert line is not None
    return line


def test_the_kd_gain_line_says_whether_the_test_split_can_tell_the_two_apart() -> None:
    evaluation: dict[str, dict[str, Any]] = {
        "student": {"accuracy": 0.9, "kd_gain_points": 2.0},
        "baseline": {"accuracy": 0.88},
    }
    assert report.kd_gain_line({"student": evaluation["student"]}) is None  # no baseline trained
    # An evaluation written before the paired test existed keeps its one sentence.
    assert _gain_line(evaluation).startswith("KD gain: +2.00 points")
    assert "McNemar" not in _gain_line(evaluation)
    small = {"n": 100, "kd_only_right": 3, "baseline_only_right": 1, "p_value": 0.625, "significant": False}
    evaluation["student"]["kd_gain"] = small
    line = _gain_line(evaluation)
    assert "only the KD student is right on 3 and only the baseline on 1" in line
    assert "p = 0.625, not significant at 5%" in line
    clear = {"kd_only_right": 12, "baseline_only_right": 0, "p_value": 0.00049, "significant": True}
    evaluation["student"]["kd_gain"] = small | clear
    assert _gain_line(evaluation).endswith("exact McNemar p = 0.00049, significant at 5%")


def test_the_text_summary_loads_no_plotting_tensor_or_tracking_library() -> None:
    # A fresh interpreter: what importing the report and writing its Markdown pulls in.
    code = (
        "import sys, json\n"
        "from kd_lib import report\n"
        "report.render_markdown(report.ReportData(name='x'))\n"
        "print(json.dumps(sorted(m for m in ('matplotlib', 'torch', 'mlflow', 'kfp') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == []
