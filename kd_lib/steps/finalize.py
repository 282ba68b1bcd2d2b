"""The ``finalize`` step (the DAG's exit handler): the final report logged, the parent run closed."""

from __future__ import annotations

from kd_lib import report
from kd_lib.adapters.tracking import client_for, find_parent_run, finish_pipeline_run, pipeline_record
from kd_lib.config import PipelineConfig


def final_report(
    cfg: PipelineConfig, parent_run_id: str, state: str | None = None, error: str | None = None
) -> report.ReportData:
    """The final report of a pipeline run, rebuilt from what MLflow recorded of it."""
    record = pipeline_record(client_for(cfg), parent_run_id)
    return report.from_pipeline_record(record, state=state, error=error)


def finalize(cfg: PipelineConfig, pipeline_run_id: str, state: str, error: str = "") -> str | None:
    """The DAG's exit handler: log the final report to the parent run, then close it.

    Runs whatever happened, so the report must never keep the parent run open: a report
    that cannot be built is logged as a tag and a warning, and the run is closed anyway.

    Returns:
        The parent run's id, or None when the pipeline run never opened one.
    """
    client = client_for(cfg)
    parent = find_parent_run(client, cfg.tracking.experiment, pipeline_run_id)
    if parent is not None:
        try:
            data = final_report(cfg, parent, state=state, error=error)
            client.log_text(parent, report.render_html(data), "report.html")
            client.log_text(parent, report.render_markdown(data), "report.md")
        except Exception as err:  # noqa: BLE001 - the exit handler must close the run regardless
            print(f"warning: the final report could not be built: {type(err).__name__}: {err}", flush=True)
            client.set_tag(parent, "kdflow.report_error", f"{type(err).__name__}: {err}"[:5000])
    return finish_pipeline_run(cfg, pipeline_run_id, state, error)
