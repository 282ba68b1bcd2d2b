"""`kdflow submit` / `kdflow schedule` against a stand-in for the KFP API.

No Kubeflow Pipelines backend can run here (it needs a Kubernetes cluster with Argo and the
KFP API server), so the real ``kfp.Client`` talks to ``FakeKfpApi``, a small HTTP server on
127.0.0.1 that implements the v2beta1 endpoints these commands call and records every
request. The tests assert what a real backend would receive: the compiled pipeline, the
run's arguments, the cron schedule, and never a credential.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from kd_lib.config import ConfigError, PipelineConfig, load_config
from pipelines import cli
from pipelines.submit import CronError, SubmitError, schedule_run, submit_run, validate_cron
from tests.pipelines.fake_kfp_api import FakeKfpApi

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
SECRET = "s3cr3t-value-that-must-never-leave-this-process"


@pytest.fixture(autouse=True)
def _isolated_client_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # kfp.Client reads ~/.config/kfp/context.json; credentials in the environment must stay here.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in (
        "KDFLOW_KFP_TOKEN",
        "KF_PIPELINES_SA_TOKEN_PATH",
        "KF_PIPELINES_ENDPOINT",
        "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
        "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
    ):
        monkeypatch.delenv(var, raising=False)
    for var in ("AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, SECRET)


@pytest.fixture
def api() -> Iterator[FakeKfpApi]:
    with FakeKfpApi() as server:
        yield server


@pytest.fixture
def cfg() -> PipelineConfig:
    return load_config(DEMO, ["image=registry.example.com/ml/kdflow:0.1.0"])


def _spec_docs(body: dict) -> tuple[dict, dict]:
    """The pipeline spec and platform spec a run/recurring-run request carries."""
    spec = body["pipeline_spec"]
    return spec["pipeline_spec"], spec["platform_spec"]


def _assert_carries_the_compiled_pipeline(body: dict, cfg: PipelineConfig) -> None:
    pipeline, platform = _spec_docs(body)
    assert pipeline["pipelineInfo"]["name"] == cfg.name
    executors = pipeline["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {cfg.image}
    assert "exec-register" in executors and "exec-finalize" in executors
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert [s["secretName"] for s in k8s["exec-distill"]["secretAsEnv"]] == [s.name for s in cfg.cluster.secrets]
    # The arguments: the config and nothing else.
    assert body["runtime_config"]["parameters"] == {"config_json": cfg.to_json()}
    assert body["service_account"] == cfg.cluster.service_account


def test_submit_creates_experiment_and_run(api: FakeKfpApi, cfg: PipelineConfig) -> None:
    sub = submit_run(cfg, api.url, run_name="nightly-1")
    (created_exp,) = api.calls("POST", "/experiments")
    assert created_exp.body["display_name"] == cfg.tracking.experiment
    (run,) = api.calls("POST", "/runs")
    assert run.body["display_name"] == "nightly-1"
    assert run.body["experiment_id"] == sub.experiment_id == next(iter(api.experiments))
    _assert_carries_the_compiled_pipeline(run.body, cfg)
    assert sub.id in api.runs and sub.url.endswith(f"/#/runs/details/{sub.id}")
    assert all(SECRET not in r.raw and SECRET not in json.dumps(r.headers) for r in api.requests)


def test_submit_reuses_an_existing_experiment(api: FakeKfpApi, cfg: PipelineConfig) -> None:
    submit_run(cfg, api.url, experiment="team-a")
    submit_run(cfg, api.url, experiment="team-a")
    assert len(api.calls("POST", "/experiments")) == 1
    assert len({r.body["experiment_id"] for r in api.calls("POST", "/runs")}) == 1


def test_schedule_sends_the_cron_and_the_pipeline(api: FakeKfpApi, cfg: PipelineConfig) -> None:
    sub = schedule_run(cfg, api.url, "0 0 3 * * *", name="nightly")
    (rr,) = api.calls("POST", "/recurringruns")
    body = rr.body
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert body["display_name"] == "nightly" and body["mode"] == "ENABLE"
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
    _assert_carries_the_compiled_pipeline(body, cfg)
    assert sub.id in api.recurring_runs and not sub.replaced
    assert all(SECRET not in r.raw for r in api.requests)


def test_schedule_refuses_a_taken_name_then_replaces_it(api: FakeKfpApi, cfg: PipelineConfig) -> None:
    first = schedule_run(cfg, api.url, "0 0 3 * * *")
    with pytest.raises(SubmitError, match="--replace"):
        schedule_run(cfg, api.url, "0 30 4 * * *")
    assert list(api.recurring_runs) == [first.id]
    second = schedule_run(cfg, api.url, "0 30 4 * * *", replace=True)
    assert second.replaced == [first.id]
    assert list(api.recurring_runs) == [second.id]
    # Created before the old one was deleted: never a moment without a schedule.
    order = [
        (r.method, r.path.rsplit("/", 1)[-1]) for r in api.requests if "recurringruns" in r.path and r.method != "GET"
    ]
    assert order[-2:] == [("POST", "recurringruns"), ("DELETE", first.id)]


@pytest.mark.parametrize(
    "cron, message",
    [
        ("0 3 * * *", "5 fields .*Prepend the seconds: '0 0 3 \\* \\* \\*'"),
        ("0 0 3 * *", "5 fields"),
        ("0 0 3 * * * *", "7 fields"),
        ("0 60 3 * * *", "minute field: 60 is outside 0-59"),
        ("0 0 24 * * *", "hour field: 24"),
        ("0 0 3 0 * *", "day-of-month field: 0 is outside 1-31"),
        ("0 0 3 * 13 *", "month field: 13"),
        ("0 0 3 * * 7", "day-of-week field: 7 is outside 0-6"),
        ("0 0 3 * * MONDAY", "not a number or a name"),
        ("0 */0 * * * *", "step after '/' must be a positive integer"),
        ("0 0 5-1 * * *", "runs backwards"),
        ("? 0 3 * * *", "only allowed in day-of-month"),
        ("0 0 3 1,,2 * *", "empty list item"),
        ("@daily", "1 fields"),
    ],
)
def test_invalid_cron_is_refused_before_any_request(
    api: FakeKfpApi, cfg: PipelineConfig, cron: str, message: str
) -> None:
    with pytest.raises(CronError, match=message):
        schedule_run(cfg, api.url, cron)
    assert api.requests == []


@pytest.mark.parametrize(
    "cron",
    [
        "0 0 3 * * *",
        "*/30 * * * * *",
        "0 0 9 ? * MON-FRI",
        "0 0 0 1 jan,jul ?",
        "0 15,45 8-18/2 * * 1-5",
        "0 0 3 31 12 6",
    ],
)
def test_valid_cron_passes(cron: str) -> None:
    assert validate_cron(f"  {cron} ") == cron


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["tracking.tracking_uri=sqlite:///mlflow.db"], "local store"),
        # Refused as early as the config itself (a password must never become a parameter).
        (["tracking.tracking_uri=http://user:pw@mlflow:5000"], "contains a password"),
        (["cluster.secrets=[]"], "no MLflow server for the steps"),
    ],
)
def test_configs_that_cannot_run_on_a_cluster_are_refused(api: FakeKfpApi, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        submit_run(load_config(DEMO, overrides), api.url)
    assert api.requests == []


def test_an_http_tracking_uri_without_secrets_is_accepted(api: FakeKfpApi) -> None:
    cfg = load_config(DEMO, ["cluster.secrets=[]", "tracking.tracking_uri=http://mlflow.kdflow.svc.cluster.local:5000"])
    submit_run(cfg, api.url)
    (run,) = api.calls("POST", "/runs")
    _, platform = _spec_docs(run.body)
    assert "secretAsEnv" not in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-gate"]


def test_the_token_goes_in_the_authorization_header(api: FakeKfpApi, cfg: PipelineConfig, monkeypatch) -> None:
    monkeypatch.setenv("KDFLOW_KFP_TOKEN", "tok-123")
    submit_run(cfg, api.url)
    (run,) = api.calls("POST", "/runs")
    assert run.headers["authorization"] == "Bearer tok-123"
    assert "tok-123" not in run.raw


def test_a_projected_service_account_token_is_used_in_a_pod(api: FakeKfpApi, cfg, tmp_path, monkeypatch) -> None:
    token = tmp_path / "token"
    token.write_text("sa-token-xyz")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    submit_run(cfg, api.url)
    (run,) = api.calls("POST", "/runs")
    assert run.headers["authorization"] == "Bearer sa-token-xyz"


def test_api_errors_name_the_host_and_the_step(api: FakeKfpApi, cfg: PipelineConfig) -> None:
    api.fail_with = (403, "user is not allowed to create runs in namespace kubeflow")
    with pytest.raises(SubmitError, match=r"refused to create the run: HTTP 403.*KDFLOW_KFP_TOKEN.*not allowed"):
        submit_run(cfg, api.url)


def test_unreachable_host_fails_fast(cfg: PipelineConfig) -> None:
    with pytest.raises(SubmitError, match="unreachable.*port-forward"):
        submit_run(cfg, "http://127.0.0.1:9")


def test_cli_submit_and_schedule(api: FakeKfpApi, capsys: pytest.CaptureFixture[str]) -> None:
    base = [str(DEMO), "--host", api.url, "--set", "image=registry.example.com/ml/kdflow:0.1.0"]
    assert cli.main(["submit", *base, "--experiment", "cli-exp", "--run-name", "r1"]) == 0
    out = capsys.readouterr().out
    (run_id,) = api.runs
    assert f"created run 'r1': {run_id}" in out and f"/#/runs/details/{run_id}" in out
    assert api.experiments[api.runs[run_id]["experiment_id"]]["display_name"] == "cli-exp"

    assert cli.main(["schedule", *base, "--cron", "0 0 3 * * *", "--max-concurrency", "2", "--catchup"]) == 0
    (rr,) = api.recurring_runs.values()
    assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert int(rr["max_concurrency"]) == 2 and rr["no_catchup"] is False
    cfg = json.loads(rr["runtime_config"]["parameters"]["config_json"])
    assert cfg["image"] == "registry.example.com/ml/kdflow:0.1.0"

    n = len(api.requests)
    assert cli.main(["schedule", *base, "--cron", "0 3 * * *"]) == 1
    assert "Prepend the seconds" in capsys.readouterr().err
    assert len(api.requests) == n


def test_submitted_spec_equals_kdflow_compile(api: FakeKfpApi, cfg: PipelineConfig, tmp_path: Path) -> None:
    from pipelines.compile import compile_pipeline

    submit_run(cfg, api.url)
    (run,) = api.calls("POST", "/runs")
    pipeline, platform = _spec_docs(run.body)
    compiled = list(yaml.safe_load_all(compile_pipeline(cfg, tmp_path / "p.yaml").read_text()))
    assert pipeline == compiled[0] and platform == compiled[1]
