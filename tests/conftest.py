"""Shared fixtures: small configs, a fresh MLflow store, a real `mlflow server`, a PostgreSQL database.

Nothing is mocked here: the server is the real `mlflow server` process on 127.0.0.1, and the
PostgreSQL database is a real one created for the test and dropped afterwards.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from kd_lib.config import PipelineConfig
from tests.helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ENV = "KDFLOW_TEST_POSTGRES_URI"


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> PipelineConfig:
    return tiny_config(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_uri() -> Iterator[str | None]:
    """A fresh PostgreSQL database when KDFLOW_TEST_POSTGRES_URI is set (CI, the cluster's
    backend), dropped afterwards; None on machines without it (tests fall back to sqlite)."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        yield None
        return
    import psycopg

    name = f"kdflow_{uuid.uuid4().hex[:12]}"
    conn = psycopg.connect(base, autocommit=True)
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    root = base.rsplit("/", 1)[0]
    try:
        yield f"{root}/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


class MlflowServer:
    def __init__(
        self, backend_uri: str, artifacts: Path, log: Path, app_args: list[str] | None = None, env: dict | None = None
    ) -> None:
        self.backend_uri = backend_uri
        self.artifacts = artifacts
        self.log = log
        self.app_args = app_args or []
        self.env = env or {}
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"} | self.env
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            self.backend_uri,
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            *self.app_args,
        ]
        # Its own process group: mlflow server forks workers; we stop them all together.
        self.proc = subprocess.Popen(
            cmd, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited early:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"mlflow server did not become healthy in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def mlflow_server(tmp_path: Path, postgres_uri: str | None) -> Iterator[MlflowServer]:
    """A real `mlflow server` on 127.0.0.1: PostgreSQL backend in CI, sqlite elsewhere."""
    backend = postgres_uri or f"sqlite:///{tmp_path / 'server.db'}"
    server = MlflowServer(backend, tmp_path / "artifacts", tmp_path / "mlflow-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


ADMIN = ("admin", "admin-Pass-1234567")


@pytest.fixture
def auth_mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    """A real `mlflow server --app-name basic-auth`: new users get READ only by default."""
    ini = tmp_path / "auth.ini"
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{tmp_path / 'auth.db'}\n"
        f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    server = MlflowServer(
        f"sqlite:///{tmp_path / 'server.db'}",
        tmp_path / "artifacts",
        tmp_path / "mlflow-auth-server.log",
        app_args=["--app-name", "basic-auth"],
        env={"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex},
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
