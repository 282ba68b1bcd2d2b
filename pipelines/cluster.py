"""Per-task Kubernetes settings from ``cluster:`` in the config, applied at compile time.

KFP fixes a component's image when it is decorated, so the image (like resources, the GPU,
Secrets and pod labels) is set on each *task* here, inside the pipeline function, where KFP
still accepts changes. kfp.local ignores all of this; only the compiled YAML carries it.
"""

from __future__ import annotations

from kfp import kubernetes
from kfp.dsl import PipelineTask

from kd_lib.config import PipelineConfig


def pytorchjob_steps(cfg: PipelineConfig | None) -> frozenset[str]:
    """The training steps that run as PyTorchJobs on the cluster: ``cluster.pytorchjob.steps``
    when ``cluster.pytorchjob`` is set (and the teacher is trained, for ``train_teacher``)."""
    if cfg is None or cfg.cluster.pytorchjob is None:
        return frozenset()
    steps = set(cfg.cluster.pytorchjob.steps)
    if not cfg.teacher.trains:
        steps.discard("train_teacher")
    return frozenset(steps)


def configure_task(task: PipelineTask, step: str, cfg: PipelineConfig, launches_pytorchjob: bool = False) -> None:
    """Give one task the image, requests/limits, GPU, Secrets-as-env and labels of its step.

    A task that ``launches_pytorchjob`` only waits for the job: it gets the default
    resources and no GPU (the job's pods get the step's), and the staging volume.
    """
    cluster = cfg.cluster
    task.set_container_image(cfg.image)
    kubernetes.set_image_pull_policy(task, cluster.image_pull_policy)
    if cluster.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(cluster.image_pull_secrets))

    res = cluster.resources if launches_pytorchjob else cluster.resources_for(step)
    task.set_cpu_request(res.cpu_request).set_cpu_limit(res.cpu_limit)
    task.set_memory_request(res.memory_request).set_memory_limit(res.memory_limit)
    if launches_pytorchjob and cluster.pytorchjob is not None:
        kubernetes.mount_pvc(task, pvc_name=cluster.pytorchjob.volume_claim, mount_path=cluster.pytorchjob.mount_path)

    gpu = cluster.gpu
    if gpu is not None and step in gpu.steps and not launches_pytorchjob:
        task.set_accelerator_type(gpu.accelerator).set_accelerator_limit(gpu.limit)
        for label, value in gpu.node_selector.items():
            kubernetes.add_node_selector(task, label_key=label, label_value=value)
        for t in gpu.tolerations:
            kubernetes.add_toleration(
                task,
                key=t.key,
                operator=t.operator,
                value=t.value,
                effect=t.effect,
                toleration_seconds=t.toleration_seconds,
            )

    # Credentials reach the step only as environment variables resolved by the kubelet from
    # Secrets: the compiled YAML names the Secret and key, never a value.
    for secret in cluster.secrets:
        kubernetes.use_secret_as_env(
            task, secret_name=secret.name, secret_key_to_env=dict(secret.env), optional=secret.optional
        )

    for key, value in cluster.pod_labels.items():
        kubernetes.add_pod_label(task, label_key=key, label_value=value)


def finish_tasks(tasks: dict[str, PipelineTask], cfg: PipelineConfig | None, for_cluster: bool) -> None:
    """What every task of a kdflow DAG gets: caching off and, for the cluster, its step's settings."""
    for step, task in tasks.items():
        # Every step writes a fresh MLflow run: a cache hit would leave the run without its record.
        task.set_caching_options(False)
        if cfg is not None and for_cluster:
            configure_task(task, step, cfg, launches_pytorchjob=step in pytorchjob_steps(cfg))
