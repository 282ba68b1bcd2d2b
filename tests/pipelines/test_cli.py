"""The `kdflow` CLI, run as the installed console script in a subprocess."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"


def kdflow(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("kdflow", path=str(Path(sys.executable).parent)) or "kdflow"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_validate_prints_the_resolved_config_with_overrides() -> None:
    proc = kdflow("validate", str(DEMO), "--set", "distill.losses.0.params.temperature=2.5")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["distill"]["losses"][0]["params"]["temperature"] == 2.5
    assert resolved["teacher"]["train"]["optimizer"] == "adam"  # defaults filled in


def test_validate_names_every_bad_field_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill:\n  temprature: 4\nquantize:\n  scheme: 7\n")
    proc = kdflow("validate", str(bad), "--set", "gate.max_size_mb=-1")
    assert proc.returncode == 2
    for path in ("distill.temprature", "gate.max_size_mb", "quantize.scheme"):
        assert path in proc.stderr
    assert "Traceback" not in proc.stderr


def test_compile_writes_ir_yaml(tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    proc = kdflow("compile", str(DEMO), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load_all(out.read_text()).__next__()["pipelineInfo"]["name"] == "kdflow-demo"


def test_run_with_an_unreachable_tracking_server_fails_fast_and_clearly(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = kdflow("run", "--local", str(DEMO), "--set", f"tracking.tracking_uri={url}", cwd=tmp_path)
    assert proc.returncode == 1
    assert f"MLflow tracking server {url} is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / ".kdflow").exists(), "no pipeline task may start when MLflow is down"


def test_help_shows_examples() -> None:
    proc = kdflow("--help")
    assert proc.returncode == 0
    assert "kdflow run --local configs/demo.yaml" in proc.stdout


def test_validate_warns_when_the_distillation_schedule_is_too_short_and_says_the_fix() -> None:
    short = kdflow("validate", str(DEMO), "--set", "distill.train.epochs=10")
    assert short.returncode == 0, short.stderr
    assert "warning: distill.train.epochs is 10" in short.stderr
    assert "  fix: set distill.train.epochs to at least" in short.stderr
    # The demo itself is not warned about.
    assert "warning:" not in kdflow("validate", str(DEMO)).stderr
