"""Compile the DAG to KFP IR YAML with a config baked in as the default of `config_json`.

The config's `image` and `cluster` sections become per-task settings in the YAML (see
pipelines/cluster.py); the pipeline's only parameter stays `config_json`.
"""

from pathlib import Path

from kfp import compiler

from kd_lib.config import PipelineConfig
from pipelines.build import build_pipeline


def compile_pipeline(cfg: PipelineConfig, output: str | Path) -> Path:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(
        build_pipeline(cfg),
        package_path=str(out),
        pipeline_name=cfg.name,
        pipeline_parameters={"config_json": cfg.to_json()},
    )
    return out
