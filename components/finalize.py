from kfp import dsl

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def finalize(config_json: str, pipeline_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: close the parent MLflow run as FINISHED or FAILED, whatever happened."""
    from kd_lib.steps.task import task

    with task():
        from kd_lib.config import config_from_json
        from kd_lib.steps.finalize import finalize as run_step

        run_step(config_from_json(config_json), pipeline_run_id, status.state, status.error_message or "")
