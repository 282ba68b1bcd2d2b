"""`kdflow`: validate a config, run the DAG locally, compile it for a KFP cluster, list the
registered models and rebuild a run's report.

One function per command (``_cmd_<name>(cfg, args)``), registered in ``COMMANDS``; commands
that take a pipeline config get it loaded and validated by ``main`` (``cfg`` is None for the
others). Errors print one line of cause and one of fix; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from tabulate import tabulate

from kd_lib.config import ConfigError, PipelineConfig, load_config
from kd_lib.config.advice import advise
from kd_lib.errors import KdflowError

EXAMPLES = """examples:
  kdflow validate configs/demo.yaml --set distill.losses.0.params.temperature=2
  kdflow run --local configs/demo.yaml
  kdflow run --local configs/demo.yaml --set gate.min_accuracy=0.99
  kdflow compile configs/demo.yaml -o build/pipeline.yaml
  kdflow models kdflow-demo-student
  kdflow report 7ca76df42f2b4adf988f58166d66022a -o report.html
  kdflow submit configs/demo.yaml --host http://localhost:8080 --set image=registry.example.com/kdflow:0.1.0
  kdflow schedule configs/demo.yaml --host http://localhost:8080 --cron "0 0 3 * * *"

MLflow: the tracking URI is tracking.tracking_uri in the config, else $MLFLOW_TRACKING_URI,
else sqlite:///mlflow.db in the current directory. `kdflow <command> --help` explains each command.
"""


class CliError(KdflowError):
    """An error the user can fix: what went wrong, and what to do about it."""


def _sub(sub: Any, name: str, summary: str, description: str, examples: str) -> argparse.ArgumentParser:
    p = sub.add_parser(
        name,
        help=summary,
        description=description,
        epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    # Also accepted after the command (`kdflow run ... --debug`); SUPPRESS keeps the global value otherwise.
    p.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"show the full traceback of an error, e.g. kdflow {name} --debug ...",
    )
    return p


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline config (YAML), e.g. configs/demo.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override one field by its dotted path (repeatable; the value is YAML), "
        "e.g. --set distill.train.epochs=30",
    )


def _tracking_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here), "
        "e.g. --tracking-uri http://mlflow.kubeflow:5000",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdflow",
        description="Knowledge distillation as a Kubeflow Pipelines + MLflow workflow: train (or import) a "
        "teacher, distill and quantize a student, evaluate all three, and register the student in MLflow "
        "only when it passes the accuracy and size gates.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of an error, e.g. kdflow --debug run ..."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _sub(
        sub,
        "validate",
        "print the resolved config, or every invalid field by dotted path",
        "Load a pipeline config, apply --set overrides, validate every field and print the result "
        "with every default filled in. Exit status 2 when a field is invalid.",
        "  kdflow validate configs/demo.yaml\n  kdflow validate configs/demo.yaml --set gate.max_size_mb=0.25\n",
    )
    _config_args(p)

    p = _sub(
        sub,
        "run",
        "run the pipeline (prepare, teacher, distill, quantize, evaluate, gate, register)",
        "Run the whole DAG on this machine with KFP's local runner: one line per step with its time; "
        "the full kfp.local log goes to <root>/<run>/kfp-local.log. Ends with the models table, every "
        "gate check, the decision, and where the HTML report is.",
        "  kdflow run --local configs/demo.yaml\n"
        "  kdflow run --local configs/demo.yaml --set teacher.train.epochs=5 --root /tmp/kdflow-runs\n"
        "  MLFLOW_TRACKING_URI=http://127.0.0.1:5000 kdflow run --local configs/demo.yaml --verbose\n",
    )
    _config_args(p)
    p.add_argument(
        "--local",
        action="store_true",
        required=True,
        help="run on this machine with kfp.local (required; clusters take `kdflow compile` output), "
        "e.g. kdflow run --local configs/demo.yaml",
    )
    p.add_argument(
        "--root",
        default=".kdflow/runs",
        help="where local task artifacts go (default: .kdflow/runs), e.g. --root /tmp/runs",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show kfp.local's own full output instead of one line per step, "
        "e.g. kdflow run --local -v configs/demo.yaml",
    )

    p = _sub(
        sub,
        "compile",
        "write the KFP IR YAML, with the config as the default of config_json",
        "Compile the DAG to the KFP v2 pipeline spec (IR YAML) to upload to a Kubeflow Pipelines cluster; "
        "the validated config becomes the default value of its config_json parameter.",
        "  kdflow compile configs/demo.yaml -o build/pipeline.yaml\n",
    )
    _config_args(p)
    p.add_argument("-o", "--output", required=True, help="output file, e.g. -o build/pipeline.yaml")

    p = _sub(
        sub,
        "models",
        "list a registered model's versions: aliases, gate status, accuracy, size",
        "List every version of a registered model, newest first, with its aliases (e.g. champion), its gate "
        "status (the validation_status tag), test accuracy and artifact size, and the pipeline run that made "
        "it. Without NAME, list the registered models.",
        "  kdflow models kdflow-demo-student\n  kdflow models\n"
        "  kdflow models kdflow-demo-student --tracking-uri http://127.0.0.1:5000\n",
    )
    p.add_argument("name", nargs="?", help="registered model name (registry.model_name), e.g. kdflow-demo-student")
    _tracking_arg(p)

    p = _sub(
        sub,
        "report",
        "rebuild a run's HTML compression report from MLflow",
        "Rebuild the compression report of a pipeline run from what MLflow recorded (evaluation, training "
        "curves, gate checks, registration) and write it as one self-contained HTML file, or as Markdown "
        "when FILE ends in .md.",
        "  kdflow report 7ca76df42f2b4adf988f58166d66022a -o report.html\n"
        "  kdflow report kdflow-distillation-2025-01-01-12-00-00-000000 -o summary.md\n",
    )
    p.add_argument(
        "run_id",
        metavar="RUN_ID",
        help="the MLflow parent run id that `kdflow run` prints (a step's run id or the KFP run name work too), "
        "e.g. 7ca76df42f2b4adf988f58166d66022a",
    )
    p.add_argument("-o", "--output", default="report.html", help="output file (default: report.html), e.g. -o run.md")
    _tracking_arg(p)

    p = _sub(
        sub,
        "submit",
        "compile the config and create one run on a Kubeflow Pipelines cluster",
        "Compile the pipeline with this config (image, resources, GPU and Secrets from its cluster section) and "
        "create one run through the KFP API. Credentials reach the steps only as Kubernetes Secrets.",
        "  kdflow submit configs/demo.yaml --host http://localhost:8080\n"
        "  kdflow submit configs/demo.yaml --host https://kfp.example.com --namespace team-a --experiment nightly\n",
    )
    _config_args(p)
    _cluster_args(p)
    p.add_argument(
        "--run-name", help="display name of the run (default: <config name>-<timestamp>), e.g. --run-name try-t4"
    )

    p = _sub(
        sub,
        "schedule",
        "create a recurring run (scheduled retraining) on a Kubeflow Pipelines cluster",
        "Compile the pipeline with this config and create a KFP recurring run on a cron schedule. KFP cron has "
        "6 fields, seconds first; the expression is validated before any API call.",
        '  kdflow schedule configs/demo.yaml --host http://localhost:8080 --cron "0 0 3 * * *"\n'
        '  kdflow schedule configs/demo.yaml --host http://localhost:8080 --cron "0 30 2 * * 1" --replace\n',
    )
    _config_args(p)
    _cluster_args(p)
    p.add_argument(
        "--cron",
        required=True,
        help="KFP cron, 6 fields with seconds first: second minute hour day-of-month month day-of-week, "
        "e.g. --cron '0 0 3 * * *' = every day at 03:00",
    )
    p.add_argument(
        "--name", help="display name of the recurring run (default: <config name>-scheduled), e.g. --name nightly"
    )
    p.add_argument("--replace", action="store_true", help="replace a recurring run of the same name, e.g. --replace")
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=1,
        help="runs of this schedule at once (default: 1), e.g. --max-concurrency 2",
    )
    p.add_argument(
        "--catchup",
        action="store_true",
        help="after a pause, start every missed run, not only the latest, e.g. --catchup",
    )
    return parser


def _cluster_args(p: argparse.ArgumentParser) -> None:
    host = os.environ.get("KF_PIPELINES_ENDPOINT")
    p.add_argument(
        "--host",
        default=host,
        required=host is None,
        help="KFP API endpoint (default: $KF_PIPELINES_ENDPOINT), e.g. --host http://localhost:8080",
    )
    p.add_argument(
        "--experiment", help="KFP experiment (default: tracking.experiment of the config), e.g. --experiment nightly"
    )
    p.add_argument("--namespace", help="namespace of a multi-user KFP (your profile), e.g. --namespace team-a")


# ---------------------------------------------------------------- formatting


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    """A plain-text table: left-aligned cells as ``_fmt`` writes them, a dashed rule under the header."""
    cells = [[_fmt(v) for v in row] for row in rows]
    return tabulate(cells, headers=headers, tablefmt="simple", disable_numparse=True, stralign="left")


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table: the three models, each gate check, the decision, the registration;
    for a sweep, first every candidate with its front membership and failed checks."""
    out: list[str] = []
    if summary.get("sweep"):
        # lazy: only a run's summary needs it; `kdflow validate` stays quick
        from kd_lib.evaluate.sweep import table_text

        out += ["Sweep candidates (quantized students, test split; * = chosen)", table_text(summary["sweep"]), ""]
    evaluation = summary.get("evaluation") or {}
    if evaluation:
        cols = ["accuracy", "macro_f1", "size_bytes", "num_params"]
        lat = sorted(k for k in next(iter(evaluation.values())) if k.startswith("latency_"))
        rows = [[role] + [row.get(c, "") for c in cols + lat] for role, row in evaluation.items()]
        out += ["Models (test split)", _table(["model"] + cols + [k.replace("latency_", "") for k in lat], rows), ""]
        # lazy: only a run's summary needs it; `kdflow validate` stays quick
        from kd_lib.report.facts import candidate_table, kd_gain_line

        gain = kd_gain_line(evaluation)
        if gain:
            out += [gain, ""]
        table = candidate_table(evaluation)
        if table:
            headers, rows, notes = table
            out += ["Deployment candidates (validation split)", _table(headers, rows), *notes, ""]
    gate = summary.get("gate")
    if gate:
        rows = [
            [c["name"], c["value"], c["op"], c["threshold"], c.get("unit", ""), "PASS" if c["passed"] else "FAIL"]
            for c in gate["checks"]
        ]
        out += ["Gate", _table(["check", "value", "op", "threshold", "unit", "verdict"], rows), ""]
        out.append(f"Decision: {'PASSED' if gate['passed'] else 'FAILED'}")
    reg = summary.get("registered")
    if reg:
        out.append(
            f"Registered: {reg['model_name']} version {reg['version']}, alias @{reg['alias']} -> v{reg['version']}"
        )
    elif gate:
        out.append("Registered: nothing (gate failed; alias untouched)")
    out.append(f"MLflow parent run: {summary.get('parent_run_id', '?')}")
    return "\n".join(out)


