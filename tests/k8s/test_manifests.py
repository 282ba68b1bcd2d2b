"""k8s/ and the Dockerfile, checked offline (no cluster, no Docker engine here).

Rendering (`kubectl kustomize`), schema validation (`kubernetes-validate`), security policy
(`checkov`) and the Dockerfile linter (`hadolint`) run from the tools venv `make test`
installs (.venv-checks, the `cluster-checks` dependency group); the rest reads the rendered
objects: security settings of every container, who the NetworkPolicies let through, that the
manifests and the pipeline config agree on names, and what differs between dev and prod.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from kd_lib.config import ClusterConfig, load_config, parse_config
from pipelines.cli import build_parser
from pipelines.submit import check_cluster_config

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "prod")
TOOLS = Path(os.environ.get("KDFLOW_CHECKS_BIN", REPO / ".venv-checks" / "bin"))
REQUIRED = os.environ.get("KDFLOW_REQUIRE_CLUSTER_CHECKS") == "1"
# Checkov rules skipped on purpose, each with its reason written beside the skip.
ALLOWED_SKIPS = {"CKV_K8S_43"}
WORKLOADS = ("Deployment", "StatefulSet", "CronJob")


def tool(name: str) -> str:
    """Path of a check tool; a skip (or, under `make test`, a failure) when it is missing."""
    path = TOOLS / name
    if path.exists():
        return str(path)
    if name == "kubectl" and shutil.which("kubectl"):
        return shutil.which("kubectl")  # type: ignore[return-value]
    message = f"{path} is missing: run `make checks-tools` (installs the cluster-checks dependency group)"
    if REQUIRED:
        pytest.fail(message)
    pytest.skip(message)


def _tool_env() -> dict[str, str]:
    # checkov renders kustomizations with the kubectl on PATH; --skip-download and
    # BC_SKIP_MAPPING keep it from calling its vendor's API (there is no network here).
    return os.environ | {"PATH": f"{TOOLS}:{os.environ.get('PATH', '')}", "BC_SKIP_MAPPING": "TRUE"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    kubectl = tool("kubectl")
    out = {}
    for overlay in OVERLAYS:
        proc = subprocess.run(
            [kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str) -> dict:
    (obj,) = find(objs, kind, name)
    return obj


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def pod_labels(obj: dict) -> dict:
    template = obj["spec"]["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else obj["spec"]["template"]
    return template["metadata"]["labels"]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return spec.get("initContainers", []) + spec["containers"]


# -- the tools ------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_whole_stack(rendered: dict, overlay: str) -> None:
    objs = rendered[overlay]
    assert {(o["kind"], o["metadata"]["name"]) for o in objs} >= {
        ("Namespace", "kdflow"),
        ("Deployment", "mlflow"),
        ("Service", "mlflow"),
        ("StatefulSet", "postgres"),
        ("StatefulSet", "minio"),
        ("ServiceAccount", "kdflow-pipeline-runner"),
        ("Role", "kdflow-pipeline-runner"),
        ("RoleBinding", "kdflow-pipeline-runner"),
        ("CronJob", "kdflow-retrain"),
    }
    assert len(find(objs, "NetworkPolicy")) == 4
    assert all(o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"), "explicit namespaces"


def test_kubernetes_validate_accepts_every_object(rendered: dict, tmp_path: Path) -> None:
    files = []
    for overlay, objs in rendered.items():
        path = tmp_path / f"{overlay}.yaml"
        path.write_text(yaml.safe_dump_all(objs))
        files.append(str(path))
    templates = sorted(str(p) for p in (K8S / "secrets").glob("*.yaml"))
    proc = subprocess.run(
        [tool("kubernetes-validate"), "--strict", *files, *templates], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    passed = [line for line in proc.stdout.splitlines() if " passed for resource " in line]
    assert len(passed) == sum(map(len, rendered.values())) + len(templates), proc.stdout[-2000:]


def test_checkov_finds_no_failed_check_in_k8s_and_the_dockerfile() -> None:
    tool("kubectl")  # checkov's kustomize framework renders every kustomization with it
    proc = subprocess.run(
        [tool("checkov"), "-d", str(K8S), "--skip-download", "--output", "json", "--compact"],
        capture_output=True,
        text=True,
        timeout=300,
        env=_tool_env(),
        cwd=REPO,
    )
    docker = subprocess.run(
        [
            tool("checkov"),
            "-f",
            str(REPO / "Dockerfile"),
            "--framework",
            "dockerfile",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=_tool_env(),
        cwd=REPO,
    )
    reports = []
    for p in (proc, docker):
        assert p.stdout.strip(), p.stderr[-3000:]
        parsed = json.loads(p.stdout)
        reports += parsed if isinstance(parsed, list) else [parsed]
    frameworks = {r["check_type"] for r in reports}
    assert frameworks >= {"kubernetes", "kustomize", "dockerfile"}, frameworks
    failed = [(r["check_type"], c["check_id"], c["resource"]) for r in reports for c in r["results"]["failed_checks"]]
    assert failed == [], failed
    for r in reports:
        assert r["summary"]["passed"] > 20 and r["summary"]["parsing_errors"] == 0, (r["check_type"], r["summary"])
        for c in r["results"]["skipped_checks"]:
            assert c["check_id"] in ALLOWED_SKIPS, c["check_id"]
            assert len((c.get("check_result") or {}).get("suppress_comment", "")) > 20, (
                f"{c['check_id']} needs a reason"
            )


def test_hadolint_passes_the_dockerfile() -> None:
    text = (REPO / "Dockerfile").read_text()
    assert "hadolint ignore" not in text
    proc = subprocess.run(
        [tool("hadolint"), "--no-color", "Dockerfile"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- what every container must be -------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_read_only_without_capabilities_and_bounded(rendered: dict, overlay: str) -> None:
    workloads = [o for o in rendered[overlay] if o["kind"] in WORKLOADS]
    assert len(workloads) == 4
    for w in workloads:
        where = f"{w['kind']}/{w['metadata']['name']}"
        spec = pod_spec(w)
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] >= 10000, where
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec["automountServiceAccountToken"] is False, where
        assert spec["serviceAccountName"] not in ("", "default"), where
        for c in containers(w):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), (where, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            for bound in ("requests", "limits"):
                assert set(c["resources"][bound]) >= {"cpu", "memory"}, (where, c["name"], bound)
            assert ":" in c["image"] and not c["image"].endswith(":latest"), (where, c["image"])


def test_no_secret_is_rendered_and_templates_hold_only_placeholders(rendered: dict) -> None:
    for objs in rendered.values():
        assert not find(objs, "Secret")
    templates = list((K8S / "secrets").glob("*.yaml"))
    assert len(templates) >= 4
    for path in templates:
        (secret,) = yaml.safe_load_all(path.read_text())
        assert secret["kind"] == "Secret" and "data" not in secret, path.name
        for key, value in secret["stringData"].items():
            for line in value.splitlines():
                if "=" in line or line.strip() in ("", "[default]"):
                    assert line.strip() in ("", "[default]") or line.split("=", 1)[1].strip() == "REPLACE_ME", (
                        path,
                        line,
                    )
                else:
                    assert line.strip() == "REPLACE_ME", (path.name, key)
    for kustomization in K8S.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text()).get("resources", [])
        assert not [r for r in listed if "secrets" in r], f"{kustomization} must not apply Secret templates"


# -- MLflow, PostgreSQL, MinIO ----------------------------------------------------------------


def _mlflow_env(objs: list[dict]) -> dict[str, str]:
    (server,) = [
        c for c in one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow"
    ]
    return {e["name"]: e.get("value") for e in server["env"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server_uses_postgres_s3_its_service_name_and_workers(rendered: dict, overlay: str) -> None:
    objs = rendered[overlay]
    deploy = one(objs, "Deployment", "mlflow")
    (server,) = [c for c in deploy["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow"]
    script = " ".join(server["args"])
    assert "exec mlflow server" in script
    assert '--backend-store-uri "postgresql://mlflow@postgres.kdflow.svc.cluster.local:5432/mlflow"' in script
    assert '--artifacts-destination "s3://$ARTIFACT_BUCKET"' in script and "--serve-artifacts" in script
    assert '--workers "$MLFLOW_WORKERS"' in script and '--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"' in script
    env = _mlflow_env(objs)
    service = one(objs, "Service", "mlflow")
    fqdn = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    allowed = env["MLFLOW_ALLOWED_HOSTS"].split(",")
    assert {fqdn, f"{fqdn}:*", "localhost:*"} <= set(allowed)
    assert int(env["MLFLOW_WORKERS"]) >= 1
    assert env["MLFLOW_S3_ENDPOINT_URL"] == "http://minio.kdflow.svc.cluster.local:9000"
    # The password travels as a file, not as env or argument.
    assert 'PGPASSWORD="$(cat /etc/kdflow/postgres/password)"' in script
    assert not any(
        "valueFrom" in e and "secretKeyRef" in e["valueFrom"] for c in containers(deploy) for e in c.get("env", [])
    )
    assert {p["httpGet"]["path"] for p in (server["readinessProbe"], server["livenessProbe"])} == {"/health"}


def test_statefulsets_keep_data_on_volumes_sized_per_overlay(rendered: dict) -> None:
    def storage(overlay: str, name: str) -> str:
        sts = one(rendered[overlay], "StatefulSet", name)
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        mounts = {m["name"]: m["mountPath"] for m in sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
        assert claim["metadata"]["name"] in mounts
        return claim["spec"]["resources"]["requests"]["storage"]

    assert (storage("dev", "postgres"), storage("prod", "postgres")) == ("1Gi", "50Gi")
    assert (storage("dev", "minio"), storage("prod", "minio")) == ("2Gi", "200Gi")


def test_prod_runs_mlflow_replicated_under_a_disruption_budget(rendered: dict) -> None:
    dev, prod = rendered["dev"], rendered["prod"]
    assert one(dev, "Deployment", "mlflow")["spec"]["replicas"] == 1 and not find(dev, "PodDisruptionBudget")
    mlflow = one(prod, "Deployment", "mlflow")
    pdb = one(prod, "PodDisruptionBudget", "mlflow")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(mlflow).items()
    assert mlflow["spec"]["replicas"] > pdb["spec"]["minAvailable"] >= 1
    assert int(_mlflow_env(prod)["MLFLOW_WORKERS"]) > int(_mlflow_env(dev)["MLFLOW_WORKERS"])
    (server,) = [c for c in mlflow["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow"]
    (dev_server,) = [
        c for c in one(dev, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow"
    ]
    assert server["resources"]["limits"]["memory"] != dev_server["resources"]["limits"]["memory"]


# -- who may talk to whom ---------------------------------------------------------------------


def _admits(
    policies: list[dict], namespaces: dict[str, dict], src_ns: str, src: dict, dst_ns: str, dst: dict, port: int
) -> bool:
    """Kubernetes NetworkPolicy ingress semantics for matchLabels selectors: a pod selected by
    no ingress policy admits everything; otherwise some rule of a selecting policy must match."""

    def matches(selector: dict | None, labels: dict) -> bool:
        return selector is not None and selector.get("matchLabels", {}).items() <= labels.items()

    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == dst_ns
        and matches(p["spec"]["podSelector"], dst)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            if rule.get("ports") and port not in [x["port"] for x in rule["ports"]]:
                continue
            for peer in rule.get("from", []):
                ns_ok = (
                    matches(peer["namespaceSelector"], namespaces[src_ns])
                    if "namespaceSelector" in peer
                    else src_ns == dst_ns
                )
                pod_ok = matches(peer["podSelector"], src) if "podSelector" in peer else True
                if ns_ok and pod_ok:
                    return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_pipeline_steps_reach_mlflow_and_only_mlflow_reaches_its_stores(rendered: dict, overlay: str) -> None:
    objs = rendered[overlay]
    policies = find(objs, "NetworkPolicy")
    pipeline_ns = one(objs, "ServiceAccount", "kdflow-pipeline-runner")["metadata"]["namespace"]
    namespaces = {n: {"kubernetes.io/metadata.name": n} for n in ("kdflow", pipeline_ns, "other")}
    step = dict(ClusterConfig().pod_labels)  # what every compiled step's pod carries
    mlflow = pod_labels(one(objs, "Deployment", "mlflow"))
    postgres = pod_labels(one(objs, "StatefulSet", "postgres"))
    minio = pod_labels(one(objs, "StatefulSet", "minio"))
    cron = pod_labels(one(objs, "CronJob", "kdflow-retrain"))

    def ok(src_ns: str, src: dict, dst: dict, port: int) -> bool:
        return _admits(policies, namespaces, src_ns, src, "kdflow", dst, port)

    assert ok(pipeline_ns, step, mlflow, 5000)
    assert ok("kdflow", mlflow, postgres, 5432) and ok("kdflow", mlflow, minio, 9000)
    assert not ok(pipeline_ns, {"app": "other"}, mlflow, 5000), "unlabelled pods in the pipeline namespace"
    assert not ok("other", step, mlflow, 5000), "labelled pods in another namespace"
    assert not ok("kdflow", cron, mlflow, 5000)
    assert not ok(pipeline_ns, step, postgres, 5432) and not ok(pipeline_ns, step, minio, 9000)
    assert not ok("kdflow", cron, postgres, 5432) and not ok("kdflow", minio, postgres, 5432)
    assert not ok("kdflow", mlflow, minio, 9001), "only the S3 port"


# -- manifests and pipeline config agree -------------------------------------------------------


def test_manifests_match_the_pipeline_config_defaults(rendered: dict) -> None:
    objs = rendered["prod"]
    defaults = ClusterConfig()
    assert defaults.service_account is not None  # the default names the account k8s/ creates
    runner = one(objs, "ServiceAccount", defaults.service_account)
    binding = one(objs, "RoleBinding", "kdflow-pipeline-runner")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": runner["metadata"]["name"], "namespace": runner["metadata"]["namespace"]}
    ]
    rules = one(objs, "Role", "kdflow-pipeline-runner")["rules"]
    assert not any("*" in r.get("verbs", []) + r.get("resources", []) for r in rules)
    assert all(r.get("resourceNames") for r in rules if "secrets" in r["resources"]), "secrets only by name"
    # The Secrets every step reads exist as templates, in the pipeline namespace, with those keys.
    templates = {
        s["metadata"]["name"]: s for p in (K8S / "secrets").glob("*.yaml") for s in yaml.safe_load_all(p.read_text())
    }
    for secret in defaults.secrets:
        template = templates[secret.name]
        assert template["metadata"]["namespace"] == runner["metadata"]["namespace"], secret.name
        assert set(secret.env) <= set(template["stringData"]), secret.name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cronjob_submits_a_valid_config_with_the_deployed_image(rendered: dict, overlay: str) -> None:
    objs = rendered[overlay]
    cron = one(objs, "CronJob", "kdflow-retrain")
    assert cron["spec"]["suspend"] is True and cron["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = pod_spec(cron)["containers"]
    settings = [c for c in find(objs, "ConfigMap") if c["metadata"]["name"].startswith("kdflow-submit-")]
    (submit_env,) = settings
    assert container["image"] == submit_env["data"]["KDFLOW_IMAGE"], "images: and KDFLOW_IMAGE must agree"
    assert container["image"] == one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["image"]
    # The command line, with the env references the kubelet would expand, parses as `kdflow submit`.
    env = {
        e["name"]: submit_env["data"][e["valueFrom"]["configMapKeyRef"]["key"]]
        for e in container["env"]
        if "valueFrom" in e
    }
    for e in container["env"]:
        assert e["valueFrom"]["configMapKeyRef"]["name"] == submit_env["metadata"]["name"] if "valueFrom" in e else True
    argv = container["command"]
    for name, value in env.items():
        argv = [a.replace(f"$({name})", value) for a in argv]
    assert argv[:2] == ["kdflow", "submit"]
    args = build_parser().parse_args(argv[1:])
    assert args.host.startswith("http://ml-pipeline.") and args.overrides == [f"image={container['image']}"]
    # The mounted config is a valid pipeline config that can run on the cluster.
    (config_map,) = [c for c in find(objs, "ConfigMap") if c["metadata"]["name"].startswith("kdflow-pipeline-config-")]
    mounted = {v["configMap"]["name"] for v in pod_spec(cron)["volumes"] if "configMap" in v}
    assert mounted == {config_map["metadata"]["name"]}
    cfg = parse_config(yaml.safe_load(config_map["data"]["pipeline.yaml"]), args.overrides, origin="pipeline.yaml")
    check_cluster_config(cfg)
    assert cfg.image == container["image"]
    # The recipe is the demo's: the CronJob retrains what `kdflow run --local configs/demo.yaml` trains.
    assert cfg.config_hash() == load_config(REPO / "configs" / "demo.yaml").config_hash()
