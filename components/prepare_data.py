from kfp import dsl
from kfp.dsl import Dataset, Output

from components.image import COMPONENT_OPTIONS


@dsl.component(**COMPONENT_OPTIONS)
def prepare_data(config_json: str, pipeline_run_id: str, dataset: Output[Dataset]) -> str:
    """Load, validate, split and fingerprint the data; returns the dataset fingerprint."""
    from kd_lib.steps.task import task

    with task():
        from kd_lib.config import config_from_json
        from kd_lib.steps.prepare_data import prepare_data as run_step

        meta = run_step(config_from_json(config_json), pipeline_run_id, dataset.path)
        dataset.metadata.update(
            {"fingerprint": meta["fingerprint"], "num_classes": meta["num_classes"], **meta["sizes"]}
        )
        return meta["fingerprint"]
