"""Compile the DAG to KFP IR YAML with a config baked in as the default of `config_json`."""

from pathlib import Path

from kfp import compiler

from kd_lib.config import PipelineConfig
from pipelines.distillation import distillation_pipeline


def compile_pipeline(cfg: PipelineConfig, output: str | Path) -> Path:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(
        distillation_pipeline,
        package_path=str(out),
        pipeline_name=cfg.name,
        pipeline_parameters={"config_json": cfg.to_json()},
    )
    return out
