"""A training step as a PyTorchJob: created, followed and collected through the Kubernetes API.

The Kubernetes API server is MOCKED: no cluster can run here, so the real ``kubernetes``
client talks to ``tests/kd_lib/launch/fake_k8s_api.py``, a stand-in server on 127.0.0.1 that speaks
the custom-objects endpoints and moves the job through its conditions. Everything on this
side of the API (staging, rendering, waiting, error reporting, collecting) is the real code;
the last test even runs the rendered Master command (torchrun and kdflow's worker) the way a
pod would.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kd_lib.compress import quantization
from kd_lib.config import ConfigError, GpuConfig, PipelineConfig, parse_config
from kd_lib.launch import pytorchjob
from kd_lib.steps.prepare_data import prepare_data
from tests.helpers import tiny_config
from tests.kd_lib.launch.fake_k8s_api import FakeKubernetesApi

NS = "kubeflow"
RUN = "kdflow-run-7"


def _cfg(tmp_path: Path, **pytorchjob_fields: object) -> PipelineConfig:
    fields = {"mount_path": str(tmp_path / "pvc"), "namespace": NS, "poll_s": 0.05, "workers": 1} | pytorchjob_fields
    return tiny_config(
        tmp_path,
        distill={"train": {"epochs": 2, "batch_size": 64, "distributed": {"nproc_per_node": 2}}},
        cluster={"pytorchjob": fields},
    )


def _inputs(tmp_path: Path) -> dict[str, str | Path]:
    for name in ("dataset", "teacher"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "payload.bin").write_bytes(name.encode())
    return {"dataset_dir": tmp_path / "dataset", "teacher_dir": tmp_path / "teacher"}


def _outputs(tmp_path: Path) -> dict[str, str | Path]:
    return {"student_dir": tmp_path / "artifacts" / "student", "history_path": tmp_path / "artifacts" / "history.json"}


def _stage(cfg: PipelineConfig, step: str = "distill") -> Path:
    job = cfg.cluster.pytorchjob
    assert job is not None  # every config here has a cluster.pytorchjob section (_cfg)
    return Path(job.mount_path) / "kdflow-jobs" / pytorchjob.job_name(RUN, step)


def _play_rank_0(cfg: PipelineConfig):
    """What rank 0 of the job leaves on the volume when it succeeds (the mocked part)."""

    def on_phase(phase: str, job: dict) -> None:
        if phase != "Succeeded":
            return
        request = json.loads((_stage(cfg) / "request.json").read_text())
        out = Path(request["paths"]["student_dir"])
        out.mkdir(parents=True)
        (out / "weights.safetensors").write_bytes(b"student")
        Path(request["paths"]["history_path"]).write_text(json.dumps([{"epoch": 1}, {"epoch": 2}]))
        summary = {"best_epoch": 2, "best_val_accuracy": 0.9, "epochs_run": 2, "stopped_early": False, "run_id": "r0"}
        Path(request["summary_path"]).write_text(json.dumps(summary))

    return on_phase


def test_the_job_is_created_followed_and_its_outputs_collected(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    lines: list[str] = []
    with FakeKubernetesApi(on_phase=_play_rank_0(cfg)) as k8s:
        summary = pytorchjob.run_step(
            cfg, "distill", RUN, _inputs(tmp_path), _outputs(tmp_path), api=k8s.api(), log=lines.append
        )

    assert summary["best_val_accuracy"] == 0.9 and summary["run_id"] == "r0"
    assert (tmp_path / "artifacts" / "student" / "weights.safetensors").read_bytes() == b"student"
    assert json.loads((tmp_path / "artifacts" / "history.json").read_text()) == [{"epoch": 1}, {"epoch": 2}]
    assert not _stage(cfg).exists(), "the staged copies are removed once they are the task's artifacts"
    # What the API received: the rendered job, in the pipeline's namespace.
    (create,) = k8s.calls("POST")
    job = create.body
    assert create.namespace == NS == job["metadata"]["namespace"]
    assert job["metadata"]["name"] == pytorchjob.job_name(RUN, "distill")
    assert job["metadata"]["annotations"]["kdflow.io/pipeline-run-id"] == RUN
    assert job["spec"]["nprocPerNode"] == "2"
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    args = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["args"]
    assert args[-3:] == ["-m", "kd_lib.launch.worker", str(_stage(cfg) / "request.json")]
    assert "--nnodes=2" in args and "--nproc-per-node=2" in args
    assert any("world size 4" in line for line in lines)
    states = [line.split(": ", 1)[1].split(" ")[0] for line in lines if line.startswith("PyTorchJob ")]
    assert states == ["Created", "Running", "Succeeded"]
    assert not k8s.calls("DELETE")


def test_a_failed_job_fails_the_task_with_the_failing_rank_error(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)

    def rank_2_dies(phase: str, job: dict) -> None:
        if phase == "Running":
            errors = _stage(cfg) / "errors"
            errors.mkdir(parents=True)
            (errors / "rank-2.json").write_text(
                json.dumps(
                    {
                        "rank": "2",
                        "world_size": "4",
                        "host": "kdflow-distill-x-worker-0",
                        "time": time.time(),
                        "type": "ValueError",
                        "message": "the student does not fit the data",
                        "traceback": "Traceback ...",
                        "terminated": False,
                    }
                )
            )

    with FakeKubernetesApi(phases=["Created", "Running", "Failed"], on_phase=rank_2_dies) as k8s:
        with pytest.raises(
            pytorchjob.PyTorchJobError,
            match=r"failed: rank 2 of 4 \(on kdflow-distill-x-worker-0\) failed: ValueError: the student does not fit",
        ):
            pytorchjob.run_step(
                cfg, "distill", RUN, _inputs(tmp_path), _outputs(tmp_path), api=k8s.api(), log=lambda _: None
            )
    assert (_stage(cfg) / "in" / "dataset_dir" / "payload.bin").is_file(), "kept for a retry to resume"


def test_a_job_that_does_not_finish_in_time_is_deleted(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, timeout_s=0.3)
    with FakeKubernetesApi(phases=["Created", "Running"]) as k8s:
        with pytest.raises(
            pytorchjob.PyTorchJobError,
            match=r"did not finish within cluster.pytorchjob.timeout_s = 0.3 s \(last state Running\); deleted it",
        ):
            pytorchjob.run_step(
                cfg, "distill", RUN, _inputs(tmp_path), _outputs(tmp_path), api=k8s.api(), log=lambda _: None
            )
        (deleted,) = k8s.calls("DELETE")
        assert (
            deleted.name == pytorchjob.job_name(RUN, "distill") and deleted.query["propagationPolicy"] == "Background"
        )
        assert not k8s.jobs


def test_a_retried_task_follows_a_live_job_and_replaces_a_failed_one(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    name = pytorchjob.job_name(RUN, "distill")
    # Running: an earlier attempt of the task died, its job did not; follow it until it ends.
    with FakeKubernetesApi(on_phase=_play_rank_0(cfg)) as k8s:
        k8s.add_existing(name, NS, "Running")
        k8s.route = _finish_after(k8s, name, reads=3)  # type: ignore[method-assign]
        assert pytorchjob.run_step(
            cfg, "distill", RUN, _inputs(tmp_path / "a"), _outputs(tmp_path / "a"), api=k8s.api(), log=print
        )
        assert len(k8s.calls("POST")) == 1 and not k8s.calls("DELETE")  # the one answered 409
    # Failed: replaced by a fresh job (which resumes from rank 0's checkpoint on the volume).
    with FakeKubernetesApi(on_phase=_play_rank_0(cfg)) as k8s:
        k8s.add_existing(name, NS, "Failed")
        assert pytorchjob.run_step(
            cfg, "distill", RUN, _inputs(tmp_path / "b"), _outputs(tmp_path / "b"), api=k8s.api(), log=print
        )
        assert [r.method for r in k8s.requests if r.method != "GET"] == ["POST", "DELETE", "POST"]


def _finish_after(k8s: FakeKubernetesApi, name: str, reads: int):
    """Let the stuck job of an earlier attempt succeed after a few status reads."""
    route, seen = k8s.route, []

    def finishing(req):
        if req.method == "GET" and req.name == name:
            seen.append(req)
            if len(seen) == reads:
                k8s._frozen.pop(name)
                k8s._reads[name], k8s._reported[name], k8s.phases = 0, set(), ["Succeeded"]
        return route(req)

    return finishing


@pytest.mark.parametrize(
    ("status", "reason", "fix"),
    [
        (403, "Forbidden", "pytorchjobs rule of the kdflow-pipeline-runner Role"),
        (404, "NotFound", "install the Kubeflow Training Operator"),
    ],
)
def test_api_refusals_say_what_to_fix(tmp_path: Path, status: int, reason: str, fix: str) -> None:
    cfg = _cfg(tmp_path)
    with FakeKubernetesApi(create_error=(status, reason)) as k8s:
        with pytest.raises(pytorchjob.PyTorchJobError, match=rf"HTTP {status}.*{fix}"):
            pytorchjob.run_step(
                cfg, "distill", RUN, _inputs(tmp_path), _outputs(tmp_path), api=k8s.api(), log=lambda _: None
            )


def test_a_gpu_named_by_a_kfp_accelerator_type_is_refused(tmp_path: Path) -> None:
    gpu = {
        "distill": {"train": {"device": "cuda"}},
        "cluster": {"pytorchjob": {}, "gpu": {"accelerator": "NVIDIA_TESLA_T4"}},
    }
    with pytest.raises(ConfigError, match="cluster.gpu.accelerator 'NVIDIA_TESLA_T4' is a KFP accelerator type"):
        parse_config(gpu | {"teacher": {"train": {"device": "cuda"}}})  # at config load, before anything runs
    cfg = _cfg(tmp_path)
    cfg.distill.train.device = "cuda"
    cfg.cluster.gpu = GpuConfig(
        accelerator="NVIDIA_TESLA_T4", steps=["distill"]
    )  # assignment is not re-validated above
    with pytest.raises(ConfigError, match="cluster.gpu.accelerator 'NVIDIA_TESLA_T4' is a KFP accelerator type"):
        pytorchjob.render(cfg, "distill", "kdflow-distill-x", NS, "/mnt/r.json", "/mnt/e")
    with pytest.raises(ConfigError, match="cluster.pytorchjob is not set"):
        pytorchjob.render(tiny_config(tmp_path), "distill", "kdflow-distill-x", NS, "/mnt/r.json", "/mnt/e")


@pytest.mark.e2e
@pytest.mark.slow
def test_the_rendered_master_command_runs_the_step_on_two_ranks(tmp_path: Path) -> None:
    """The fake plays operator and kubelet: it runs the Master pod's command (torchrun with the
    rendered arguments, kdflow's worker, the Secrets as env) as a local process."""
    cfg = tiny_config(
        tmp_path,
        teacher={
            "train": {"epochs": 2, "batch_size": 64, "distributed": {"nproc_per_node": 2, "threads_per_process": 1}}
        },
        cluster={
            "pytorchjob": {
                "mount_path": str(tmp_path / "pvc"),
                "namespace": NS,
                "poll_s": 0.2,
                "workers": 0,
                "timeout_s": 300,
            }
        },
        tracking={"tracking_uri": None},  # from the kdflow-mlflow Secret, as on the cluster
    )
    secrets = {"kdflow-mlflow": {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}}
    dataset = tmp_path / "dataset"
    prepare_data(
        cfg.model_copy(
            update={
                "tracking": cfg.tracking.model_copy(
                    update={"tracking_uri": secrets["kdflow-mlflow"]["MLFLOW_TRACKING_URI"]}
                )
            }
        ),
        RUN,
        dataset,
    )
    outputs: dict[str, str | Path] = {
        "teacher_dir": tmp_path / "artifacts" / "teacher",
        "history_path": tmp_path / "artifacts" / "history.json",
    }
    with FakeKubernetesApi(run_master=True, secrets=secrets, master_log=str(tmp_path / "master.log")) as k8s:
        summary = pytorchjob.run_step(
            cfg, "train_teacher", RUN, {"dataset_dir": dataset}, outputs, api=k8s.api(), log=print
        )
    assert summary["epochs_run"] == 2
    model, spec = quantization.load_model(outputs["teacher_dir"])
    assert spec["mlflow_run_id"] == summary["run_id"]
    assert len(json.loads(Path(outputs["history_path"]).read_text())) == 2
    assert not (tmp_path / "pvc" / "kdflow-jobs").exists() or not any((tmp_path / "pvc" / "kdflow-jobs").iterdir())
