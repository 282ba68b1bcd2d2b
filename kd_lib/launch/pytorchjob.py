"""A training step as a Kubeflow Training Operator ``PyTorchJob``: stage, render, create, wait, collect.

With ``cluster.pytorchjob`` set, the pipeline's task for ``train_teacher`` / ``distill`` runs
``run_step`` instead of the step itself (components/pytorchjob.py). It

1. copies the task's input artifacts onto the staging volume (``volume_claim``), the only
   storage both the task's pod and the training pods mount, and writes the request the
   ranks read (``kd_lib.launch.worker``);
2. renders ``k8s/training/pytorchjob.yaml`` for the step: Master + ``workers`` Worker pods
   of the kdflow image, each running torchrun with ``nproc_per_node`` ranks, with the step's
   Secrets-as-env, labels, resources and GPU;
3. creates it with the Kubernetes API and polls it, printing every status change, until it
   Succeeded or Failed, or ``timeout_s`` passed (then it deletes the job);
4. copies what rank 0 wrote (model, history, summary) into the task's output artifacts.

Rank 0 of the job runs the step function itself, so the MLflow run, the checkpoints and
the model are the ones an in-process step makes. This is the only module importing
``kubernetes``; tests point it at a stand-in API server.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from kd_lib.config import ConfigError, PipelineConfig
from kd_lib.errors import KdflowError
from kd_lib.launch import torchrun

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER = "pytorch"  # the Training Operator finds the training container by this name
PORT_NAME = "pytorchjob-port"  # ... and the rendezvous port by this one
TEMPLATE = Path("training") / "pytorchjob.yaml"
# Where the image keeps k8s/ (a checkout has it beside the package).
K8S_DIR_ENV = "KDFLOW_K8S_DIR"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
STEPS = ("train_teacher", "distill")

Log = Callable[[str], None]


class PyTorchJobError(KdflowError, RuntimeError):
    """The job could not be created, failed, or did not finish in time; the message says which and why."""


def template_path() -> Path:
    """``k8s/training/pytorchjob.yaml``: under ``$KDFLOW_K8S_DIR`` (the image), else in this checkout."""
    root = os.environ.get(K8S_DIR_ENV)
    return (Path(root) if root else Path(__file__).resolve().parents[2] / "k8s") / TEMPLATE


def load_template(path: str | Path | None = None) -> dict[str, Any]:
    """The manifest template as a dict (YAML anchors resolved)."""
    path = Path(path) if path is not None else template_path()
    try:
        return yaml.safe_load(path.read_text())
    except OSError as err:
        raise PyTorchJobError(
            f"{path}: cannot read the PyTorchJob template ({err.strerror}); set ${K8S_DIR_ENV} to the k8s/ directory"
        ) from None


def job_name(pipeline_run_id: str, step: str) -> str:
    """``kdflow-<step>-<hash>``: the same for every attempt of one step of one pipeline run, so a
    retried launcher finds the job its predecessor created."""
    digest = hashlib.sha256(f"{pipeline_run_id}/{step}".encode()).hexdigest()[:10]
    return f"kdflow-{step.replace('_', '-')}-{digest}"


def _train_cfg(cfg: PipelineConfig, step: str) -> Any:
    if step not in STEPS:
        raise ValueError(f"step {step!r} does not train; PyTorchJob steps are {', '.join(STEPS)}")
    return cfg.teacher.train if step == "train_teacher" else cfg.distill.train


def render(
    cfg: PipelineConfig,
    step: str,
    name: str,
    namespace: str,
    request_path: str,
    error_dir: str,
    pipeline_run_id: str = "",
    template: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The PyTorchJob of one step: the template with this run's fields filled in.

    Args:
        cfg: The pipeline config; ``cluster.pytorchjob`` must be set.
        step: ``train_teacher`` or ``distill``.
        name: The job's name (``job_name``).
        namespace: Where the job runs (the pipeline's namespace: the Secrets and the volume are there).
        request_path: The request file every rank reads, on the staging volume.
        error_dir: Where ranks record the exception they die of, on the staging volume.
        pipeline_run_id: Recorded as an annotation, to find the job of a run.
        template: The parsed template; ``k8s/training/pytorchjob.yaml`` when None.

    Raises:
        ConfigError: no ``cluster.pytorchjob``, or a GPU named by a KFP accelerator type.
    """
    pj = cfg.cluster.pytorchjob
    if pj is None:
        raise ConfigError("cluster.pytorchjob is not set: a step runs as a PyTorchJob only when it is")
    cluster, train = cfg.cluster, _train_cfg(cfg, step)
    job = copy.deepcopy(template if template is not None else load_template())
    nproc = train.distributed.nproc_per_node

    meta = job["metadata"]
    meta["name"], meta["namespace"] = name, namespace
    meta["labels"] = dict(meta.get("labels") or {}) | {"kdflow.io/step": step}
    meta["annotations"] = dict(meta.get("annotations") or {}) | {"kdflow.io/pipeline-run-id": pipeline_run_id}
    spec = job["spec"]
    spec["nprocPerNode"] = str(nproc)
    spec["runPolicy"] = dict(spec.get("runPolicy") or {}) | {
        "backoffLimit": pj.backoff_limit,
        "ttlSecondsAfterFinished": pj.ttl_seconds_after_finished,
    }

    replicas = spec["pytorchReplicaSpecs"]
    pod = replicas["Master"]["template"]
    pod["metadata"] = dict(pod.get("metadata") or {})
    pod["metadata"]["labels"] = (
        dict(pod["metadata"].get("labels") or {}) | dict(cluster.pod_labels) | {"kdflow.io/step": step}
    )
    pod_spec = pod["spec"]
    if cluster.service_account:
        pod_spec["serviceAccountName"] = cluster.service_account
    else:
        pod_spec.pop("serviceAccountName", None)
    if cluster.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in cluster.image_pull_secrets]
    for volume in pod_spec["volumes"]:
        if "persistentVolumeClaim" in volume:
            volume["persistentVolumeClaim"]["claimName"] = pj.volume_claim

    (container,) = [c for c in pod_spec["containers"] if c["name"] == CONTAINER]
    container["image"] = cfg.image
    container["imagePullPolicy"] = cluster.image_pull_policy
    container["args"] = [
        f"--nnodes={1 + pj.workers}",
        f"--nproc-per-node={nproc}",
        # Expanded by the kubelet from the env the Training Operator adds to every pod.
        "--node-rank=$(RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        # A failed rank fails the job at once; the operator's backoffLimit restarts it whole.
        "--max-restarts=0",
        "-m",
        torchrun.WORKER_MODULE,
        request_path,
    ]
    for port in container["ports"]:
        if port["name"] == PORT_NAME:
            port["containerPort"] = pj.master_port
    for mount in container["volumeMounts"]:
        if any(v["name"] == mount["name"] and "persistentVolumeClaim" in v for v in pod_spec["volumes"]):
            mount["mountPath"] = pj.mount_path
    env = [e for e in container.get("env", []) if e["name"] != torchrun.ERROR_DIR_ENV]
    env.append({"name": torchrun.ERROR_DIR_ENV, "value": error_dir})
    # Credentials reach the ranks as the step's do: env resolved by the kubelet from Secrets.
    for secret in cluster.secrets:
        for key, var in secret.env.items():
            env.append(
                {
                    "name": var,
                    "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key, "optional": secret.optional}},
                }
            )
    container["env"] = env

    res = cluster.resources_for(step)
    container["resources"] = {
        "requests": {"cpu": res.cpu_request, "memory": res.memory_request},
        "limits": {"cpu": res.cpu_limit, "memory": res.memory_limit},
    }
    gpu = cluster.gpu
    if gpu is not None and step in gpu.steps:
        if "/" not in gpu.accelerator:
            raise ConfigError(
                f"cluster.gpu.accelerator {gpu.accelerator!r} is a KFP accelerator type; the pods of a PyTorchJob "
                "request a Kubernetes resource: use its name, e.g. nvidia.com/gpu"
            )
        container["resources"]["limits"][gpu.accelerator] = gpu.limit
        if gpu.node_selector:
            pod_spec["nodeSelector"] = dict(gpu.node_selector)
        pod_spec["tolerations"] = [
            {
                k: v
                for k, v in {
                    "key": t.key,
                    "operator": t.operator,
                    "value": t.value,
                    "effect": t.effect,
                    "tolerationSeconds": t.toleration_seconds,
                }.items()
                if v is not None
            }
            for t in gpu.tolerations
        ]

    if pj.workers:
        replicas["Worker"] = dict(
            replicas.get("Worker") or {"restartPolicy": replicas["Master"].get("restartPolicy", "Never")}
        )
        replicas["Worker"]["replicas"] = pj.workers
        replicas["Worker"]["template"] = copy.deepcopy(pod)
    else:
        replicas.pop("Worker", None)
    return job


