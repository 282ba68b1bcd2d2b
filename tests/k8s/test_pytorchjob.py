"""The PyTorchJob a training step renders (k8s/training/), checked offline like the rest of k8s/.

kubernetes-validate knows built-in kinds only, so a rendered job is checked in two parts:
its envelope against the PyTorchJob schema shipped in k8s/training/pytorchjob.schema.yaml
(jsonschema from the tools venv, unknown fields rejected), and each replica's pod template,
wrapped in the Job a Training Operator pod is equivalent to, by kubernetes-validate and
checkov (with the NetworkPolicy and the volume of k8s/training). The rest reads the job:
that the operator will find its container and port, that torchrun parses the arguments,
and that it agrees with the config, the RBAC Role, the staging volume and the image.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from torch.distributed.run import get_args_parser

from kd_lib.config import PipelineConfig, PyTorchJobConfig, load_config
from kd_lib.launch import pytorchjob
from tests.k8s.test_manifests import K8S, REPO, _tool_env, tool

TRAINING = K8S / "training"
ALLOWED_SKIPS = {"CKV_K8S_43", "CKV_K8S_35", "CKV_K8S_15"}  # each with its reason in the template
REQUEST, ERRORS = "/mnt/kdflow/kdflow-jobs/x/request.json", "/mnt/kdflow/kdflow-jobs/x/errors"

CONFIGS = {
    # The demo with its distillation on 2 pods x 2 processes.
    "cpu": ["cluster.pytorchjob={workers: 1}", "distill.train.distributed.nproc_per_node=2"],
    # 4 GPU pods x 2 GPUs each, a private registry, digest-pinned image.
    "gpu": [
        "cluster.pytorchjob={workers: 3, backoff_limit: 2}",
        "distill.train.device=cuda",
        "teacher.train.device=cuda",
        "distill.train.distributed.nproc_per_node=2",
        "image=registry.example.com/ml/kdflow@sha256:" + "a" * 64,
        "cluster.gpu={accelerator: nvidia.com/gpu, limit: 2, node_selector: {nvidia.com/gpu.present: 'true'}}",
        "cluster.image_pull_secrets=[regcred]",
        "cluster.step_resources={distill: {cpu_limit: '8', memory_limit: 32Gi}}",
    ],
    # One pod, several processes.
    "single-pod": ["cluster.pytorchjob={workers: 0}", "teacher.train.distributed.nproc_per_node=4"],
}


def _cfg(name: str) -> PipelineConfig:
    return load_config(REPO / "configs" / "demo.yaml", CONFIGS[name])


def _render(name: str, step: str = "distill") -> dict[str, Any]:
    return pytorchjob.render(_cfg(name), step, pytorchjob.job_name("run-1", step), "kubeflow", REQUEST, ERRORS, "run-1")


@pytest.fixture(scope="module")
def jobs() -> dict[str, dict[str, Any]]:
    return {name: _render(name, "train_teacher" if name == "single-pod" else "distill") for name in CONFIGS}


def _as_jobs(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Each replica's pod template as the batch Job its pods amount to (run to completion)."""
    out = []
    for role, replica in job["spec"]["pytorchReplicaSpecs"].items():
        template = replica["template"]
        spec = dict(template["spec"], restartPolicy=replica["restartPolicy"])
        meta = template.get("metadata", {})
        out.append(
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {
                    "name": f"{job['metadata']['name']}-{role.lower()}",
                    "namespace": job["metadata"]["namespace"],
                    "labels": meta.get("labels", {}),
                    "annotations": meta.get("annotations", {}),
                },
                "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": meta.get("labels", {})}, "spec": spec}},
            }
        )
    return out


