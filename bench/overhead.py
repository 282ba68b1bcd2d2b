"""Per-task overhead of a local run: what each kfp.local task costs beyond its step's own work.

Runs ``kdflow run --local -v`` (configs/demo.yaml by default) of the checkout given by
``--repo`` (this one by default; PYTHONPATH points at it, so an older checkout, e.g. a git
worktree of the commit before a change, is measured the same way) and reads each task's
times from kfp.local's own output, whatever the checkout's layout:

- ``wall``: kfp.local's "Executing task" to "finished with status" (what the run pays);
- ``start``: to the task's first KFP executor log line (interpreter and KFP executor start);
- ``function``: the executor's "Got executor_input" to "Wrote executor output file" (the
  component's body: its imports and the step);
- ``exit``: from there to the task's finish (interpreter shutdown, output collection).

Then it replays every task in one warm process (every kd_lib and component module imported
first), through KFP's own executor with the executor input the run logged, against a fresh
MLflow store: ``in-process`` is the step's time there, and ``overhead`` = ``wall`` -
``in-process``. ``imports`` is a fresh interpreter doing what a task does before the step
(KFP's executor and the component body's import statements, ``_KFP_RUNTIME=true`` as in a
task), the fastest of ``--repeats``, with the heavy packages that loaded.

With ``--runs N`` it runs (and replays) N times and keeps, per task, the fastest of each;
before each it waits (up to ``--max-wait``) for the load average to drop below ``--max-load``:
on a shared machine other jobs' load is most of the noise. ``--tracking-uri`` runs against
an MLflow server instead of a fresh sqlite store. Prints a table and writes JSON (load
average included). Not part of `make test`.

    python bench/overhead.py --runs 2 --out bench/results/overhead.json
    git worktree add /tmp/kdflow-before f27f3bd
    python bench/overhead.py --repo /tmp/kdflow-before --label before --runs 2 --out bench/results/overhead-before.json
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import importlib
import inspect
import json
import os
import pkgutil
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
# What kfp writes at the top of every task's ephemeral module (kfp.dsl.component_factory).
KFP_PRELUDE = (
    "import kfp\nfrom kfp import dsl\nfrom kfp.dsl import *\nfrom typing import *\nimport kfp.dsl.executor_main\n"
)
HEAVY = ("torch", "mlflow", "pandas", "sklearn", "scipy", "matplotlib", "boto3", "kubernetes", "onnx", "torchao")

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PARENT_TS = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) - \w+ - (.*)$")
_EXECUTOR_TS = re.compile(r"\[KFP Executor \d{4}-\d\d-\d\d (\d\d):(\d\d):(\d\d),(\d{3}) \w+\]: (.*)$")
_START = re.compile(r"Executing task '([^']+)'")
_FINISH = re.compile(r"Task '([^']+)' finished with status (\w+)")


def _seconds(h: str, m: str, s: str, ms: str) -> float:
    return int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000


def parse_run_log(text: str) -> list[dict[str, Any]]:
    """The tasks of a ``kdflow run --local -v`` output, in start order, with their timestamps
    (seconds of the day), status and executor input. Tasks must not overlap (no sweep)."""
    tasks: list[dict[str, Any]] = []
    current: dict[str, Any] | None = None
    json_lines: list[str] | None = None
    json_indent = ""
    for raw in text.splitlines():
        line = _ANSI.sub("", raw)
        if current is not None and json_lines is not None:
            if not json_lines and line.strip() == "{":
                json_indent = line[: len(line) - len(line.lstrip())]
            json_lines.append(line[len(json_indent) :])
            if line == json_indent + "}":
                current["executor_input"] = json.loads("\n".join(json_lines))
                json_lines = None
            continue
        if m := _PARENT_TS.match(line):
            ts, message = _seconds(*m.groups()[:4]), m.group(5)
            if s := _START.search(message):
                current = {"task": s.group(1), "start": ts}
                tasks.append(current)
            elif (f := _FINISH.search(message)) and current is not None and f.group(1) == current["task"]:
                current.update(end=ts, status=f.group(2))
                current = None
        elif current is not None and (m := _EXECUTOR_TS.search(line)):
            ts, message = _seconds(*m.groups()[:4]), m.group(5)
            current.setdefault("executor_first", ts)
            if message.startswith("Got executor_input:"):
                current["input"], json_lines = ts, []
            elif message.startswith("Wrote executor output file") or message.startswith("Did not write output"):
                current["output"] = ts
    for task in tasks:  # a run across midnight: times after it are the next day's
        for key in ("executor_first", "input", "output", "end"):
            if key in task and task[key] < task["start"] - 43200:
                task[key] += 86400
    return tasks


def _component(task: str) -> Any:
    """The KFP component a task runs (task ``prepare-data`` -> ``components.prepare_data``)."""
    name = task.replace("-", "_")
    try:
        return getattr(importlib.import_module(f"components.{name}"), name)
    except (ImportError, AttributeError):
        return getattr(importlib.import_module("components"), name)


def body_imports(task: str) -> str:
    """The import statements at the top level of a component's body: what its task imports
    before calling the step (KFP ships only the function's source to the task)."""
    func = _component(task).python_func
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    return "\n".join(ast.unparse(node) for node in body if isinstance(node, ast.Import | ast.ImportFrom))


def _prewarm() -> None:
    """Import every kd_lib and component module (and what they import), as a long-lived
    process would have: the replay then times the steps, not their imports."""
    import components
    import kd_lib

    for package in (kd_lib, components):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.rsplit(".", 1)[-1] in ("worker", "dist_worker", "__main__"):
                continue
            try:
                importlib.import_module(info.name)
            except Exception as err:  # noqa: BLE001 - an optional backend missing is no reason to stop
                print(f"prewarm: {info.name}: {type(err).__name__}: {err}", file=sys.stderr)


def replay(tasks_path: Path, store: str, out_path: Path) -> None:
    """Run each logged task again in this one process (after ``_prewarm``) through KFP's own
    executor, timing each; results go to ``out_path`` as ``{task: seconds}``."""
    from kfp.dsl import executor as kfp_executor

    os.environ["MLFLOW_TRACKING_URI"] = store
    _prewarm()
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=store).search_experiments()  # create the store's tables before any timing
    seconds: dict[str, float] = {}
    for task in json.loads(tasks_path.read_text()):
        function = _component(task["task"]).python_func
        start = time.perf_counter()
        kfp_executor.Executor(executor_input=task["executor_input"], function_to_execute=function).execute()
        seconds[task["task"]] = time.perf_counter() - start
    out_path.write_text(json.dumps(seconds))