# ---------------------------------------------------------------------------------------------
# The Kubernetes API.
# ---------------------------------------------------------------------------------------------


def default_api() -> Any:
    """A ``CustomObjectsApi`` from the pod's service account, else from ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as err:
            raise PyTorchJobError(
                f"no Kubernetes API to create the PyTorchJob: not in a pod and no kubeconfig ({err})"
            ) from None
    return client.CustomObjectsApi()


def default_namespace(cfg: PipelineConfig) -> str:
    """``cluster.pytorchjob.namespace``, else the namespace this pod runs in."""
    pj = cfg.cluster.pytorchjob
    if pj is not None and pj.namespace:
        return pj.namespace
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    except OSError:
        raise ConfigError(
            "cluster.pytorchjob.namespace is not set and this is not a pod: set it to the pipeline namespace"
        ) from None


def _api_error(err: Exception, action: str, namespace: str) -> PyTorchJobError:
    status = getattr(err, "status", None)
    body = str(getattr(err, "body", "") or err)[:500]
    hint = {
        403: f"the task's service account may not do this in {namespace}: give it the pytorchjobs rule of the "
        "kdflow-pipeline-runner Role (k8s/base/pipeline-runner.yaml)",
        404: "no PyTorchJob resource in this cluster: "
        "install the Kubeflow Training Operator (kubeflow.org/v1 PyTorchJob)",
    }.get(status or 0, "")
    return PyTorchJobError(f"{action} failed (HTTP {status}): {body}" + (f"; {hint}" if hint else ""))


def _get(api: Any, namespace: str, name: str) -> dict[str, Any] | None:
    from kubernetes.client.exceptions import ApiException

    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as err:
        if err.status == 404:
            return None
        raise _api_error(err, f"reading PyTorchJob {namespace}/{name}", namespace) from None


def delete(api: Any, namespace: str, name: str) -> None:
    """Delete the job and (in the background) its pods; gone already is fine."""
    from kubernetes.client.exceptions import ApiException

    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, propagation_policy="Background")
    except ApiException as err:
        if err.status != 404:
            raise _api_error(err, f"deleting PyTorchJob {namespace}/{name}", namespace) from None


def state(job: dict[str, Any]) -> tuple[str, str]:
    """(latest condition whose status is True, its message): Created, Running, Restarting,
    Succeeded, Failed, ...; ``Pending`` before the operator reports any."""
    conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    if not conditions:
        return "Pending", ""
    last = conditions[-1]
    return str(last.get("type", "Pending")), str(last.get("message") or last.get("reason") or "")


def create(api: Any, job: dict[str, Any], log: Log = print, poll_s: float = 2.0, gone_timeout_s: float = 300.0) -> None:
    """Create the job; when one of that name exists (an earlier attempt of this task), keep a
    live or successful one, and replace a failed one (the new job resumes from the checkpoint)."""
    from kubernetes.client.exceptions import ApiException

    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
        log(f"created PyTorchJob {namespace}/{name}")
        return
    except ApiException as err:
        if err.status != 409:
            raise _api_error(err, f"creating PyTorchJob {namespace}/{name}", namespace) from None
    existing = _get(api, namespace, name)
    phase = state(existing)[0] if existing is not None else "gone"
    if phase not in ("Failed", "gone"):
        log(f"PyTorchJob {namespace}/{name} exists from an earlier attempt ({phase}): following it")
        return
    log(f"PyTorchJob {namespace}/{name} from an earlier attempt {phase.lower()}: replacing it")
    delete(api, namespace, name)
    deadline = time.monotonic() + gone_timeout_s
    while _get(api, namespace, name) is not None:
        if time.monotonic() > deadline:
            raise PyTorchJobError(
                f"the failed PyTorchJob {namespace}/{name} was not deleted within {gone_timeout_s:g} s"
            )
        time.sleep(poll_s)
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    except ApiException as err:
        raise _api_error(err, f"creating PyTorchJob {namespace}/{name}", namespace) from None
    log(f"created PyTorchJob {namespace}/{name}")


def wait(api: Any, namespace: str, name: str, timeout_s: float, poll_s: float, log: Log = print) -> tuple[str, str]:
    """Poll until the job Succeeded or Failed; print each change of state or of pod counts.

    Returns:
        (``Succeeded`` or ``Failed``, the condition's message).

    Raises:
        PyTorchJobError: not finished within ``timeout_s`` (the job is deleted), or it vanished.
    """
    deadline = time.monotonic() + timeout_s
    last: tuple[Any, ...] = ()
    while True:
        job = _get(api, namespace, name)
        if job is None:
            raise PyTorchJobError(f"PyTorchJob {namespace}/{name} disappeared while running (deleted by someone?)")
        phase, message = state(job)
        pods = {
            role: counts
            for role, s in ((job.get("status") or {}).get("replicaStatuses") or {}).items()
            if (counts := {k: v for k, v in s.items() if k in ("active", "succeeded", "failed") and v})
        }
        if (phase, message, pods) != last:
            log(
                f"PyTorchJob {namespace}/{name}: {phase}"
                + (f" ({message})" if message else "")
                + (f" pods {pods}" if pods else "")
            )
            last = (phase, message, pods)
        if phase in ("Succeeded", "Failed"):
            return phase, message
        if time.monotonic() > deadline:
            delete(api, namespace, name)
            raise PyTorchJobError(
                f"PyTorchJob {namespace}/{name} did not finish within cluster.pytorchjob.timeout_s = {timeout_s:g} s "
                f"(last state {phase}); deleted it. Raise the timeout, or check the pods: "
                f"kubectl -n {namespace} get pods -l training.kubeflow.org/job-name={name}"
            )
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------
# One step, end to end.
# ---------------------------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if src.is_dir():
        shutil.copytree(src, dst, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def _deleted_when_stopped(api: Any, namespace: str, name: str) -> Iterator[None]:
    """A cancelled pipeline run stops this task with SIGTERM: take the training pods down too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except SystemExit:
        with contextlib.suppress(Exception):
            delete(api, namespace, name)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_step(
    cfg: PipelineConfig,
    step: str,
    pipeline_run_id: str,
    inputs: dict[str, str | Path],
    outputs: dict[str, str | Path],
    api: Any = None,
    namespace: str | None = None,
    log: Log = print,
) -> dict[str, Any]:
    """Run a training step as a PyTorchJob and return its summary (what the step returns).

    Args:
        cfg: The pipeline config, with ``cluster.pytorchjob``.
        step: ``train_teacher`` or ``distill``.
        pipeline_run_id: The KFP run (MLflow parent run key); names the job.
        inputs: The step's input paths by argument name (``dataset_dir``, ``teacher_dir``).
        outputs: The step's output paths by argument name (``teacher_dir`` / ``student_dir``, ``history_path``).
        api: A kubernetes ``CustomObjectsApi``; ``default_api()`` when None.
        namespace: Of the job; ``default_namespace(cfg)`` when None.
        log: Where status lines go.

    Raises:
        ConfigError: ``cluster.pytorchjob`` is not set or does not fit the step.
        PyTorchJobError: the job failed (with the failing rank's error), timed out, or the API refused it.
    """
    pj = cfg.cluster.pytorchjob
    if pj is None:
        raise ConfigError("cluster.pytorchjob is not set: a step runs as a PyTorchJob only when it is")
    namespace = namespace or default_namespace(cfg)
    name = job_name(pipeline_run_id, step)
    root = Path(pj.mount_path) / "kdflow-jobs" / name
    errors, summary = root / "errors", root / "summary.json"
    # A retried task starts clean, but keeps out/ (rank 0's checkpoint lets the job resume).
    shutil.rmtree(errors, ignore_errors=True)
    summary.unlink(missing_ok=True)
    paths = {key: str(root / "in" / key) for key in inputs}
    staged = root / "in" / ".staged"
    if not staged.is_file():  # a retried task may follow a job that is reading these right now
        for key, src in inputs.items():
            _copy(Path(src), root / "in" / key)
        staged.touch()
    for key in outputs:
        paths[key] = str(root / "out" / key)
    (root / "out").mkdir(parents=True, exist_ok=True)
    request = {
        "step": step,
        "config_json": cfg.to_json(),
        "pipeline_run_id": pipeline_run_id,
        "paths": paths,
        "summary_path": str(summary),
    }
    (root / "request.json").write_text(json.dumps(request))

    job = render(cfg, step, name, namespace, str(root / "request.json"), str(errors), pipeline_run_id)
    api = api if api is not None else default_api()
    world = (1 + pj.workers) * _train_cfg(cfg, step).distributed.nproc_per_node
    pods, nproc = 1 + pj.workers, job["spec"]["nprocPerNode"]
    log(f"{step}: PyTorchJob {namespace}/{name}, {pods} pod(s) x {nproc} process(es) = world size {world}")
    with _deleted_when_stopped(api, namespace, name):
        create(api, job, log)
        phase, message = wait(api, namespace, name, pj.timeout_s, pj.poll_s, log)
    if phase != "Succeeded" or not summary.is_file():
        cause = torchrun.first_error(errors) or message or "no rank recorded an error; see the pods' logs"
        raise PyTorchJobError(f"{step} as PyTorchJob {namespace}/{name} {phase.lower()}: {cause}")
    for key, dst in outputs.items():
        src = root / "out" / key
        if src.exists():
            _copy(src, Path(dst))
    result = json.loads(summary.read_text())
    shutil.rmtree(root, ignore_errors=True)  # inputs and outputs are now the task's artifacts
    return result
