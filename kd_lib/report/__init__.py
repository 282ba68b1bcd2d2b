"""The compression report: one self-contained HTML page (plots inlined) plus a Markdown summary.

Pure rendering: plain dicts in (what evaluate, the training loops, the gate and the registry
recorded), strings out. No MLflow, no KFP, no torch, no file I/O; the callers decide where it
goes (the evaluate step's ``Output[HTML]``, the MLflow parent run, ``kdflow report -o``).

Modules, bottom up:
    data      ReportData and its rebuilding from what MLflow records of a run
    facts     formatted numbers, labels, the decision and one-liners shared by every format
    plots     the matplotlib figures (imported only when a plot is drawn)
    summary   the Markdown summary (tables by tabulate)
    html      the HTML page (the autoescaping jinja2 template templates/report.html.j2)

The public names are re-exported here: ``from kd_lib import report; report.render_html(data)``.
"""

from kd_lib.report.data import (
    SECTIONS,
    STAGE_EVALUATE,
    STAGE_FINAL,
    ReportData,
    config_from_params,
    from_pipeline_record,
)
from kd_lib.report.facts import (
    CHECK_MEANINGS,
    OPS,
    ROLE_LABELS,
    Decision,
    decision_of,
    headline,
    kd_gain_line,
    pareto_front,
    thresholds_of,
)
from kd_lib.report.html import render_html
from kd_lib.report.plots import ROLE_COLORS, plot_confusions, plot_tradeoff, plot_training, tradeoff_figure
from kd_lib.report.summary import render_markdown

__all__ = [
    "CHECK_MEANINGS",
    "OPS",
    "ROLE_COLORS",
    "ROLE_LABELS",
    "SECTIONS",
    "STAGE_EVALUATE",
    "STAGE_FINAL",
    "Decision",
    "ReportData",
    "config_from_params",
    "decision_of",
    "from_pipeline_record",
    "headline",
    "kd_gain_line",
    "pareto_front",
    "plot_confusions",
    "plot_training",
    "plot_tradeoff",
    "render_html",
    "render_markdown",
    "thresholds_of",
    "tradeoff_figure",
]
