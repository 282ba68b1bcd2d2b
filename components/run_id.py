from kfp import dsl

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def run_id(pipeline_run_id: str) -> str:
    """Return the pipeline run id it is given, resolved outside any ParallelFor.

    kfp.local resolves the job-name placeholder inside a ParallelFor iteration to the
    iteration's own name (``<run>/for-loop-3-iteration-1``); a sweep candidate's steps take
    this task's output instead, so they nest under the one MLflow parent run everywhere.
    """
    return pipeline_run_id
