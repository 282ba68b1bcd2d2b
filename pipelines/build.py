"""The DAG for a config: the sweep DAG when it has a ``sweep`` section, the single DAG otherwise.

The one entry point the compiler, the local runner and the submitter build pipelines
through; it sits above both DAG modules, which share only pipelines/chain.py.
"""

from kfp.dsl.graph_component import GraphComponent

from kd_lib.config import PipelineConfig
from pipelines.distillation import build_distillation_pipeline
from pipelines.sweep import build_sweep_pipeline


def build_pipeline(cfg: PipelineConfig | None = None, for_cluster: bool = True) -> GraphComponent:
    """The config's DAG as a KFP pipeline (see ``build_distillation_pipeline`` and
    ``build_sweep_pipeline`` for what the config and ``for_cluster`` change in it).

    Args:
        cfg: The pipeline config; None builds the default single DAG (a teacher trained in the run).
        for_cluster: Give every task its step's cluster settings (the compiled YAML);
            the local runner builds without them.
    """
    if cfg is not None and cfg.sweep is not None:
        return build_sweep_pipeline(cfg, for_cluster)
    return build_distillation_pipeline(cfg, for_cluster)
