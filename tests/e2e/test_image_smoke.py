"""The image recipe is enough to run a step, checked without Docker (no engine runs here).

The Dockerfile's build stage copies a handful of paths and runs ``docker/install.sh`` on the
lock ``requirements/image.txt``. This test copies the same paths (read from the Dockerfile's
COPY lines) into an empty directory, runs the same script into a fresh venv, then takes one
step's container command and args from the compiled pipeline YAML, the
``python3 -m kfp.dsl.executor_main ...`` line KFP would start in the image, fills in the
executor input the KFP launcher would, and runs it with that venv first on PATH and the
repository out of reach. The step must produce its outputs and its MLflow record.

Differences from a real build, by necessity: torch's CPU wheel comes from this machine's
wheel store instead of the PyTorch CPU index (the same file name and version), and the
step runs as the current user rather than uid 10001. (Skipping byte-compilation would save
only ~8 s here: compiling on first import costs nearly as much, so the install is as built.)
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import kfp
import pytest
import yaml
from mlflow import MlflowClient

from pipelines.compile import compile_pipeline
from tests.helpers import tiny_config

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "requirements" / "image.txt"
STEP = "prepare_data"


def _build_stage_copies() -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY in the Dockerfile's first (build) stage."""
    stages = re.split(r"(?m)^FROM\s", DOCKERFILE.read_text())
    copies = []
    for line in re.findall(r"(?m)^COPY\s+(.+)$", stages[1]):
        words = [w for w in shlex.split(line) if not w.startswith("--")]
        copies.append((words[:-1], words[-1]))
    return copies


def _stage_context(dest: Path) -> Path:
    """What the build stage holds under its WORKDIR: only the paths the Dockerfile copies,
    placed as Docker places them (a directory's contents go into the target directory; a
    file goes into a target ending in '/' or becomes the target)."""
    for sources, target in _build_stage_copies():
        for src in sources:
            origin = REPO / src
            assert origin.exists(), f"the Dockerfile copies {src}, which does not exist"
            if origin.is_dir():
                shutil.copytree(origin, dest / target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
                continue
            where = dest / target / origin.name if target.endswith("/") else dest / target
            where.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, where)
    return dest


def test_dockerfile_and_lock_agree_with_what_the_pipeline_is_compiled_with() -> None:
    text = DOCKERFILE.read_text()
    bases = re.findall(r"(?m)^FROM\s+(\S+)", text)
    assert len(set(bases)) == 1, f"both stages must share one base image: {bases}"
    version = re.search(r"python:(\d+)\.(\d+)", bases[0])
    assert version and tuple(map(int, version.groups())) == sys.version_info[:2], (
        f"the lock is resolved for Python {sys.version_info[0]}.{sys.version_info[1]}, the image uses {bases[0]}"
    )
    assert "sh docker/install.sh /opt/venv/bin/python /src" in text
    assert re.search(r"(?m)^USER\s+\$\{UID\}", text) and "ARG UID=10001" in text
    pins = dict(
        line.split("==", 1) for line in LOCK.read_text().splitlines() if "==" in line and not line.startswith("#")
    )
    assert pins["kfp"] == kfp.__version__, "the image must run the kfp the pipeline is compiled with"
    assert pins["torch"].endswith("+cpu")


# About 85 s, most of it installing the lock into a fresh venv: in `make test-slow`, to keep
# `make test` under 10 minutes. The lock-against-kfp check above stays in `make test`.
@pytest.mark.slow
def test_the_image_recipe_runs_a_compiled_step(tmp_path: Path) -> None:
    timings: dict[str, float] = {}

    # 1. The image's environment: the same script, on the same files, into a fresh venv.
    context = _stage_context(tmp_path / "src")
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    proc = subprocess.run(
        ["sh", "docker/install.sh", str(venv / "bin" / "python"), str(context)],
        cwd=context,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    timings["install"] = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    # 2. The step exactly as the compiled pipeline would start it in that image.
    cfg = tiny_config(tmp_path, tracking={"tracking_uri": None})
    compiled = list(yaml.safe_load_all(compile_pipeline(cfg, tmp_path / "pipeline.yaml").read_text()))[0]
    executor = compiled["deploymentSpec"]["executors"][f"exec-{STEP.replace('_', '-')}"]["container"]
    component = compiled["components"][f"comp-{STEP.replace('_', '-')}"]
    assert executor["image"] == cfg.image
    assert set(component["inputDefinitions"]["parameters"]) == {"config_json", "pipeline_run_id"}
    assert set(component["outputDefinitions"]["artifacts"]) == {"dataset"}

    out = tmp_path / "outputs"
    executor_input = {
        "inputs": {
            "parameterValues": {
                "config_json": compiled["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"],
                "pipeline_run_id": "image-smoke-run",
            }
        },
        "outputs": {
            "artifacts": {
                "dataset": {
                    "artifacts": [
                        {
                            "name": "dataset",
                            "type": {"schemaTitle": "system.Dataset", "schemaVersion": "0.0.1"},
                            "uri": str(tmp_path / "artifacts" / "dataset"),
                            "metadata": {},
                        }
                    ]
                }
            },
            "parameters": {"Output": {"outputFile": str(out / "Output")}},
            "outputFile": str(out / "executor_output.json"),
        },
    }
    argv = executor["command"] + [a.replace("{{$}}", json.dumps(executor_input)) for a in executor["args"]]
    assert argv[:2] == ["sh", "-ec"] and "python3 -m kfp.dsl.executor_main" in argv[2]

    # What the kubelet would give the container: the image's PATH and the Secret's
    # MLFLOW_TRACKING_URI; a cwd and PYTHONPATH that cannot reach this repository.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    workdir = tmp_path / "work"
    workdir.mkdir()
    step_env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "TMPDIR": str(tmp_path),
        "MLFLOW_TRACKING_URI": uri,
        "MPLCONFIGDIR": str(tmp_path / "mpl"),
    }
    start = time.perf_counter()
    run = subprocess.run(argv, cwd=workdir, env=step_env, capture_output=True, text=True, timeout=600)
    timings["step"] = time.perf_counter() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    print(f"image smoke: install {timings['install']:.1f} s, step {timings['step']:.1f} s")

    # 3. Its outputs: the executor output KFP reads back, the artifact files, the MLflow run.
    result = json.loads((out / "executor_output.json").read_text())
    fingerprint = result["parameterValues"]["Output"]
    assert re.fullmatch(r"[0-9a-f]{8,}", fingerprint), fingerprint
    meta = result["artifacts"]["dataset"]["artifacts"][0]["metadata"]
    assert meta["fingerprint"] == fingerprint and meta["num_classes"] == 10
    assert any((tmp_path / "artifacts" / "dataset").iterdir())
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], "tags.`kdflow.step` = 'prepare_data'")
    assert [r.data.tags["kdflow.pipeline_run_id"] for r in runs] == ["image-smoke-run"]
    assert runs[0].info.status == "FINISHED"

    # The step used the installed package, not this checkout.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import kd_lib, kfp; print(kd_lib.__file__); print(kfp.__version__)"],
        cwd=workdir,
        env=step_env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert where[0].startswith(str(venv)) and where[1] == kfp.__version__
