"""MLflow tracking: one parent run per pipeline run, one nested run per step.

With the other adapters (model_registry, serving, verify_child), the only places that import
mlflow. Steps run in separate processes (KFP tasks), so nothing is kept in MLflow's fluent
global state: the parent run is found by its ``kdflow.pipeline_run_id`` tag and every call goes
through an explicit MlflowClient.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from kd_lib.artifacts import (
    EVALUATION_FILE,
    GATE_FILE,
    HISTORY_FILE,
    parse_decision,
    parse_evaluation,
    parse_history,
)
from kd_lib.config import PipelineConfig, RetryConfig
from kd_lib.errors import KdflowError

log = logging.getLogger(__name__)

# MLflow draws a progress bar for every artifact download once tqdm is installed; kdflow's
# artifacts are small JSON files, and the bars would clutter every step's log and the CLI.
# setdefault: a user who sets the variable keeps the choice.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PIPELINE_RUN_TAG = "kdflow.pipeline_run_id"
STEP_TAG = "kdflow.step"
# A sweep candidate's steps carry its name; the parent run names the one the sweep chose.
CANDIDATE_TAG = "kdflow.candidate"
SELECTED_TAG = "kdflow.sweep_selected"
PARENT_TAG = "mlflow.parentRunId"
# MLflow caps a param value at 6000 characters; long values are truncated, never dropped.
_MAX_PARAM_LEN = 6000


class TrackingError(KdflowError, RuntimeError):
    """MLflow is unreachable or refused a request; the message names the server and the fix."""

    default_fix = (
        "start the MLflow server, or point --tracking-uri / MLFLOW_TRACKING_URI / tracking.tracking_uri "
        "at the right one"
    )


def resolve_tracking_uri(cfg: PipelineConfig | None = None) -> str:
    """``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store."""
    if cfg is not None and cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def absolute_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute so subprocesses in other dirs share it."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def connect_error(url: str, timeout: float = 5.0) -> OSError | None:
    """Try a TCP connection to an http(s) URL's host and port; the error, or None if it answered."""
    parsed = urlparse(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return None
    except OSError as err:
        return err


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when an HTTP tracking server cannot be reached.

    MLflow's own client retries for minutes before giving up; a pre-flight TCP connect
    tells the user within seconds which server is down.
    """
    if urlparse(uri).scheme not in ("http", "https"):
        return
    err = connect_error(uri, timeout)
    if err is not None:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({err.strerror or err})",
            "start it, or point MLFLOW_TRACKING_URI / tracking.tracking_uri at a running server",
        )


def apply_retry_policy(retry: RetryConfig) -> None:
    """Configure MLflow's HTTP client (urllib3 retries on connection errors, 429 and 5xx with
    exponential backoff) from ``tracking.retry``; it reads these variables on every request."""
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retry.max_attempts - 1)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(retry.backoff_s)
    # MLflow parses this variable as an int (a "0.5" would not parse) and a 0 s timeout makes
    # every request fail: round up, so 0.5 s becomes 1 s and 2.1 s becomes 3 s, never less.
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(max(1, math.ceil(retry.timeout_s)))


def wait_reachable(uri: str, retry: RetryConfig) -> None:
    """check_reachable with bounded exponential backoff: rides out a server restart."""
    for attempt in range(retry.max_attempts):
        try:
            check_reachable(uri, timeout=min(5.0, retry.timeout_s))
            return
        except TrackingError:
            if attempt == retry.max_attempts - 1:
                raise
            wait = retry.backoff_s * 2**attempt
            log.warning(
                "MLflow at %s unreachable (try %d/%d); retrying in %.1f s", uri, attempt + 1, retry.max_attempts, wait
            )
            time.sleep(wait)


def client_for(cfg: PipelineConfig) -> MlflowClient:
    """A client for the configured server, after waiting (bounded) for it to be reachable."""
    uri = resolve_tracking_uri(cfg)
    apply_retry_policy(cfg.tracking.retry)
    wait_reachable(uri, cfg.tracking.retry)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        # Another process created it between our lookup and create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _param_text(value: Any) -> str:
    """Plain strings as they are, everything else as JSON; a string that would read back as
    another JSON type ("2", "true") is quoted so the params turn back into the same config."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value)


def _params(flat: dict[str, Any]) -> list[Param]:
    return [Param(k, _param_text(v)[:_MAX_PARAM_LEN]) for k, v in sorted(flat.items())]