def _size(tag: str | None) -> str:
    if not tag:
        return "-"
    try:
        n = float(tag)
    except ValueError:
        return tag
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def _accuracy(tag: str | None) -> str:
    try:
        return f"{float(tag):.4f}" if tag else "-"
    except ValueError:
        return str(tag)


def _gate_status(tags: dict[str, str]) -> str:
    status = tags.get("validation_status", "-")
    failed = sorted(k[len("gate.") :] for k, v in tags.items() if k.startswith("gate.") and v.endswith("FAIL"))
    return f"{status} ({', '.join(failed)})" if failed else status


def format_versions(name: str, versions: list[dict[str, Any]]) -> str:
    """`kdflow models NAME`: one row per version, newest first."""
    rows = []
    for v in versions:
        tags = v["tags"]
        created = dt.datetime.fromtimestamp(v["created"] / 1000).strftime("%Y-%m-%d %H:%M") if v["created"] else "-"
        rows.append(
            [
                v["version"],
                ",".join(f"@{a}" for a in v["aliases"]) or "-",
                _gate_status(tags),
                _accuracy(tags.get("kdflow.test_accuracy")),
                _size(tags.get("kdflow.size_bytes")),
                tags.get("kdflow.quantization", "-"),
                created,
                tags.get("kdflow.pipeline_run_id", "-"),
            ]
        )
    headers = ["version", "aliases", "gate", "test_acc", "size", "quantization", "created", "pipeline run"]
    return f"{name}: {len(versions)} version(s)\n" + _table(headers, rows)


