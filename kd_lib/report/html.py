"""The compression report as one self-contained HTML page (plots inlined as base64 PNGs).

Python gathers what each section shows as plain values (:func:`page_context`); the page itself
is the jinja2 template ``templates/report.html.j2``, rendered with autoescaping on, so every
value from a run (model names, class names, error messages, the config) is escaped there and
no string is ever marked safe here.
"""

from __future__ import annotations

import datetime as _dt
from typing import Any

import jinja2
import yaml

from kd_lib.report.data import STAGE_FINAL, ReportData
from kd_lib.report.facts import (
    candidate_table,
    check_cells,
    check_meaning,
    class_names,
    decision_of,
    history_summary,
    kd_gain_line,
    latency_batch_sizes,
    number,
    percent,
    ratio_text,
    role_label,
    roles,
    size_text,
)
from kd_lib.report.plots import plot_confusions, plot_tradeoff, plot_training

TEMPLATE = "report.html.j2"
GATE_HEADERS = ("check", "measures", "value", "op", "threshold", "verdict")

# One environment per process: the template is parsed once and cached by the loader.
# StrictUndefined: a context key the template names but page_context forgot is an error, not "".
_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("kd_lib.report", "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


def _header(data: ReportData) -> list[tuple[str, str]]:
    run = data.run
    items = [
        ("pipeline run", run.get("pipeline_run_id")),
        ("MLflow parent run", run.get("mlflow_parent_run_id")),
        ("dataset", (run.get("dataset_fingerprint") or "")[:12]),
        ("config hash", (run.get("config_hash") or "")[:12]),
        ("state", data.state),
        ("report", "final" if data.stage == STAGE_FINAL else "written by the evaluate step"),
        ("generated", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]
    return [(key, str(value)) for key, value in items if value]


def _models(data: ReportData) -> dict[str, Any] | None:
    present = roles(data)
    if not present:
        return None
    teacher = data.evaluation.get("teacher", {})
    batch_sizes = latency_batch_sizes([data.evaluation[r] for r in present])
    headers = ["model", "accuracy", "Δ vs teacher", "macro-F1", "size", "compression", "parameters"]
    headers += [f"latency b{bs} p50 / p95 (ms)" for bs in batch_sizes]
    rows = []
    for role in present:
        row = data.evaluation[role]
        delta = "–"
        if role != "teacher" and "accuracy" in teacher and "accuracy" in row:
            delta = f"{(row['accuracy'] - teacher['accuracy']) * 100:+.2f} pts"
        cells = [
            role_label(data, role),
            percent(row.get("accuracy")),
            delta,
            number(row.get("macro_f1")),
            size_text(row.get("size_bytes")),
            ratio_text(teacher, row),
            number(row.get("num_params")),
        ]
        for bs in batch_sizes:
            p50, p95 = row.get(f"latency_b{bs}_p50_ms"), row.get(f"latency_b{bs}_p95_ms")
            cells.append(f"{number(p50, 3)} / {number(p95, 3)}")
        rows.append(cells)
    table = candidate_table(data.evaluation)
    candidates = {"headers": table[0], "rows": table[1], "notes": table[2]} if table else None
    return {"headers": headers, "rows": rows, "gain": kd_gain_line(data.evaluation), "candidates": candidates}


def _training(data: ReportData) -> dict[str, Any] | None:
    present = {r: rows for r, rows in data.histories.items() if rows}
    if not present:
        return None
    lacking = [r for r in ("teacher", "student") if r not in present]
    notes = [history_summary(r, rows) for r, rows in present.items()]
    notes += [f"{r}: no training history (imported or not trained in this run)" for r in lacking]
    return {"png": plot_training(present), "notes": notes}


def _confusion(data: ReportData) -> dict[str, Any] | None:
    teacher = data.evaluation.get("teacher", {})
    final = data.evaluation.get("quantized") or data.evaluation.get("student") or {}
    final_role = "quantized" if "quantized" in data.evaluation else "student"
    if "confusion_matrix" not in teacher and "confusion_matrix" not in final:
        return None
    n = len(teacher.get("confusion_matrix") or final["confusion_matrix"])  # one of the two is there
    vs = final.get("vs_teacher") or {}
    png = plot_confusions(
        teacher.get("confusion_matrix"),
        final.get("confusion_matrix"),
        vs.get("pairs"),
        class_names(data, n),
        role_label(data, final_role),
    )
    stats = []
    if vs:
        n_total = sum(map(sum, final["confusion_matrix"]))
        stats = [
            f"teacher and final student agree on {vs['agreement'] * 100:.2f}% of the test set "
            f"({vs['n_disagree']} of {n_total} samples differ)",
            f"of the {vs['n_disagree']} samples where they differ, the student is right on {vs['other_right']}, "
            f"the teacher on {vs['reference_right']}, and neither on {vs['both_wrong']}",
        ]
    return {"png": png, "stats": stats}


def _tradeoff(data: ReportData) -> dict[str, Any] | None:
    if not any("size_bytes" in row for row in data.evaluation.values()):
        return None
    return {"png": plot_tradeoff(data), "pareto": bool(data.pareto)}


def _gate(data: ReportData) -> dict[str, Any] | None:
    if not data.gate:
        return None
    checks = []
    for c in data.gate["checks"]:
        value, op, threshold = check_cells(c)
        checks.append(
            {
                "name": c["name"],
                "meaning": check_meaning(c["name"]),
                "value": value,
                "op": op,
                "threshold": threshold,
                "passed": bool(c["passed"]),
            }
        )
    return {"headers": GATE_HEADERS, "checks": checks, "passed": bool(data.gate.get("passed"))}


def page_context(data: ReportData) -> dict[str, Any]:
    """What the template shows, as plain values; a section's entry is None when it has nothing.

    Args:
        data: What the report shows.

    Returns:
        The template's context: ``name``, ``meta`` (header key/value pairs), ``decision``
        (:class:`~kd_lib.report.facts.Decision`) and one entry per section of
        :data:`~kd_lib.report.data.SECTIONS` after it (``config_yaml`` for the config).
    """
    return {
        "name": data.name,
        "meta": _header(data),
        "decision": decision_of(data),
        "models": _models(data),
        "training": _training(data),
        "confusion": _confusion(data),
        "tradeoff": _tradeoff(data),
        "gate": _gate(data),
        "config_yaml": yaml.safe_dump(data.config, sort_keys=False).rstrip() if data.config else None,
    }


def render_html(data: ReportData) -> str:
    """The whole report as one self-contained HTML document (no external resources).

    Args:
        data: What the report shows.

    Returns:
        The HTML page; its sections carry the ids of :data:`~kd_lib.report.data.SECTIONS`,
        in that order, each saying what is missing when it has nothing to show.
    """
    return _ENV.get_template(TEMPLATE).render(page_context(data))