def find_parent_run(client: MlflowClient, experiment: str, pipeline_run_id: str) -> str | None:
    """The MLflow run id of the parent run of ``pipeline_run_id``, or None."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}' and tags.`{STEP_TAG}` = 'pipeline'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def ensure_parent_run(client: MlflowClient, cfg: PipelineConfig, pipeline_run_id: str) -> str:
    """Find or create the parent run of this pipeline run; the config goes in as params once."""
    existing = find_parent_run(client, cfg.tracking.experiment, pipeline_run_id)
    if existing:
        return existing
    exp_id = _experiment_id(client, cfg.tracking.experiment)
    run = client.create_run(
        exp_id,
        run_name=pipeline_run_id,
        tags={PIPELINE_RUN_TAG: pipeline_run_id, STEP_TAG: "pipeline", "kdflow.config_hash": cfg.config_hash()},
    )
    client.log_batch(run.info.run_id, params=_params(cfg.flat()))
    return run.info.run_id


class StepRun:
    """Handle for logging into one step's nested run (explicit run ids, no fluent state)."""

    def __init__(self, client: MlflowClient, run_id: str, parent_run_id: str) -> None:
        self.client = client
        self.run_id = run_id
        self.parent_run_id = parent_run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if isinstance(v, (int, float))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, params=_params(params))

    def set_tags(self, tags: dict[str, Any], on_parent: bool = False) -> None:
        run_id = self.parent_run_id if on_parent else self.run_id
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, obj: Any, filename: str, on_parent: bool = False) -> None:
        self.client.log_dict(self.parent_run_id if on_parent else self.run_id, obj, filename)

    def log_text(self, text: str, filename: str, on_parent: bool = False) -> None:
        self.client.log_text(self.parent_run_id if on_parent else self.run_id, text, filename)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)


@contextmanager
def step_run(cfg: PipelineConfig, pipeline_run_id: str, step: str) -> Iterator[StepRun]:
    """Open a nested MLflow run for one DAG step; FINISHED on success, FAILED on exception.

    A sweep candidate's step (``cfg.candidate`` set) is named ``step[candidate]`` and tagged
    ``kdflow.candidate``, so the candidates' runs under the one parent tell apart.
    """
    client = client_for(cfg)
    tags = {PIPELINE_RUN_TAG: pipeline_run_id, STEP_TAG: step}
    if cfg.candidate:
        tags[CANDIDATE_TAG] = cfg.candidate
    try:
        parent = ensure_parent_run(client, cfg, pipeline_run_id)
        exp_id = _experiment_id(client, cfg.tracking.experiment)
        run = client.create_run(
            exp_id,
            run_name=f"{step}[{cfg.candidate}]" if cfg.candidate else step,
            tags={PARENT_TAG: parent, **tags},
        )
    except MlflowException as err:
        raise TrackingError(f"MLflow at {resolve_tracking_uri(cfg)} refused to start the {step} run: {err}") from None
    handle = StepRun(client, run.info.run_id, parent)
    try:
        yield handle
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")


@contextmanager
def fluent_run(client: MlflowClient, run_id: str) -> Iterator[None]:
    """Make ``run_id`` MLflow's active fluent run (log_model needs one), then undo everything.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` also export MLFLOW_*_URI environment
    variables that child processes inherit; they are restored here so a library call leaves
    no global trace.
    """
    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(client.tracking_uri)
    mlflow.set_registry_uri(client._registry_uri)  # type: ignore[arg-type]  # resolved to a URI by MlflowClient
    try:
        with mlflow.start_run(run_id=run_id):
            yield
    finally:
        # set_*_uri always export their env var, so clearing the globals and restoring the
        # variables brings URI resolution back to exactly what it was.
        # None resets each to its default at run time; MLflow's annotations only admit a URI.
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
        mlflow.set_registry_uri(None)  # type: ignore[arg-type]
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def finish_pipeline_run(cfg: PipelineConfig, pipeline_run_id: str, state: str, error: str = "") -> str | None:
    """Close the parent run with the pipeline's final state (called by the exit handler)."""
    client = client_for(cfg)
    parent = find_parent_run(client, cfg.tracking.experiment, pipeline_run_id)
    if parent is None:
        return None
    tags = [RunTag("kdflow.pipeline_state", state)]
    if error:
        tags.append(RunTag("kdflow.pipeline_error", error[:5000]))
    client.log_batch(parent, tags=tags)
    client.set_terminated(parent, status="FINISHED" if state == "SUCCEEDED" else "FAILED")
    return parent


# ---------------------------------------------------------------- reading a pipeline run back


class RunNotFoundError(TrackingError):
    """No MLflow run (nor kdflow pipeline run) has the id the user gave."""