# ---------------------------------------------------------------- commands


def _cmd_validate(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
    print(f"# config OK (hash {cfg.config_hash()[:12]})", file=sys.stderr)
    if cfg.sweep is not None:
        # lazy: only a config with a sweep section needs the expansion
        from kd_lib.evaluate.sweep import expand

        names = [c.name for c in expand(cfg)]
        print(f"# sweep: {len(names)} candidates: {', '.join(names)}", file=sys.stderr)
    return 0


def _cmd_run(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    # lazy: mlflow (~1.5 s) loads only for the commands that talk to MLflow
    from kd_lib.adapters.tracking import absolute_tracking_uri, resolve_tracking_uri
    from pipelines.local import run_local

    print(f"kdflow: running {cfg.name} locally; MLflow at {absolute_tracking_uri(resolve_tracking_uri(cfg))}")
    result = run_local(cfg, root=args.root, verbose=args.verbose)
    print()
    print(
        f"kdflow run {result.pipeline_run_id}: {'SUCCEEDED' if result.succeeded else 'FAILED'} in {result.wall_s:.1f} s"
    )
    if result.summary:
        print(format_summary(result.summary))
    if result.report_path:
        print(f"Report: {result.report_path}")
    elif result.parent_run_id:
        print(f"Report: kdflow report {result.parent_run_id} -o report.html")
    print(f"Task artifacts: {result.pipeline_root}")
    if result.log_path:
        print(f"kfp.local log: {result.log_path}")
    if not result.succeeded:
        where = f" (full log: {result.log_path})" if result.log_path else ""
        if result.failure_cause:
            # End with the failed task's own error: what went wrong in it, and what to do.
            print(f"Nothing was registered and no alias moved; the failed task's log is above{where}.")
            raise CliError(
                f"task {result.failed_task} failed: {result.failure_cause}",
                result.failure_fix or f"read the failed task's log above{where}",
            )
        raise CliError(
            result.error.splitlines()[-1] if result.error else "the pipeline failed",
            f"read the failed task's log above{where}; nothing was registered and no alias moved",
        )
    return 0


def _cmd_compile(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    # lazy: kfp and the components load only for the commands that build a pipeline
    from pipelines.compile import compile_pipeline

    out = compile_pipeline(cfg, args.output)
    print(f"wrote {out}")
    return 0


def _model_registry() -> Any:
    """Import kd_lib.adapters.model_registry without MLflow's import-time warning that predict has no
    type hints (ours has none on purpose; MLflow forces the warning past warning filters)."""
    with contextlib.redirect_stderr(io.StringIO()):
        # lazy: mlflow (~1.5 s) loads only for the commands that talk to MLflow
        from kd_lib.adapters import model_registry
    return model_registry


def _cmd_models(cfg: None, args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    # lazy: mlflow (~1.5 s) loads only for the commands that talk to MLflow
    from kd_lib.adapters.tracking import client_for_uri

    ModelRegistry = _model_registry().ModelRegistry

    client = client_for_uri(args.tracking_uri)
    if not args.name:
        models = client.search_registered_models()
        if not models:
            raise CliError(
                f"no registered models in {client.tracking_uri}",
                "run `kdflow run --local CONFIG` first, or pass the --tracking-uri the pipeline used",
            )
        rows = []
        for m in models:
            versions = ModelRegistry(client, m.name).versions()
            aliases = ", ".join(f"@{a} -> v{v}" for a, v in sorted(m.aliases.items())) or "-"
            rows.append([m.name, len(versions), versions[0]["version"] if versions else "-", aliases])
        print(_table(["registered model", "versions", "newest", "aliases"], rows))
        print("\n`kdflow models NAME` lists the versions of one of them.")
        return 0
    try:
        versions = ModelRegistry(client, args.name).versions()
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models())
        raise CliError(
            f"no registered model named {args.name!r} in {client.tracking_uri}",
            f"use one of: {', '.join(names)}" if names else "run a pipeline first, or pass the --tracking-uri it used",
        ) from None
    print(format_versions(args.name, versions))
    return 0


def _cmd_report(cfg: None, args: argparse.Namespace) -> int:
    # lazy: only `kdflow report` renders it; `kdflow validate` stays quick
    from kd_lib import report
    from kd_lib.adapters.tracking import client_for_uri, pipeline_record, resolve_parent_run

    client = client_for_uri(args.tracking_uri)
    parent = resolve_parent_run(client, args.run_id)
    record = pipeline_record(client, parent)
    if record["tags"].get("kdflow.step") != "pipeline":
        raise CliError(
            f"MLflow run {parent} is not a kdflow pipeline run",
            "pass the 'MLflow parent run' id that `kdflow run` printed",
        )
    data = report.from_pipeline_record(record)
    out = Path(args.output)
    text = report.render_markdown(data) if out.suffix.lower() == ".md" else report.render_html(data)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    decision = report.decision_of(data)
    print(f"wrote {out} (pipeline run {data.run.get('pipeline_run_id') or parent}: {decision.verdict})")
    return 0


Command = Callable[[Any, argparse.Namespace], int]


def _cmd_submit(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    # lazy: kfp and the components load only for the commands that build a pipeline
    from pipelines.submit import describe, submit_run

    sub = submit_run(cfg, args.host, experiment=args.experiment, namespace=args.namespace, run_name=args.run_name)
    print(describe(sub))
    return 0


def _cmd_schedule(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    # lazy: kfp and the components load only for the commands that build a pipeline
    from pipelines.submit import describe, schedule_run

    sub = schedule_run(
        cfg,
        args.host,
        args.cron,
        experiment=args.experiment,
        namespace=args.namespace,
        name=args.name,
        replace=args.replace,
        max_concurrency=args.max_concurrency,
        catchup=args.catchup,
    )
    print(describe(sub))
    return 0


COMMANDS: dict[str, Command] = {
    "validate": _cmd_validate,
    "run": _cmd_run,
    "compile": _cmd_compile,
    "models": _cmd_models,
    "report": _cmd_report,
    "submit": _cmd_submit,
    "schedule": _cmd_schedule,
}


# ---------------------------------------------------------------- errors


def _fix_for(err: BaseException) -> str:
    """The one-line fix: a kdflow error carries its own; anything else gets the traceback hint."""
    if isinstance(err, KdflowError):
        return err.fix
    return "re-run with --debug for the traceback"


def _cause(err: BaseException) -> str:
    if isinstance(err, ConfigError):
        return str(err.cause).strip()  # one line per invalid field: the cause is the list
    if isinstance(err, KdflowError):
        return str(err.cause).strip().splitlines()[0] if str(err.cause).strip() else type(err).__name__
    text = str(err).strip() or type(err).__name__
    return f"{type(err).__name__}: {text.splitlines()[0]}"


def _print_advice(cfg: PipelineConfig) -> None:
    """Print the config's warnings (``kd_lib.config.advice``): it runs, but likely not as hoped."""
    for item in advise(cfg):
        print(f"warning: {item.cause}", file=sys.stderr)
        print(f"  fix: {item.fix}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(Path(args.config), args.overrides) if getattr(args, "config", None) else None
        if cfg is not None:
            _print_advice(cfg)
        return COMMANDS[args.command](cfg, args)
    except KeyboardInterrupt:
        print("\nerror: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI's one place that turns errors into two lines
        if args.debug:
            raise
        print(f"error: {_cause(err)}", file=sys.stderr)
        print(f"fix: {_fix_for(err)}", file=sys.stderr)
        return 2 if isinstance(err, ConfigError) else 1


if __name__ == "__main__":
    sys.exit(main())
