"""The single kdflow DAG, read top to bottom like the diagram in docs/architecture.md.

prepare_data -> train_teacher (or import_teacher) -> distill -> quantize -> evaluate -> gate
-[not rejected]-> register, all inside an exit handler that closes the MLflow parent run
whatever happens. The chain distill -> gate is pipelines/chain.py's, shared with the sweep
DAG; pipelines/build.py picks this DAG or the sweep's for a config.
"""

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent

from components import finalize, prepare_data, register
from kd_lib.config import PipelineConfig
from pipelines.chain import RUN_ID, candidate_chain, training_steps
from pipelines.cluster import finish_tasks

PIPELINE_NAME = "kdflow-distillation"


def build_distillation_pipeline(cfg: PipelineConfig | None = None, for_cluster: bool = True) -> GraphComponent:
    """The single DAG as a KFP pipeline (a config's ``sweep`` section is not looked at here).

    ``teacher.source`` other than ``train`` puts an ``import_teacher`` task where
    ``train_teacher`` would be (no training step at all). With ``for_cluster``, every task
    also gets the cluster settings of its step (image, requests and limits, GPU, Secrets as
    environment, pod labels), which KFP only accepts while the pipeline function runs; the
    local runner builds it without them. With ``cluster.pytorchjob`` the cluster build's
    training steps launch Training Operator PyTorchJobs (same inputs and outputs); locally
    they run in-process, or under torchrun when ``nproc_per_node > 1``.
    """
    teacher_step, teacher_step_name, distill_step = training_steps(cfg, for_cluster)

    @dsl.pipeline(name=PIPELINE_NAME, description="Distill, quantize, evaluate, gate and register a student model.")
    def distillation_pipeline(config_json: str):
        finalize_task = finalize(config_json=config_json, pipeline_run_id=RUN_ID).set_display_name("finalize")
        with dsl.ExitHandler(finalize_task, name="kdflow"):
            prepare_data_task = prepare_data(config_json=config_json, pipeline_run_id=RUN_ID)
            dataset = prepare_data_task.outputs["dataset"]
            teacher_task = teacher_step(config_json=config_json, pipeline_run_id=RUN_ID, dataset=dataset)
            chain = candidate_chain(config_json, RUN_ID, dataset, teacher_task, distill_step)
            # promote -> registered + champion; challenger -> registered, rejected, never champion.
            with dsl.If(chain["gate"].outputs["Output"] != "reject", name="gate-passed"):
                register_task = register(
                    config_json=config_json,
                    pipeline_run_id=RUN_ID,
                    dataset=dataset,
                    quantized=chain["quantize"].outputs["quantized"],
                    evaluation=chain["evaluate"].outputs["evaluation"],
                    decision=chain["gate"].outputs["decision"],
                )

        tasks = {
            "finalize": finalize_task,
            "prepare_data": prepare_data_task,
            teacher_step_name: teacher_task,
            **chain,
            "register": register_task,
        }
        finish_tasks(tasks, cfg, for_cluster)

    return distillation_pipeline


# The default DAG (a teacher trained in the run), without cluster settings.
distillation_pipeline = build_distillation_pipeline()
