"""Where the pipeline runs on a Kubernetes cluster (Kubeflow Pipelines): ``cluster:``.

None of this changes the model: it is read at compile time and becomes per-task container/pod
settings (resources, GPU, Secrets as environment, identity, PyTorchJobs).
"""

from __future__ import annotations

import re
from typing import Literal, get_args

from pydantic import Field, model_validator

from kd_lib.config.base import _Strict

# The tasks of the DAG, by the name of the kd_lib step each runs.
StepName = Literal[
    "prepare_data", "train_teacher", "import_teacher", "distill", "quantize", "evaluate", "gate", "register", "finalize"
]
STEP_NAMES: tuple[str, ...] = get_args(StepName)
# The steps that train, and so may get a GPU or become a PyTorchJob.
TrainingStepName = Literal["train_teacher", "distill"]


def _training_steps() -> list[TrainingStepName]:
    return ["train_teacher", "distill"]


def _gpu_steps() -> list[StepName]:  # the same steps, typed as any step name (lists are invariant)
    return ["train_teacher", "distill"]


# Kubernetes quantities in the forms KFP's compiler accepts (it rejects e.g. "1.5Gi").
_CPU_PATTERN = r"^([0-9]*\.)?[0-9]+m?$"
_MEMORY_PATTERN = r"^[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?$"
_MEMORY_UNITS = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
}
# A Kubernetes object name (DNS-1123 subdomain) and a POSIX-ish environment variable name.
_K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
_ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"


def cpu_cores(quantity: str) -> float:
    """``"500m"`` -> 0.5, ``"2"`` -> 2.0."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def memory_bytes(quantity: str) -> int:
    """``"512Mi"`` -> 536870912, ``"1G"`` -> 10**9."""
    digits = re.match(r"^[0-9]+", quantity)
    if digits is None or quantity[digits.end() :] not in _MEMORY_UNITS:
        raise ValueError(f"not a memory quantity: {quantity!r} (e.g. '512Mi', '4Gi')")
    return int(digits.group()) * _MEMORY_UNITS[quantity[digits.end() :]]


class ResourcesConfig(_Strict):
    """CPU and memory requests and limits of a step's container (Kubernetes quantities)."""

    cpu_request: str = Field("500m", pattern=_CPU_PATTERN, description="e.g. '500m' or '1'.")
    cpu_limit: str = Field("2", pattern=_CPU_PATTERN)
    memory_request: str = Field("1Gi", pattern=_MEMORY_PATTERN, description="e.g. '1Gi' or '512Mi'.")
    memory_limit: str = Field("4Gi", pattern=_MEMORY_PATTERN)


class StepResourcesConfig(_Strict):
    """One step's override of ``cluster.resources``; unset fields keep the default."""

    cpu_request: str | None = Field(None, pattern=_CPU_PATTERN)
    cpu_limit: str | None = Field(None, pattern=_CPU_PATTERN)
    memory_request: str | None = Field(None, pattern=_MEMORY_PATTERN)
    memory_limit: str | None = Field(None, pattern=_MEMORY_PATTERN)


