"""The compiled pipeline YAML, parsed into KFP's own protos (PipelineSpec, PlatformSpec,
KubernetesExecutorConfig), is what the DAG diagram and the config say: tasks, dependencies,
the gate condition, and per step the image, requests/limits, GPU, Secrets and labels."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb
from kfp.pipeline_spec import pipeline_spec_pb2 as pb

import kd_lib
from kd_lib.config import STEP_NAMES, PipelineConfig, load_config
from pipelines.compile import compile_pipeline

REPO = Path(__file__).resolve().parents[2]
# The DAG of a config whose teacher is trained in the run: every step but import_teacher.
DAG_STEPS = tuple(step for step in STEP_NAMES if step != "import_teacher")
DEMO = REPO / "configs" / "demo.yaml"

GPU_AND_SECRETS = [
    "image=registry.example.com/ml/kdflow:1.2.3",
    "teacher.train.device=cuda",
    "distill.train.device=auto",
    "cluster.gpu={accelerator: nvidia.com/gpu, limit: 2, node_selector: {cloud.google.com/gke-accelerator: nvidia-l4},"
    " tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule},"
    " {key: pool, value: ml, effect: NoExecute, toleration_seconds: 60}]}",
    "cluster.secrets=[{name: kdflow-mlflow, env: {MLFLOW_TRACKING_URI: MLFLOW_TRACKING_URI}},"
    " {name: kdflow-s3, env: {access_key: AWS_ACCESS_KEY_ID, secret_key: AWS_SECRET_ACCESS_KEY}, optional: true}]",
    "cluster.resources={cpu_request: 250m, cpu_limit: '1', memory_request: 512Mi, memory_limit: 2Gi}",
    "cluster.step_resources={distill: {cpu_limit: '4', memory_limit: 8Gi}, gate: {memory_limit: 1Gi}}",
    "cluster.image_pull_secrets=[regcred]",
]


class Compiled:
    """The compiled YAML as protos, with lookups by step name (prepare_data -> exec-prepare-data)."""

    def __init__(self, path: Path) -> None:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert len(docs) == 2, "expected a PipelineSpec and a PlatformSpec document"
        self.spec = json_format.ParseDict(docs[0], pb.PipelineSpec())
        self.platform = json_format.ParseDict(docs[1], pb.PlatformSpec())
        self.deployment = json_format.ParseDict(
            json_format.MessageToDict(self.spec.deployment_spec), pb.PipelineDeploymentConfig()
        )

    def container(self, step: str) -> pb.PipelineDeploymentConfig.PipelineContainerSpec:
        return self.deployment.executors[f"exec-{step.replace('_', '-')}"].container

    def k8s(self, step: str) -> k8s_pb.KubernetesExecutorConfig:
        struct = self.platform.platforms["kubernetes"].deployment_spec.executors[f"exec-{step.replace('_', '-')}"]
        return json_format.ParseDict(json_format.MessageToDict(struct), k8s_pb.KubernetesExecutorConfig())

    def dag(self, component: str) -> dict[str, pb.PipelineTaskSpec]:
        return dict(self.spec.components[component].dag.tasks)


@pytest.fixture(scope="module")
def gpu_cfg() -> PipelineConfig:
    return load_config(DEMO, GPU_AND_SECRETS)


@pytest.fixture(scope="module")
def compiled(gpu_cfg: PipelineConfig, tmp_path_factory: pytest.TempPathFactory) -> Compiled:
    return Compiled(compile_pipeline(gpu_cfg, tmp_path_factory.mktemp("spec") / "pipeline.yaml"))


def test_tasks_dependencies_and_the_gate_condition(compiled: Compiled, gpu_cfg: PipelineConfig) -> None:
    spec = compiled.spec
    assert spec.pipeline_info.name == gpu_cfg.name
    assert spec.root.input_definitions.parameters["config_json"].default_value.string_value == gpu_cfg.to_json()
    root = dict(spec.root.dag.tasks)
    assert set(root) == {"exit-handler-1", "finalize"}
    assert list(root["finalize"].dependent_tasks) == ["exit-handler-1"]
    assert root["finalize"].trigger_policy.strategy == pb.PipelineTaskSpec.TriggerPolicy.ALL_UPSTREAM_TASKS_COMPLETED

    inner = compiled.dag("comp-exit-handler-1")
    deps = {name: set(t.dependent_tasks) for name, t in inner.items()}
    assert deps == {
        "prepare-data": set(),
        "train-teacher": {"prepare-data"},
        "distill": {"prepare-data", "train-teacher"},
        "quantize": {"prepare-data", "train-teacher", "distill"},
        "evaluate": {"prepare-data", "train-teacher", "distill", "quantize"},
        "gate": {"prepare-data", "evaluate"},
        "condition-2": {"prepare-data", "quantize", "evaluate", "gate"},
    }
    branch = inner["condition-2"]
    assert branch.task_info.name == "gate-passed"
    assert branch.trigger_policy.condition == "inputs.parameter_values['pipelinechannel--gate-Output'] != 'reject'"
    assert set(compiled.dag(branch.component_ref.name)) == {"register"}
    # Caching is off everywhere: every step must write its MLflow run.
    every = {**root, **inner, "register": compiled.dag(branch.component_ref.name)["register"]}
    assert all(not t.caching_options.enable_cache for n, t in every.items() if not n.startswith(("exit", "cond")))


def test_every_step_runs_the_configured_image_with_nothing_installed_at_start(compiled: Compiled) -> None:
    assert len(compiled.deployment.executors) == len(DAG_STEPS)
    for step in DAG_STEPS:
        container = compiled.container(step)
        assert container.image == "registry.example.com/ml/kdflow:1.2.3", step
        script = " ".join(container.command)
        assert "pip install" not in script and "pip" not in script.split(), step
        assert "kfp.dsl.executor_main" in script
        assert compiled.k8s(step).image_pull_policy == "IfNotPresent"
        assert [s.secret_name for s in compiled.k8s(step).image_pull_secret] == ["regcred"]


def test_resources_per_step(compiled: Compiled, gpu_cfg: PipelineConfig) -> None:
    for step in DAG_STEPS:
        res = compiled.container(step).resources
        want = gpu_cfg.cluster.resources_for(step)
        got = (res.resource_cpu_request, res.resource_cpu_limit, res.resource_memory_request, res.resource_memory_limit)
        assert got == (want.cpu_request, want.cpu_limit, want.memory_request, want.memory_limit), step
    assert compiled.container("distill").resources.resource_cpu_limit == "4"
    assert compiled.container("distill").resources.resource_memory_limit == "8Gi"
    assert compiled.container("gate").resources.resource_memory_limit == "1Gi"
    assert compiled.container("quantize").resources.resource_cpu_request == "250m"


def test_gpu_node_selector_and_tolerations_only_on_training_steps(compiled: Compiled) -> None:
    for step in DAG_STEPS:
        acc = compiled.container(step).resources.accelerator
        k8s = compiled.k8s(step)
        if step in ("train_teacher", "distill"):
            assert (acc.resource_type, acc.resource_count) == ("nvidia.com/gpu", "2"), step
            assert dict(k8s.node_selector.labels) == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
            tolerations = [(t.key, t.operator, t.value, t.effect, t.toleration_seconds) for t in k8s.tolerations]
            assert tolerations == [
                ("nvidia.com/gpu", "Exists", "", "NoSchedule", 0),
                ("pool", "Equal", "ml", "NoExecute", 60),
            ]
        else:
            assert not acc.resource_type and not acc.resource_count, step
            assert not k8s.node_selector.labels and not k8s.tolerations, step


def test_secrets_become_env_and_pods_carry_the_network_policy_label(compiled: Compiled) -> None:
    for step in DAG_STEPS:
        k8s = compiled.k8s(step)
        mapped = {(s.secret_name, m.secret_key, m.env_var, s.optional) for s in k8s.secret_as_env for m in s.key_to_env}
        assert mapped == {
            ("kdflow-mlflow", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI", False),
            ("kdflow-s3", "access_key", "AWS_ACCESS_KEY_ID", True),
            ("kdflow-s3", "secret_key", "AWS_SECRET_ACCESS_KEY", True),
        }, step
        assert k8s.pod_metadata.labels["kdflow.io/mlflow-client"] == "true"
        # No plain env var carries anything: credentials come only from Secrets.
        assert not compiled.container(step).env, step


def test_defaults_image_from_package_version_and_no_gpu(tmp_path: Path) -> None:
    from components.image import DEFAULT_IMAGE

    cfg = load_config(DEMO)
    assert cfg.image == f"kdflow:{kd_lib.__version__}" == DEFAULT_IMAGE
    c = Compiled(compile_pipeline(cfg, tmp_path / "p.yaml"))
    for step in DAG_STEPS:
        assert c.container(step).image == f"kdflow:{kd_lib.__version__}"
        assert not c.container(step).resources.accelerator.resource_type
        assert c.container(step).resources.resource_memory_limit == "4Gi"
        assert {s.secret_name for s in c.k8s(step).secret_as_env} == {"kdflow-mlflow", "kdflow-mlflow-auth"}


def test_cluster_settings_do_not_change_the_config_hash(gpu_cfg: PipelineConfig) -> None:
    assert (
        gpu_cfg.config_hash()
        == load_config(DEMO, ["teacher.train.device=cuda", "distill.train.device=auto"]).config_hash()
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["cluster.gpu={}"], "gives train_teacher a GPU but teacher.train.device is 'cpu'"),
        (["cluster.resources.memory_limit=1.5Gi"], "memory_limit"),
        (["cluster.step_resources={distil: {cpu_limit: '1'}}"], "step_resources.distil"),
        (["cluster.step_resources={gate: {cpu_request: '3'}}"], "cpu_request 3 is above cpu_limit 2 for gate"),
        (["cluster.secrets=[{name: Bad_Name, env: {k: V}}]"], "cluster.secrets.0.name"),
        (["cluster.secrets=[{name: ok, env: {k: 1BAD}}]"], "not valid environment variable names"),
        (["image=my image"], "image"),
    ],
)
def test_invalid_cluster_settings_name_the_field(overrides: list[str], message: str) -> None:
    from kd_lib.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        load_config(DEMO, overrides)


def test_an_imported_teacher_replaces_the_training_step(tmp_path: Path) -> None:
    cfg = load_config(DEMO, ["teacher.source=mlflow", "teacher.uri=models:/teacher@champion"])
    c = Compiled(compile_pipeline(cfg, tmp_path / "p.yaml"))
    names = set(c.deployment.executors)
    assert "exec-import-teacher" in names and "exec-train-teacher" not in names
    assert len(names) == len(DAG_STEPS)
    assert c.container("import_teacher").image == cfg.image
