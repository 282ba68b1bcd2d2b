"""Send the compiled pipeline to a Kubeflow Pipelines cluster: one run, or a recurring run.

Both compile the config exactly as `kdflow compile` does and pass it as the pipeline's one
parameter, `config_json`. Credentials never travel here: the steps read them from the
Kubernetes Secrets named in `cluster.secrets`; the only credential this module handles is
the caller's own KFP API token (`KDFLOW_KFP_TOKEN`, or a projected service-account token at
`KF_PIPELINES_SA_TOKEN_PATH` in a pod), sent as an HTTP header.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from kd_lib.adapters.tracking import connect_error
from kd_lib.config import ConfigError, PipelineConfig
from kd_lib.errors import KdflowError

TOKEN_ENV = "KDFLOW_KFP_TOKEN"
SA_TOKEN_PATH_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
_T = TypeVar("_T")


class SubmitError(KdflowError, RuntimeError):
    """The KFP API is unreachable or refused a request; the message names the host and the fix."""


class CronError(KdflowError, ValueError):
    """A schedule is not a 6-field KFP cron expression; the message says which field is wrong."""


# --------------------------------------------------------------------------------------------
# Cron: KFP uses robfig/cron with a seconds field first. A 5-field Unix cron such as
# "0 3 * * *" is *accepted* by that parser with the fields shifted (seconds=0, minutes=3,
# hours=*), i.e. hourly instead of daily, so it is refused here rather than passed on.
# --------------------------------------------------------------------------------------------

_CRON_FIELDS = (
    # name, lowest, highest, names accepted in place of numbers, '?' allowed
    ("second", 0, 59, (), False),
    ("minute", 0, 59, (), False),
    ("hour", 0, 23, (), False),
    ("day-of-month", 1, 31, (), True),
    ("month", 1, 12, ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC"), False),
    ("day-of-week", 0, 6, ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT"), True),
)
CRON_HELP = "6 fields: second minute hour day-of-month month day-of-week, e.g. '0 0 3 * * *' (every day at 03:00)"


def _cron_value(token: str, field: tuple) -> int:
    name, low, high, names, _ = field
    if token.upper() in names:
        return names.index(token.upper()) + low
    if not token.isdigit():
        raise CronError(f"cron {name} field: {token!r} is not a number{' or a name' if names else ''}")
    value = int(token)
    if not low <= value <= high:
        raise CronError(f"cron {name} field: {value} is outside {low}-{high}")
    return value


def _check_cron_field(text: str, field: tuple) -> None:
    name, _, _, _, question_ok = field
    for term in text.split(","):
        if not term:
            raise CronError(f"cron {name} field {text!r}: empty list item")
        base, slash, step = term.partition("/")
        if slash and (not step.isdigit() or int(step) < 1):
            raise CronError(f"cron {name} field {text!r}: the step after '/' must be a positive integer")
        if base == "*" or (base == "?" and question_ok):
            continue
        if base == "?":
            raise CronError(f"cron {name} field: '?' is only allowed in day-of-month and day-of-week")
        first, dash, last = base.partition("-")
        start = _cron_value(first, field)
        if dash and _cron_value(last, field) < start:
            raise CronError(f"cron {name} field {text!r}: range {base} runs backwards")


def validate_cron(expression: str) -> str:
    """Check a KFP cron expression (6 fields, seconds first) and return it normalized.

    Raises:
        CronError: wrong number of fields (a 5-field Unix cron gets a hint how to convert
            it), or a field with an unknown token, a value out of range, a bad step or range.
    """
    fields = expression.split()
    if len(fields) == 5:
        raise CronError(
            f"cron {expression!r} has 5 fields (Unix cron); KFP's cron has {CRON_HELP}. "
            f"Prepend the seconds: '0 {' '.join(fields)}'"
        )
    if len(fields) != 6:
        raise CronError(f"cron {expression!r} has {len(fields)} fields; KFP's cron has {CRON_HELP}")
    for text, field in zip(fields, _CRON_FIELDS, strict=True):
        _check_cron_field(text, field)
    return " ".join(fields)


# --------------------------------------------------------------------------------------------
# What a config must say before it can run on a cluster.
# --------------------------------------------------------------------------------------------


def check_cluster_config(cfg: PipelineConfig) -> None:
    """Refuse configs whose steps could not record their work when run as separate pods.

    Raises:
        ConfigError: the tracking URI is a local store (each pod has its own filesystem), or
            carries credentials (they would be stored in the run's parameters), or neither it
            nor a Secret provides MLFLOW_TRACKING_URI.
    """
    uri = cfg.tracking.tracking_uri
    if uri:
        parsed = urlparse(uri)
        if parsed.scheme not in ("http", "https"):
            raise ConfigError(
                f"tracking.tracking_uri {uri!r} is a local store: every step runs in its own pod, so its records "
                "would be lost. Use the MLflow server (http://...), best through the kdflow-mlflow Secret"
            )
        if parsed.username or parsed.password:
            raise ConfigError(
                "tracking.tracking_uri carries credentials, which would be stored in the run's parameters: "
                "remove them and put MLFLOW_TRACKING_USERNAME/PASSWORD in a Secret listed in cluster.secrets"
            )
        return
    provided = {env for secret in cfg.cluster.secrets for env in secret.env.values()}
    if "MLFLOW_TRACKING_URI" not in provided:
        raise ConfigError(
            "no MLflow server for the steps: set tracking.tracking_uri, or map a Secret key to "
            "MLFLOW_TRACKING_URI in cluster.secrets (the default kdflow-mlflow Secret does)"
        )


def pipeline_arguments(cfg: PipelineConfig) -> dict[str, Any]:
    """The run's parameters: the config, and nothing else (no credentials, no server addresses
    beyond what the config itself holds)."""
    return {"config_json": cfg.to_json()}


# --------------------------------------------------------------------------------------------
# The KFP API.
# --------------------------------------------------------------------------------------------


@dataclass
class Submission:
    """What the KFP API created."""

    kind: str  # "run" or "recurring run"
    id: str
    name: str
    experiment_id: str
    url: str
    replaced: list[str]


def _check_reachable(host: str, timeout: float = 5.0) -> None:
    parsed = urlparse(host)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SubmitError(f"--host {host!r} is not an http(s) URL, e.g. http://localhost:8080 after port-forwarding")
    err = connect_error(host, timeout)
    if err is not None:
        raise SubmitError(
            f"KFP API {host} is unreachable ({err.strerror or err}); check --host, or port-forward it: "
            "kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80"
        )


def connect(host: str, namespace: str | None = None) -> Any:
    """A ``kfp.Client`` for ``host``, authenticated by a token from the environment if any."""
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    _check_reachable(host)
    auth: dict[str, Any] = {}
    if os.environ.get(TOKEN_ENV):
        auth["existing_token"] = os.environ[TOKEN_ENV]
    elif os.environ.get(SA_TOKEN_PATH_ENV):
        auth["credentials"] = ServiceAccountTokenVolumeCredentials(os.environ[SA_TOKEN_PATH_ENV])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2 and later"
        return _call(host, "connect", lambda: kfp.Client(host=host, namespace=namespace or "kubeflow", **auth))


def _call(host: str, what: str, fn: Callable[[], _T]) -> _T:
    """Run one client call, turning HTTP and connection errors into a SubmitError that says what failed.

    kfp.Client prints links on stdout as it goes; they are swallowed here and the CLI prints its own.
    """
    import kfp_server_api
    import urllib3

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return fn()
    except kfp_server_api.ApiException as err:
        body = (err.body or "").strip() if isinstance(err.body, str) else str(err.body or "")
        hint = " (authenticate: set KDFLOW_KFP_TOKEN)" if err.status in (401, 403) else ""
        raise SubmitError(
            f"KFP API {host} refused to {what}: HTTP {err.status} {err.reason}{hint}: {body[:500]}"
        ) from None
    except (urllib3.exceptions.HTTPError, TimeoutError) as err:
        raise SubmitError(f"KFP API {host} failed while trying to {what}: {err}") from None


def _compiled(cfg: PipelineConfig, tmp: str) -> str:
    # lazy: kfp and the components load only for the commands that build a pipeline
    from pipelines.compile import compile_pipeline

    return str(compile_pipeline(cfg, Path(tmp) / f"{cfg.name}.yaml"))


def submit_run(
    cfg: PipelineConfig,
    host: str,
    experiment: str | None = None,
    namespace: str | None = None,
    run_name: str | None = None,
) -> Submission:
    """Compile ``cfg`` and create one run of it in ``experiment`` (default: the MLflow experiment name).

    Raises:
        ConfigError: the config cannot run on a cluster (see ``check_cluster_config``).
        SubmitError: the API is unreachable or refused the experiment or the run.
    """
    check_cluster_config(cfg)
    client = connect(host, namespace)
    name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tempfile.TemporaryDirectory(prefix="kdflow-submit-") as tmp:
        package = _compiled(cfg, tmp)
        result = _call(
            host,
            "create the run",
            lambda: client.create_run_from_pipeline_package(
                package,
                arguments=pipeline_arguments(cfg),
                run_name=name,
                experiment_name=experiment or cfg.tracking.experiment,
                namespace=namespace,
                service_account=cfg.cluster.service_account,
            ),
        )
    info = result.run_info
    return Submission(
        "run", result.run_id, name, info.experiment_id or "", f"{host.rstrip('/')}/#/runs/details/{result.run_id}", []
    )


def schedule_run(
    cfg: PipelineConfig,
    host: str,
    cron: str,
    experiment: str | None = None,
    namespace: str | None = None,
    name: str | None = None,
    replace: bool = False,
    max_concurrency: int = 1,
    catchup: bool = False,
) -> Submission:
    """Create a recurring run of ``cfg`` on the KFP cron schedule ``cron`` (validated first).

    A recurring run of the same name in the experiment is an error unless ``replace``: then
    the new one is created first and the old ones deleted after, so a failure never leaves
    the pipeline unscheduled. ``catchup=False`` runs only the latest missed interval after a
    pause (retraining twice on the same data is wasted work).

    Raises:
        CronError: ``cron`` is not a 6-field KFP cron expression (no request is made).
        ConfigError: the config cannot run on a cluster.
        SubmitError: the API is unreachable, refused a request, or the name is taken.
    """
    cron = validate_cron(cron)
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
    check_cluster_config(cfg)
    client = connect(host, namespace)
    name = name or f"{cfg.name}-scheduled"
    exp = _call(
        host,
        "get or create the experiment",
        lambda: client.create_experiment(name=experiment or cfg.tracking.experiment, namespace=namespace),
    )
    same_name = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    listed = _call(
        host,
        "list recurring runs",
        lambda: client.list_recurring_runs(experiment_id=exp.experiment_id, filter=same_name, page_size=100),
    )
    # Filter again by name: not every server version honours the filter.
    old = [r.recurring_run_id for r in (listed.recurring_runs or []) if r.display_name == name]
    if old and not replace:
        raise SubmitError(
            f"a recurring run named {name!r} already exists in experiment {exp.display_name!r} ({', '.join(old)}); "
            "pass --replace to swap it for this config, or --name for a second schedule"
        )
    with tempfile.TemporaryDirectory(prefix="kdflow-schedule-") as tmp:
        package = _compiled(cfg, tmp)
        created = _call(
            host,
            "create the recurring run",
            lambda: client.create_recurring_run(
                experiment_id=exp.experiment_id,
                job_name=name,
                description=f"kdflow {cfg.name}: retrain on '{cron}' (config hash {cfg.config_hash()[:12]})",
                cron_expression=cron,
                max_concurrency=max_concurrency,
                no_catchup=not catchup,
                params=pipeline_arguments(cfg),
                pipeline_package_path=package,
                service_account=cfg.cluster.service_account,
                enabled=True,
            ),
        )
    for old_id in old:
        _call(
            host, f"delete the replaced recurring run {old_id}", functools.partial(client.delete_recurring_run, old_id)
        )
    rid = created.recurring_run_id
    return Submission(
        "recurring run", rid, name, exp.experiment_id, f"{host.rstrip('/')}/#/recurringrun/details/{rid}", old
    )


def describe(sub: Submission) -> str:
    """Lines the CLI prints after a submission."""
    lines = [f"created {sub.kind} {sub.name!r}: {sub.id}", f"experiment: {sub.experiment_id}", f"view: {sub.url}"]
    if sub.replaced:
        lines.append(f"replaced: {', '.join(sub.replaced)}")
    return "\n".join(lines)
