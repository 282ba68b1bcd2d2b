"""Deprecated location of the report's public names, kept while callers move to ``kd_lib.report``.

``from kd_lib.report import render as report`` keeps working (``report.render_html``, ...);
new code writes ``from kd_lib import report``. Remove once nothing imports this module.
"""

from kd_lib.report import (
    CHECK_MEANINGS,
    OPS,
    ROLE_COLORS,
    ROLE_LABELS,
    SECTIONS,
    STAGE_EVALUATE,
    STAGE_FINAL,
    Decision,
    ReportData,
    config_from_params,
    decision_of,
    from_pipeline_record,
    headline,
    kd_gain_line,
    pareto_front,
    plot_confusions,
    plot_tradeoff,
    plot_training,
    render_html,
    render_markdown,
    thresholds_of,
    tradeoff_figure,
)

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
