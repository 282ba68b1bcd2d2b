"""The Markdown summary of a report: decision, models, gate checks, training and agreement.

Short enough for the KFP UI's Markdown viewer and a terminal; the full report with plots is
:func:`kd_lib.report.html.render_html`. Cheap to produce: no plotting library is imported.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from kd_lib.report.data import ReportData
from kd_lib.report.facts import (
    candidate_table,
    check_cells,
    decision_of,
    history_summary,
    kd_gain_line,
    number,
    percent,
    ratio_text,
    role_label,
    roles,
    size_text,
)

MODEL_HEADERS = ("model", "accuracy", "macro-F1", "size", "compression", "parameters", "latency b1 p50 (ms)")
GATE_HEADERS = ("check", "value", "op", "threshold", "verdict")


def _md(value: Any) -> str:
    """A Markdown table cell: HTML-escaped (the KFP UI renders Markdown as HTML), pipes escaped."""
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A GitHub-flavoured Markdown table, one line per list item; every cell escaped by ``_md``.

    Cells are not padded to the column width (``stralign=None``): the rows read the same in the
    rendered Markdown, and a row can be found in the raw text as ``| a | b |``.
    """
    text = tabulate(
        [[_md(c) for c in row] for row in rows],
        headers=[_md(h) for h in headers],
        tablefmt="pipe",
        stralign=None,
        numalign=None,
        disable_numparse=True,  # cells are already formatted text: "85,002" must stay as it is
    )
    return text.splitlines()


def _models(data: ReportData) -> list[str]:
    teacher = data.evaluation.get("teacher", {})
    rows = []
    for role in roles(data):
        row = data.evaluation[role]
        rows.append(
            [
                role_label(data, role),
                percent(row.get("accuracy")),
                number(row.get("macro_f1")),
                size_text(row.get("size_bytes")),
                ratio_text(teacher, row),
                number(row.get("num_params")),
                number(row.get("latency_b1_p50_ms"), 3),
            ]
        )
    out = ["## Models (test split)", "", *markdown_table(MODEL_HEADERS, rows), ""]
    gain = kd_gain_line(data.evaluation)
    if gain:
        out += [f"- {_md(gain)}", ""]
    table = candidate_table(data.evaluation)
    if table:
        headers, rows, notes = table
        out += ["## Deployment candidates (validation split)", "", *markdown_table(headers, rows), ""]
        out += [f"- {_md(note)}" for note in notes] + [""]
    return out


def _gate(gate: dict[str, Any]) -> list[str]:
    rows = [[c["name"], *check_cells(c), "PASS" if c["passed"] else "FAIL"] for c in gate["checks"]]
    return ["## Gate", "", *markdown_table(GATE_HEADERS, rows), ""]


def render_markdown(data: ReportData) -> str:
    """A short Markdown summary: decision, models, gate checks, training and agreement.

    Args:
        data: What the report shows.

    Returns:
        The Markdown text; every value from the run is HTML-escaped, since the KFP UI renders
        Markdown as HTML.
    """
    d = decision_of(data)
    out = [f"# Compression report: {_md(data.name)}", "", f"**Decision: {d.verdict}**", ""]
    out += [f"- {_md(line)}" for line in d.lines] + [""]
    if data.evaluation:
        out += _models(data)
    if data.gate:
        out += _gate(data.gate)
    present = {r: rows for r, rows in data.histories.items() if rows}
    if present:
        out += ["## Training", ""] + [f"- {_md(history_summary(r, rows))}" for r, rows in present.items()] + [""]
    vs = (data.evaluation.get("quantized") or {}).get("vs_teacher")
    if vs:
        out += [
            "## Teacher vs final student",
            "",
            f"- agreement {vs['agreement'] * 100:.2f}% ({vs['n_disagree']} test samples differ): student right "
            f"{vs['other_right']}, teacher right {vs['reference_right']}, both wrong {vs['both_wrong']}",
            "",
        ]
    ids = [f"{k}: `{_md(v)}`" for k, v in data.run.items() if v]
    if ids:
        out += ["## Run", ""] + [f"- {i}" for i in ids] + [""]
    return "\n".join(out)