class TolerationConfig(_Strict):
    """A Kubernetes toleration, e.g. for the taint GPU node pools carry."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class GpuConfig(_Strict):
    """An accelerator for the steps that train; the others stay on CPU nodes."""

    accelerator: str = Field(
        "nvidia.com/gpu",
        min_length=1,
        description="The accelerator resource/type KFP requests, e.g. 'nvidia.com/gpu' or 'NVIDIA_TESLA_T4'.",
    )
    limit: int = Field(1, ge=1, description="Accelerators per task.")
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the task must run on, e.g. {'nvidia.com/gpu.present': 'true'}."
    )
    tolerations: list[TolerationConfig] = Field(
        default_factory=lambda: [TolerationConfig(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")],
        description="Taints of the GPU nodes to tolerate.",
    )
    steps: list[StepName] = Field(default_factory=_gpu_steps, min_length=1, description="Steps that get the GPU.")


class PyTorchJobConfig(_Strict):
    """Run training steps as Kubeflow Training Operator PyTorchJobs: one Master and ``workers``
    Worker pods, each running torchrun with ``<step>.train.distributed.nproc_per_node`` ranks.

    The pipeline's own task for the step then only launches the job and waits for it. Inputs
    and outputs pass through a volume both sides mount (KFP artifacts live in the pipeline's
    object store, which the training pods cannot reach).
    """

    steps: list[TrainingStepName] = Field(
        default_factory=_training_steps,
        min_length=1,
        description="Steps that become a PyTorchJob.",
    )
    workers: int = Field(
        1, ge=0, description="Worker pods besides the Master; world size = (1 + workers) * nproc_per_node."
    )
    volume_claim: str = Field(
        "kdflow-training-staging",
        pattern=_K8S_NAME_PATTERN,
        description="A ReadWriteMany PersistentVolumeClaim in the pipeline namespace (k8s/training/staging-pvc.yaml): "
        "the launcher stages the inputs there, rank 0 writes the model and checkpoints there.",
    )
    mount_path: str = Field("/mnt/kdflow", pattern=r"^/[^\s]*$", description="Where every pod mounts the volume.")
    namespace: str | None = Field(
        None, pattern=_K8S_NAME_PATTERN, description="Namespace of the job; None = the launcher pod's own."
    )
    master_port: int = Field(23456, ge=1024, le=65535, description="Rendezvous port on the Master pod.")
    timeout_s: float = Field(
        86400.0,
        gt=0,
        description="Longest the launcher waits for the job to finish; then it deletes the job and fails.",
    )
    poll_s: float = Field(10.0, gt=0, description="Seconds between two status reads of the job.")
    backoff_limit: int = Field(
        0,
        ge=0,
        description="Restarts of a failed job by the operator (it resumes from rank 0's last epoch checkpoint).",
    )
    ttl_seconds_after_finished: int = Field(
        86400, ge=0, description="The operator deletes a finished job (and its pods' logs) after this long."
    )


class SecretEnvConfig(_Strict):
    """A Kubernetes Secret whose keys become environment variables of every step."""

    name: str = Field(..., pattern=_K8S_NAME_PATTERN, description="Secret name, in the namespace runs execute in.")
    env: dict[str, str] = Field(..., min_length=1, description="Secret key -> environment variable name.")
    optional: bool = Field(False, description="Start the step even when the Secret or a key is missing.")

    @model_validator(mode="after")
    def _env_names(self) -> SecretEnvConfig:
        bad = [v for v in self.env.values() if not re.match(_ENV_NAME_PATTERN, v)]
        if bad:
            raise ValueError(f"not valid environment variable names: {bad}")
        return self


def _default_secrets() -> list[SecretEnvConfig]:
    # The Secret templates in k8s/secrets/ create these names and keys.
    return [
        SecretEnvConfig(name="kdflow-mlflow", env={"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI"}),
        SecretEnvConfig(
            name="kdflow-mlflow-auth",
            env={
                "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
            },
            optional=True,
        ),
    ]


class ClusterConfig(_Strict):
    """How each task runs on Kubernetes: resources, GPU, Secrets as environment, identity.

    Credentials never appear here, in the pipeline parameters or in MLflow params: only the
    *names* of the Secrets that hold them.
    """

    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="Requests and limits of every step."
    )
    step_resources: dict[StepName, StepResourcesConfig] = Field(
        default_factory=dict, description="Per-step overrides of `resources`, field by field."
    )
    gpu: GpuConfig | None = Field(None, description="An accelerator for the training steps; none when omitted.")
    secrets: list[SecretEnvConfig] = Field(default_factory=_default_secrets)
    service_account: str | None = Field(
        "kdflow-pipeline-runner",
        pattern=_K8S_NAME_PATTERN,
        description="Kubernetes ServiceAccount of the run (k8s/ creates it); null for the KFP default.",
    )
    pod_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/part-of": "kdflow", "kdflow.io/mlflow-client": "true"},
        description="Labels of every step's pod; the NetworkPolicy in k8s/ admits pods with "
        "kdflow.io/mlflow-client=true to MLflow.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets to pull the image from a private registry."
    )
    pytorchjob: PyTorchJobConfig | None = Field(
        None,
        description="Run the training steps as Training Operator PyTorchJobs (multi-pod data parallel); "
        "none when omitted: a step with nproc_per_node > 1 then runs torchrun inside its own pod.",
    )

    def resources_for(self, step: str) -> ResourcesConfig:
        """The step's resources: its override where set, else the default."""
        override = self.step_resources.get(step)  # type: ignore[call-overload]
        merged = self.resources.model_dump()
        if override is not None:
            merged |= override.model_dump(exclude_none=True)
        return ResourcesConfig(**merged)

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ClusterConfig:
        for step in STEP_NAMES:
            r = self.resources_for(step)
            where = f"step_resources.{step}" if step in self.step_resources else "resources"
            if cpu_cores(r.cpu_request) > cpu_cores(r.cpu_limit):
                raise ValueError(f"{where}: cpu_request {r.cpu_request} is above cpu_limit {r.cpu_limit} for {step}")
            if memory_bytes(r.memory_request) > memory_bytes(r.memory_limit):
                raise ValueError(
                    f"{where}: memory_request {r.memory_request} is above memory_limit {r.memory_limit} for {step}"
                )
        return self
