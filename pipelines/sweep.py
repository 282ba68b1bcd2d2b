"""The sweep DAG: one teacher, many candidate students fanned out, one chosen and registered.

prepare_data -> train_teacher (or import_teacher) -> ParallelFor(candidates) { distill ->
quantize -> evaluate -> gate } -> select (Collected) -[a candidate passed]-> register, inside
the exit handler that closes the MLflow parent run. The candidate's chain is
pipelines/chain.py's, the very one the single DAG runs.

The candidates' configs are computed here, when the pipeline is built (kd_lib.evaluate.sweep.expand),
and (through sweep_items) become the ParallelFor's items: each candidate's tasks get its own
full config JSON, so the existing components run unchanged. They are fixed in the compiled
YAML; a different ``config_json`` at submit time changes the shared steps, not the candidates.
"""

import os

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent

from components import finalize, prepare_data, register, select, sweep_items
from kd_lib.config import PipelineConfig
from kd_lib.evaluate import sweep
from pipelines.chain import CHAIN_STEPS, RUN_ID, candidate_chain, training_steps
from pipelines.cluster import finish_tasks

PIPELINE_NAME = "kdflow-sweep"
# The steps each candidate runs: the shared chain (pipelines/chain.py).
CANDIDATE_STEPS = CHAIN_STEPS
# kfp.local runs at most this many ParallelFor iterations at once, whatever the parallelism.
KFP_LOCAL_MAX_PARALLELISM = 2


def local_threads(parallelism: int) -> int | None:
    """Torch (OpenMP) threads for each candidate task on this machine, or None to leave the
    default: the cores shared among the tasks kfp.local runs at once.

    Each task would otherwise start one thread per core, and two of them spin against each
    other: on 2 cores two concurrent distill steps took 29 s each with 2 threads, 5.5 s with 1.
    A user's own OMP_NUM_THREADS is left alone.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // min(parallelism, KFP_LOCAL_MAX_PARALLELISM))


def build_sweep_pipeline(cfg: PipelineConfig, for_cluster: bool = True) -> GraphComponent:
    """The sweep DAG for ``cfg`` (which must have a ``sweep`` section) as a KFP pipeline.

    ``teacher.source`` picks train_teacher or import_teacher, ``cluster.pytorchjob`` the
    PyTorchJob launchers, and ``for_cluster`` applies the cluster settings, exactly as in
    ``pipelines.distillation.build_distillation_pipeline``.
    """
    if cfg.sweep is None:
        raise ValueError(
            "build_sweep_pipeline needs a config with a sweep section; use build_distillation_pipeline otherwise"
        )
    candidates = sweep.candidate_configs(cfg)
    parallelism = cfg.sweep.parallelism
    teacher_step, teacher_step_name, distill_step = training_steps(cfg, for_cluster)

    @dsl.pipeline(
        name=PIPELINE_NAME, description="Distill, quantize, evaluate and gate candidate students; register the best."
    )
    def sweep_pipeline(config_json: str):
        finalize_task = finalize(config_json=config_json, pipeline_run_id=RUN_ID).set_display_name("finalize")
        with dsl.ExitHandler(finalize_task, name="kdflow"):
            prepare_data_task = prepare_data(config_json=config_json, pipeline_run_id=RUN_ID)
            dataset = prepare_data_task.outputs["dataset"]
            teacher_task = teacher_step(config_json=config_json, pipeline_run_id=RUN_ID, dataset=dataset)
            # Each item: a candidate's config JSON and the run id (see components/sweep_items.py).
            sweep_items_task = sweep_items(candidate_configs=candidates, pipeline_run_id=RUN_ID)
            with dsl.ParallelFor(sweep_items_task.output, parallelism=parallelism, name="candidates") as item:
                chain = candidate_chain(item.config_json, item.pipeline_run_id, dataset, teacher_task, distill_step)
            select_task = select(
                config_json=config_json,
                pipeline_run_id=RUN_ID,
                candidate_configs=candidates,
                evaluations=dsl.Collected(chain["evaluate"].outputs["evaluation"]),
                decisions=dsl.Collected(chain["gate"].outputs["decision"]),
                quantized_models=dsl.Collected(chain["quantize"].outputs["quantized"]),
            )
            # The chosen candidate only, with its own config: promote -> champion; challenger -> never.
            with dsl.If(select_task.outputs["Output"] != "reject", name="candidate-passed"):
                register_task = register(
                    config_json=select_task.outputs["selected_config"],
                    pipeline_run_id=RUN_ID,
                    dataset=dataset,
                    quantized=select_task.outputs["quantized"],
                    evaluation=select_task.outputs["evaluation"],
                    decision=select_task.outputs["decision"],
                )

        tasks = {
            "finalize": finalize_task,
            "prepare_data": prepare_data_task,
            teacher_step_name: teacher_task,
            "sweep_items": sweep_items_task,
            **chain,
            "select": select_task,
            "register": register_task,
        }
        finish_tasks(tasks, cfg, for_cluster)
        threads = None if for_cluster else local_threads(parallelism)
        if threads is not None:
            for step in CANDIDATE_STEPS:
                tasks[step].set_env_variable("OMP_NUM_THREADS", str(threads))

    return sweep_pipeline