def client_for_uri(uri: str | None = None) -> MlflowClient:
    """A client for ``uri`` (else ``$MLFLOW_TRACKING_URI``, else the embedded sqlite store).

    For commands that have no pipeline config (``kdflow models``, ``kdflow report``). A
    sqlite store that does not exist is an error here: MLflow would silently create an
    empty one, and the user would see "not found" instead of "wrong directory".
    """
    uri = absolute_tracking_uri(uri or resolve_tracking_uri())
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri[len(prefix) :]).is_file():
        raise TrackingError(
            f"no MLflow store at {uri[len(prefix) :]}",
            "run kdflow in the directory where the pipeline ran, or pass --tracking-uri (or set "
            "MLFLOW_TRACKING_URI) to the store it used",
        )
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def resolve_parent_run(client: MlflowClient, run_id: str) -> str:
    """The parent (pipeline) run for an MLflow run id of the parent or of any step, or a kdflow
    pipeline run id (the KFP job name)."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        run = None
    if run is not None:
        return run.data.tags.get(PARENT_TAG) or run.info.run_id
    experiments = [e.experiment_id for e in client.search_experiments()]
    if experiments:
        found = client.search_runs(
            experiments,
            filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{run_id}' and tags.`{STEP_TAG}` = 'pipeline'",
            max_results=1,
        )
        if found:
            return found[0].info.run_id
    raise RunNotFoundError(
        f"no MLflow run or kdflow pipeline run {run_id!r} in {client.tracking_uri}",
        "use the id of the 'MLflow parent run' line that `kdflow run` printed, with the tracking URI that run used",
    )


def _json_artifact(client: MlflowClient, run_id: str, path: str) -> Any:
    """A JSON artifact of a run, or None when the run never logged it."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = client.download_artifacts(run_id, path, tmp)
            return json.loads(Path(local).read_text())
        except (MlflowException, OSError, ValueError):
            return None


def _latest_steps(runs: list[Any]) -> dict[str, str]:
    """Step name -> run id; when a step ran more than once (retries), the newest finished run.

    A sweep candidate's steps are keyed ``step[candidate]``.
    """
    steps: dict[str, str] = {}
    ranked = sorted(runs, key=lambda r: (r.info.status == "FINISHED", r.info.start_time or 0))
    for r in ranked:  # later (better) entries overwrite earlier ones
        step = r.data.tags.get(STEP_TAG, r.info.run_name)
        candidate = r.data.tags.get(CANDIDATE_TAG)
        steps[f"{step}[{candidate}]" if candidate else step] = r.info.run_id
    return steps


def pipeline_record(client: MlflowClient, parent_run_id: str) -> dict[str, Any]:
    """Everything a pipeline run recorded, as plain dicts: what a report is rebuilt from.

    Keys: ``parent_run_id``, ``status``, ``params``, ``tags``, ``steps`` (step -> run id),
    ``evaluation``, ``gate``, ``dataset_meta`` (None when that step did not log it),
    ``histories`` (``teacher``/``student`` -> per-epoch rows, for the steps that trained) and
    ``sweep`` (the select step's ``sweep.json``, None without a sweep). In a sweep the
    chosen candidate's steps are also under their plain names (``evaluate`` ->
    ``evaluate[<chosen>]``), so evaluation and histories are the chosen candidate's.
    """
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000
    )
    steps = _latest_steps(children)
    selected = parent.data.tags.get(SELECTED_TAG)
    if selected:
        suffix = f"[{selected}]"
        steps |= {key[: -len(suffix)]: run for key, run in list(steps.items()) if key.endswith(suffix)}
    histories = {}
    for role, step in (("teacher", "train_teacher"), ("student", "distill")):
        rows = _json_artifact(client, steps[step], HISTORY_FILE) if step in steps else None
        if rows:
            histories[role] = parse_history(rows, f"{HISTORY_FILE} of run {steps[step]}").to_list()
    evaluation = _json_artifact(client, steps["evaluate"], EVALUATION_FILE) if "evaluate" in steps else None
    if evaluation is not None:
        evaluation = parse_evaluation(evaluation, f"{EVALUATION_FILE} of run {steps['evaluate']}").to_dict()
    gate = _json_artifact(client, parent_run_id, GATE_FILE) if parent.data.tags.get("kdflow.gate_status") else None
    if gate is not None:
        gate = parse_decision(gate, f"{GATE_FILE} of run {parent_run_id}").to_dict()
    return {
        "parent_run_id": parent_run_id,
        "status": parent.info.status,
        "params": dict(parent.data.params),
        "tags": dict(parent.data.tags),
        "steps": steps,
        "evaluation": evaluation,
        "gate": gate,
        "dataset_meta": (
            _json_artifact(client, steps["prepare_data"], "dataset_meta.json") if "prepare_data" in steps else None
        ),
        "histories": histories,
        "sweep": _json_artifact(client, parent_run_id, "sweep.json") if selected else None,
    }


def pipeline_summary(cfg: PipelineConfig, parent_run_id: str) -> dict[str, Any]:
    """``pipeline_record`` plus ``registered`` (model name, version, alias) when the run
    registered a version: what ``kdflow run`` prints at the end. Read back from MLflow, not
    from local files, so it works for cluster runs too."""
    summary = pipeline_record(client_for(cfg), parent_run_id)
    tags = summary["tags"]
    if tags.get("kdflow.registered_version"):
        summary["registered"] = {
            "model_name": cfg.registry.model_name,
            "version": tags["kdflow.registered_version"],
            "alias": tags.get("kdflow.alias", cfg.registry.alias),
        }
    return summary
