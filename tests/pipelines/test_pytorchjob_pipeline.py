"""``cluster.pytorchjob`` in the compiled pipeline: the training tasks launch PyTorchJobs.

Compiled YAML parsed into KFP's protos (as tests/pipelines/test_compiled_spec.py does): the
tasks keep their names, inputs and outputs (the DAG is wired the same), run the launcher
component, mount the staging volume, and leave the GPU and the step's resources to the
job's pods. The local runner ignores the setting.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import json_format

from kd_lib.config import load_config
from pipelines.build import build_pipeline
from pipelines.cluster import pytorchjob_steps
from pipelines.compile import compile_pipeline
from tests.pipelines.test_compiled_spec import DEMO, GPU_AND_SECRETS, Compiled

PYTORCHJOB = [
    "cluster.pytorchjob={workers: 3, volume_claim: shared-rwx, mount_path: /mnt/stage}",
    "distill.train.distributed.nproc_per_node=2",
]


def _compiled(tmp_path: Path, *overrides: str) -> Compiled:
    return Compiled(compile_pipeline(load_config(DEMO, [*GPU_AND_SECRETS, *overrides]), tmp_path / "pipeline.yaml"))


def test_training_tasks_launch_pytorchjobs_with_the_staging_volume(tmp_path: Path) -> None:
    plain, launched = _compiled(tmp_path / "a"), _compiled(tmp_path / "b", *PYTORCHJOB)
    for step in ("train_teacher", "distill"):
        code = " ".join(launched.container(step).args) + " ".join(launched.container(step).command)
        assert "pytorchjob.run_step(" in code and f'"{step}"' in code
        k8s = json_format.MessageToDict(launched.k8s(step))
        assert [(m["mountPath"], m["constant"]) for m in k8s["pvcMount"]] == [("/mnt/stage", "shared-rwx")]
        # The task only waits: default resources and no GPU (the job's pods get the step's).
        assert not launched.container(step).resources.accelerator.resource_count
        assert launched.container(step).resources.resource_cpu_limit == "1"
        assert plain.container(step).resources.accelerator.resource_count == "2"
        # Same interface, so the DAG is wired exactly as in-process.
        comp = f"comp-{step.replace('_', '-')}"
        for side in ("input_definitions", "output_definitions"):
            assert getattr(launched.spec.components[comp], side) == getattr(plain.spec.components[comp], side)
    assert launched.dag("comp-exit-handler-1").keys() == plain.dag("comp-exit-handler-1").keys()
    for step in ("prepare_data", "quantize", "evaluate"):
        assert launched.container(step) == plain.container(step)
        assert "pvcMount" not in json_format.MessageToDict(launched.k8s(step))


def test_only_the_configured_and_trained_steps_become_pytorchjobs(tmp_path: Path) -> None:
    cfg = load_config(DEMO, [*PYTORCHJOB, "cluster.pytorchjob.steps=[distill]"])
    assert pytorchjob_steps(cfg) == {"distill"}
    imported = load_config(DEMO, [*PYTORCHJOB, "teacher.source=mlflow", "teacher.uri=models:/teacher@champion"])
    assert pytorchjob_steps(imported) == {"distill"}
    compiled = _compiled(tmp_path, *PYTORCHJOB, "cluster.pytorchjob.steps=[distill]")
    assert "pytorchjob.run_step(" not in " ".join(compiled.container("train_teacher").args)
    assert compiled.container("train_teacher").resources.accelerator.resource_count == "2"


@pytest.mark.parametrize("for_cluster", [False, True])
def test_the_local_build_runs_the_steps_in_process(for_cluster: bool) -> None:
    cfg = load_config(DEMO, PYTORCHJOB)
    pipeline = build_pipeline(cfg, for_cluster=for_cluster)
    code = pipeline.pipeline_spec.deployment_spec["executors"]["exec-distill"]["container"]["command"][-1]
    assert ("pytorchjob.run_step(" in code) == for_cluster