def _strict(schema: Any) -> Any:
    """Reject fields the schema does not list (the API server would prune them silently)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def _schema_errors(docs: list[dict[str, Any]]) -> list[list[str]]:
    """jsonschema (installed in the tools venv with kubernetes-validate) on each document."""
    schema = _strict(yaml.safe_load((TRAINING / "pytorchjob.schema.yaml").read_text()))
    script = (
        "import json, sys, jsonschema\n"
        "data = json.load(sys.stdin)\n"
        "v = jsonschema.Draft7Validator(data['schema'])\n"
        "print(json.dumps([[f\"{'.'.join(map(str, e.path))}: {e.message}\" for e in v.iter_errors(d)]\n"
        "                  for d in data['docs']]))\n"
    )
    python = str(Path(tool("kubernetes-validate")).with_name("python"))
    proc = subprocess.run(
        [python, "-c", script],
        input=json.dumps({"schema": schema, "docs": docs}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_rendered_jobs_match_the_pytorchjob_schema(jobs: dict) -> None:
    assert _schema_errors(list(jobs.values())) == [[]] * len(jobs)
    # The check has teeth: a misspelt field, a bad replica count or restart policy fail it.
    broken = json.loads(json.dumps(jobs["cpu"]))
    broken["spec"]["nprocsPerNode"] = broken["spec"].pop("nprocPerNode")
    broken["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = 0
    broken["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] = "Sometimes"
    (errors,) = _schema_errors([broken])
    assert len(errors) == 3, errors


def test_pod_templates_pass_kubernetes_validate(jobs: dict, tmp_path: Path) -> None:
    objs = [j for job in jobs.values() for j in _as_jobs(job)]
    path = tmp_path / "pods.yaml"
    path.write_text(
        yaml.safe_dump_all(
            objs + [yaml.safe_load((TRAINING / f).read_text()) for f in ("staging-pvc.yaml", "network-policy.yaml")]
        )
    )
    proc = subprocess.run(
        [tool("kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count(" passed for resource ") == len(objs) + 2, proc.stdout[-2000:]


def test_pod_templates_pass_checkov(jobs: dict, tmp_path: Path) -> None:
    tool("kubectl")
    for f in ("staging-pvc.yaml", "network-policy.yaml"):
        (tmp_path / f).write_text((TRAINING / f).read_text())
    (tmp_path / "pods.yaml").write_text(yaml.safe_dump_all([j for job in jobs.values() for j in _as_jobs(job)]))
    proc = subprocess.run(
        [
            tool("checkov"),
            "-d",
            str(tmp_path),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--output",
            "json",
            "--compact",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_tool_env(),
        cwd=tmp_path,
    )
    report = json.loads(proc.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] > 50 and report["summary"]["parsing_errors"] == 0
    skipped = report["results"]["skipped_checks"]
    assert {c["check_id"] for c in skipped} == ALLOWED_SKIPS
    assert all(len(c["check_result"]["suppress_comment"]) > 20 for c in skipped)


def _container(job: dict, role: str = "Master") -> dict:
    (c,) = [
        c
        for c in job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"]
        if c["name"] == pytorchjob.CONTAINER
    ]
    return c


@pytest.mark.parametrize("name", CONFIGS)
def test_the_operator_finds_its_container_and_torchrun_parses_the_command(jobs: dict, name: str) -> None:
    job, cfg = jobs[name], _cfg(name)
    step = "train_teacher" if name == "single-pod" else "distill"
    train = cfg.teacher.train if step == "train_teacher" else cfg.distill.train
    pytorchjob_cfg = cfg.cluster.pytorchjob
    assert pytorchjob_cfg is not None  # every config in CONFIGS runs its training steps as a PyTorchJob
    pods = 1 + pytorchjob_cfg.workers
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert sum(r["replicas"] for r in replicas.values()) == pods and replicas["Master"]["replicas"] == 1
    assert ("Worker" in replicas) == (pods > 1)
    assert job["spec"]["nprocPerNode"] == str(train.distributed.nproc_per_node)
    # $(VAR) as the kubelet expands them from the env the operator adds (pod index 1 here).
    env = {"RANK": "1", "MASTER_ADDR": f"{job['metadata']['name']}-master-0", "MASTER_PORT": "23456"}
    for role in replicas:
        c = _container(job, role)
        assert [p["containerPort"] for p in c["ports"] if p["name"] == pytorchjob.PORT_NAME] == [
            pytorchjob_cfg.master_port
        ]
        argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m[1]], a) for a in c["command"] + c["args"]]
        assert argv[:3] == ["python", "-m", "torch.distributed.run"]
        args = get_args_parser().parse_args(argv[3:])
        assert (args.nnodes, args.nproc_per_node, args.node_rank, args.max_restarts) == (
            str(pods),
            str(train.distributed.nproc_per_node),
            1,
            0,
        )
        assert args.module and args.training_script == "kd_lib.launch.worker" and args.training_script_args == [REQUEST]
        assert args.master_addr == env["MASTER_ADDR"]
        assert {"name": "KDFLOW_DIST_ERROR_DIR", "value": ERRORS} in c["env"]
        assert c["image"] == cfg.image


def test_the_job_carries_the_step_settings(jobs: dict) -> None:
    cfg, job = _cfg("gpu"), jobs["gpu"]
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]
    c = _container(job, "Worker")
    assert pod["metadata"]["labels"].items() >= cfg.cluster.pod_labels.items()  # MLflow's NetworkPolicy admits them
    assert (
        pod["spec"]["serviceAccountName"] == cfg.cluster.service_account
        and pod["spec"]["automountServiceAccountToken"] is False
    )
    assert pod["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert c["resources"]["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 2}
    assert pod["spec"]["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "valueFrom" in e}
    for secret in cfg.cluster.secrets:
        for key, var in secret.env.items():
            assert refs[var] == {"name": secret.name, "key": key, "optional": secret.optional}
    assert job["spec"]["runPolicy"]["backoffLimit"] == 2
    assert not any("value" in e and "PASSWORD" in e["name"] for e in c["env"]), "credentials only by reference"


def test_the_cluster_side_agrees_with_the_job(jobs: dict) -> None:
    defaults = PyTorchJobConfig()
    objs = {
        o["kind"]: o
        for o in yaml.safe_load_all(
            subprocess.run(
                [tool("kubectl"), "kustomize", str(TRAINING)], capture_output=True, text=True, timeout=60, check=True
            ).stdout
        )
    }
    pvc, policy = objs["PersistentVolumeClaim"], objs["NetworkPolicy"]
    assert pvc["metadata"]["name"] == defaults.volume_claim and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    runner = {
        (d["kind"], d["metadata"]["name"]): d
        for d in yaml.safe_load_all((K8S / "base" / "pipeline-runner.yaml").read_text())
    }
    namespace = runner[("ServiceAccount", "kdflow-pipeline-runner")]["metadata"]["namespace"]
    assert pvc["metadata"]["namespace"] == policy["metadata"]["namespace"] == namespace
    # The launcher (running as kdflow-pipeline-runner) may create, read and delete PyTorchJobs.
    rules = runner[("Role", "kdflow-pipeline-runner")]["rules"]
    assert any(
        r["apiGroups"] == [pytorchjob.GROUP]
        and r["resources"] == [pytorchjob.PLURAL]
        and set(r["verbs"]) == {"create", "get", "delete"}
        for r in rules
    )
    for job in jobs.values():
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        claims = [
            v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v
        ]
        assert claims == [defaults.volume_claim]
        assert {"name": "staging", "mountPath": defaults.mount_path} in _container(job)["volumeMounts"]
    # The image ships the template where the launcher looks for it.
    dockerfile = (REPO / "Dockerfile").read_text()
    k8s_dir = re.search(r"KDFLOW_K8S_DIR=(\S+)", dockerfile)[1]  # type: ignore[index]
    assert f"COPY k8s/training/pytorchjob.yaml {k8s_dir}/training/pytorchjob.yaml" in dockerfile