IMPORT_PROBE = """
import sys, json
{code}
print(json.dumps([m for m in {heavy!r} if m in sys.modules]))
"""


def time_imports(code: str, env: dict[str, str], cwd: Path, repeats: int) -> tuple[float, list[str]]:
    """Shortest wall time of a fresh interpreter running ``code`` (start to exit) and the heavy
    packages it loaded. ``cwd`` must not hold a checkout: ``python -c`` imports from it first."""
    walls, heavy = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE.format(code=code, heavy=HEAVY)],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        walls.append(time.perf_counter() - start)
        heavy = json.loads(proc.stdout.strip().splitlines()[-1])
    return min(walls), heavy


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    return proc.stdout.strip()


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("kfp", "mlflow", "torch", "pandas", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def _settle(max_load: float, max_wait: float) -> None:
    """Wait (at most ``max_wait`` seconds) until the 1-minute load average is below ``max_load``:
    on a shared machine, other jobs' load is most of the noise."""
    deadline = time.monotonic() + max_wait
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(10)


def _load() -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {"1min": round(one, 2), "5min": round(five, 2), "15min": round(fifteen, 2)}


def _run(
    config: Path, overrides: list[str], work: Path, env: dict[str, str], tracking_uri: str | None
) -> tuple[float, list[dict[str, Any]]]:
    """One ``kdflow run --local -v`` in ``work`` against ``tracking_uri`` (default: a fresh
    sqlite store): its wall time and tasks."""
    work.mkdir(parents=True)
    run_env = env | {"MLFLOW_TRACKING_URI": tracking_uri or f"sqlite:///{work / 'run.db'}"}
    command = [sys.executable, "-m", "pipelines.cli", "run", "--local", str(config), "--root", str(work / "runs"), "-v"]
    for override in overrides:
        command += ["--set", override]
    start = time.perf_counter()
    with (work / "run.log").open("w") as log:
        proc = subprocess.run(command, cwd=work, env=run_env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    text = (work / "run.log").read_text()
    if proc.returncode != 0:
        sys.exit(f"the run failed (exit {proc.returncode}); its output: {work / 'run.log'}\n{text[-3000:]}")
    return wall, parse_run_log(text)


def _replay(tasks: list[dict[str, Any]], work: Path, env: dict[str, str]) -> dict[str, float]:
    """The run's steps again, in one warm process (``replay``) against a fresh store: seconds per task."""
    (work / "tasks.json").write_text(json.dumps(tasks))
    store = f"sqlite:///{work / 'replay.db'}"
    command = [sys.executable, str(HERE), "--replay", str(work / "tasks.json"), "--store", store]
    subprocess.run(command, cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads((work / "replay.json").read_text())


def _wall_of(tasks: list[dict[str, Any]], name: str) -> float:
    return next(t["end"] - t["start"] for t in tasks if t["task"] == name)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    repo = Path(args.repo).resolve()
    config = Path(args.config).resolve() if args.config else repo / "configs" / "demo.yaml"
    work = Path(tempfile.mkdtemp(prefix="kdflow-overhead-"))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    load_before = _load()

    # 1. The run(s), each in a scratch directory (MLflow's artifacts land there), against a
    # fresh store, each followed by 2. its steps again in one warm process. Per task the
    # fastest of each is kept: the machine's load only ever adds time.
    runs: list[list[dict[str, Any]]] = []
    run_walls: list[float] = []
    replays: list[dict[str, float]] = []
    for i in range(args.runs):
        _settle(args.max_load, args.max_wait)
        wall, tasks = _run(config, args.overrides, work / f"run{i}", env, args.tracking_uri)
        runs.append(tasks)
        run_walls.append(wall)
        if not args.no_replay:
            _settle(args.max_load, args.max_wait)
            replays.append(_replay(tasks, work / f"run{i}", env))
    fastest = {t["task"]: min(runs, key=lambda ts: _wall_of(ts, t["task"])) for t in runs[0]}
    in_process = {t["task"]: min(r[t["task"]] for r in replays) for t in runs[0]} if replays else {}

    # 3. What a task imports before its step, in a fresh interpreter.
    task_env = env | {"_KFP_RUNTIME": "true"}
    baselines = {
        "python": time_imports("pass", task_env, work, args.repeats)[0],
        "python + kfp executor": time_imports(KFP_PRELUDE, task_env, work, args.repeats)[0],
    }
    rows = []
    for first in runs[0]:
        task = next(t for t in fastest[first["task"]] if t["task"] == first["task"])
        imports = subprocess.run(
            [sys.executable, str(HERE), "--body-imports", task["task"]],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        import_s, heavy = time_imports(KFP_PRELUDE + imports, task_env, work, args.repeats)
        wall = task["end"] - task["start"]
        replayed = in_process.get(task["task"])
        rows.append(
            {
                "task": task["task"],
                "status": task.get("status", "?"),
                "wall_s": round(wall, 3),
                "start_s": round(task["executor_first"] - task["start"], 3),
                "function_s": round(task["output"] - task["input"], 3),
                "exit_s": round(task["end"] - task["output"], 3),
                "in_process_s": None if replayed is None else round(replayed, 3),
                "overhead_s": None if replayed is None else round(wall - replayed, 3),
                "imports_s": round(import_s, 3),
                "heavy_imports": heavy,
                "body_imports": imports.strip().splitlines(),
            }
        )
    return {
        "label": args.label,
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "repo": str(repo),
        "commit": _git(repo, "rev-parse", "HEAD"),
        "dirty": bool(_git(repo, "status", "--porcelain", "--untracked-files=no")),
        "config": str(config),
        "overrides": args.overrides,
        "max_load": args.max_load,
        "tracking_uri": args.tracking_uri or "sqlite (fresh per run)",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "packages": _versions()},
        "load_before": load_before,
        "load_after": _load(),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "runs": args.runs,
        "run_wall_s": round(min(run_walls), 2),
        "run_walls_s": [round(w, 2) for w in run_walls],
        "tasks_wall_s": round(sum(r["wall_s"] for r in rows), 2),
        "overhead_total_s": round(sum(r["overhead_s"] or 0.0 for r in rows), 2),
        "import_baselines_s": {k: round(v, 3) for k, v in baselines.items()},
        "tasks": rows,
        "scratch": str(work),
    }


def table(result: dict[str, Any]) -> str:
    from tabulate import tabulate

    headers = ["task", "wall s", "start s", "function s", "exit s", "in-process s", "overhead s", "imports s", "heavy"]
    keys = ["wall_s", "start_s", "function_s", "exit_s", "in_process_s", "overhead_s", "imports_s"]
    rows = [[r["task"], *(r[k] for k in keys), ",".join(r["heavy_imports"])] for r in result["tasks"]]
    rows.append(["(all tasks)", result["tasks_wall_s"], "", "", "", "", result["overhead_total_s"], "", ""])
    base = ", ".join(f"{k} {v:.2f} s" for k, v in result["import_baselines_s"].items())
    return (
        f"{result['label'] or 'run'}: {result['commit'][:10]}{' (dirty)' if result['dirty'] else ''}, "
        f"run wall {result['run_wall_s']:.1f} s, load {result['load_before']['1min']} -> "
        f"{result['load_after']['1min']} on {result['machine']['cpus']} cpus\n"
        + tabulate(rows, headers=headers, floatfmt=".2f", missingval="-")
        + f"\nfresh interpreter: {base}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default=str(ROOT), help="checkout to measure (default: this one)")
    p.add_argument("--config", help="pipeline config (default: <repo>/configs/demo.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="PATH=VALUE")
    p.add_argument("--tracking-uri", help="MLflow the runs use (default: a fresh sqlite store per run)")
    p.add_argument("--label", default="", help="what this measures, e.g. before / after")
    p.add_argument("--runs", type=int, default=1, help="local runs; per task the fastest is kept (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="fresh interpreters per import measurement")
    p.add_argument("--max-load", type=float, default=1.0, help="wait for a 1-min load average below this")
    p.add_argument("--max-wait", type=float, default=300.0, help="but at most this many seconds per run")
    p.add_argument("--no-replay", action="store_true", help="skip the in-process replay")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "overhead.json"))
    # Internal: the replay and the body-imports probe run in a subprocess with the checkout's path.
    p.add_argument("--replay", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--body-imports", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.replay:
        replay(Path(args.replay), args.store, Path(args.replay).with_name("replay.json"))
        return 0
    if args.body_imports:
        print(body_imports(args.body_imports))
        return 0
    result = measure(args)
    print(table(result))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
