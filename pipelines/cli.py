"""`kdflow`: validate a config, run the DAG locally, compile it for a KFP cluster."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from kd_lib.config import ConfigError, PipelineConfig, load_config

EXAMPLES = """examples:
  kdflow validate configs/demo.yaml --set distill.temperature=4
  kdflow run --local configs/demo.yaml
  kdflow run --local configs/demo.yaml --set gate.min_accuracy=0.99
  kdflow compile configs/demo.yaml -o build/pipeline.yaml
  kdflow submit configs/demo.yaml --host http://localhost:8080 --set image=registry.example.com/kdflow:0.1.0
  kdflow schedule configs/demo.yaml --host http://localhost:8080 --cron "0 0 3 * * *"
"""


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline config (YAML), e.g. configs/demo.yaml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="PATH=VALUE",
        help="override one field by its dotted path (repeatable), e.g. --set distill.temperature=4",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdflow",
        description="Knowledge distillation as a Kubeflow Pipelines + MLflow workflow.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="print the resolved config, or every invalid field by dotted path")
    _config_args(p)

    p = sub.add_parser("run", help="run the pipeline (prepare, teacher, distill, quantize, evaluate, gate, register)")
    _config_args(p)
    p.add_argument("--local", action="store_true", required=True, help="run on this machine with kfp.local (required)")
    p.add_argument("--root", default=".kdflow/runs", help="where local task artifacts go (default: .kdflow/runs)")

    p = sub.add_parser("compile", help="write the KFP IR YAML, with the config as the default of config_json")
    _config_args(p)
    p.add_argument("-o", "--output", required=True, help="output file, e.g. build/pipeline.yaml")

    p = sub.add_parser("submit", help="compile and create one run on a Kubeflow Pipelines cluster")
    _config_args(p)
    _cluster_args(p)
    p.add_argument("--run-name", help="display name of the run (default: <config name>-<timestamp>)")

    p = sub.add_parser("schedule", help="compile and create a recurring run (scheduled retraining) on a KFP cluster")
    _config_args(p)
    _cluster_args(p)
    p.add_argument(
        "--cron",
        required=True,
        help="KFP cron, 6 fields with seconds first: second minute hour day-of-month month day-of-week, "
        "e.g. '0 0 3 * * *' = every day at 03:00",
    )
    p.add_argument("--name", help="display name of the recurring run (default: <config name>-scheduled)")
    p.add_argument("--replace", action="store_true", help="replace a recurring run of the same name")
    p.add_argument("--max-concurrency", type=int, default=1, help="runs of this schedule at once (default: 1)")
    p.add_argument("--catchup", action="store_true", help="after a pause, start every missed run, not only the latest")
    return parser


def _cluster_args(p: argparse.ArgumentParser) -> None:
    import os

    host = os.environ.get("KF_PIPELINES_ENDPOINT")
    p.add_argument(
        "--host",
        default=host,
        required=host is None,
        help="KFP API endpoint, e.g. http://localhost:8080 (default: $KF_PIPELINES_ENDPOINT)",
    )
    p.add_argument("--experiment", help="KFP experiment (default: tracking.experiment of the config)")
    p.add_argument("--namespace", help="Kubernetes namespace of a multi-user KFP (your profile namespace)")


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run table: the three models, each gate check, the decision, the registration."""
    out: list[str] = []
    evaluation = summary.get("evaluation") or {}
    if evaluation:
        cols = ["accuracy", "macro_f1", "size_bytes", "num_params"]
        lat = sorted(k for k in next(iter(evaluation.values())) if k.startswith("latency_"))
        rows = [[role] + [row.get(c, "") for c in cols + lat] for role, row in evaluation.items()]
        out += ["Models (test split)", _table(["model"] + cols + [k.replace("latency_", "") for k in lat], rows), ""]
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
        out.append(f"Registered: {reg['model_name']} version {reg['version']}, alias @{reg['alias']} -> v{reg['version']}")
    elif gate:
        out.append("Registered: nothing (gate failed; alias untouched)")
    out.append(f"MLflow parent run: {summary.get('parent_run_id', '?')}")
    return "\n".join(out)


def _cmd_validate(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False).rstrip())
    print(f"# config OK (hash {cfg.config_hash()[:12]})", file=sys.stderr)
    return 0


def _cmd_run(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from pipelines.local import run_local

    result = run_local(cfg, root=args.root)
    print()
    print(f"kdflow run {result.pipeline_run_id}: {'SUCCEEDED' if result.succeeded else 'FAILED'} in {result.wall_s:.1f} s")
    if result.summary:
        print(format_summary(result.summary))
    print(f"Task artifacts: {result.pipeline_root}")
    if not result.succeeded:
        print(f"error: {result.error.splitlines()[-1] if result.error else 'pipeline failed'}", file=sys.stderr)
        print("fix: read the failed task's log above; nothing was registered and no alias moved", file=sys.stderr)
        return 1
    return 0


def _cmd_compile(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from pipelines.compile import compile_pipeline

    out = compile_pipeline(cfg, args.output)
    print(f"wrote {out}")
    return 0


def _cmd_submit(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    from pipelines.submit import describe, submit_run

    sub = submit_run(cfg, args.host, experiment=args.experiment, namespace=args.namespace, run_name=args.run_name)
    print(describe(sub))
    return 0


def _cmd_schedule(cfg: PipelineConfig, args: argparse.Namespace) -> int:
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


COMMANDS = {
    "validate": _cmd_validate,
    "run": _cmd_run,
    "compile": _cmd_compile,
    "submit": _cmd_submit,
    "schedule": _cmd_schedule,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(Path(args.config), args.overrides)
        return COMMANDS[args.command](cfg, args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        print("fix: correct the field(s) named above in the YAML or the --set override", file=sys.stderr)
        if args.debug:
            raise
        return 2
    except (ValueError, RuntimeError, OSError) as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        print("fix: see the message above; re-run with --debug for the traceback", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
