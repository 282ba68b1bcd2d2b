from kfp import dsl

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def sweep_items(candidate_configs: list[str], pipeline_run_id: str) -> list[dict]:
    """The sweep's ParallelFor items: each candidate's config JSON with the pipeline run id.

    The run id rides inside the items because, on kfp.local, a ParallelFor body sees the
    job-name placeholder as its iteration's own name and gets the loop item in place of any
    other task output; items are the one input that reaches every iteration as given.
    """
    return [{"config_json": config, "pipeline_run_id": pipeline_run_id} for config in candidate_configs]
