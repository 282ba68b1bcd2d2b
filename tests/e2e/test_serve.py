"""The registered model behind the real scoring server: `mlflow models serve` on 127.0.0.1.

A version is registered in a fresh sqlite store, served with
``mlflow models serve -m models:/NAME/VERSION --env-manager local``, and asked over HTTP: good
input gets 200 with class names and probabilities, every kind of bad input gets 400 with a
message naming the problem. Nothing is mocked: the server is MLflow's own (uvicorn, started
from the venv's bin on PATH, as the README tells users).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kd_lib.adapters.verify import verify_version
from tests.conftest import ADMIN, MlflowServer
from tests.kd_lib.adapters.test_model_registry import CLASSES, Registered, register_models, softmax

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A running scoring server of one registered version."""

    registered: Registered
    kind: str
    url: str
    start_s: float
    pid: int  # the `mlflow models serve` process (uvicorn runs as its child)


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> Registered:
    return register_models(tmp_path_factory.mktemp("served"))


def serve(registered: Registered, kind: str, log: Path, timeout_s: float = 120.0) -> Iterator[Served]:
    """Run `mlflow models serve` on a free port until the generator is closed; yields once it answers /ping."""
    port = _free_port()
    venv_bin = str(Path(sys.executable).parent)
    env = os.environ | {
        # `mlflow models serve` starts `uvicorn` by name: the venv's bin must be on PATH.
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": registered.uri,
        "MLFLOW_REGISTRY_URI": registered.uri,
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
    }
    model_uri = f"models:/{registered.name}/{registered.versions[kind]}"
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    started = time.monotonic()
    # Its own process group: the CLI starts uvicorn as a child; both are stopped together.
    proc = subprocess.Popen(
        [*cmd, "-h", "127.0.0.1", "-p", str(port)],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited early:\n{log.read_text()[-3000:]}")
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(
                    f"mlflow models serve did not answer /ping in {timeout_s} s:\n{log.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        start_s = time.monotonic() - started
        print(f"mlflow models serve of the {kind} version answered /ping after {start_s:.1f} s")
        yield Served(registered, kind, url, start_s, proc.pid)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="module", params=["onnx", pytest.param("torch", marks=pytest.mark.slow)])
def served(request: pytest.FixtureRequest, registered: Registered, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    yield from serve(registered, request.param, tmp_path_factory.mktemp("logs") / f"serve-{request.param}.log")


def post(url: str, body: str | dict) -> tuple[int, dict]:
    """POST ``body`` (a dict, or JSON text as sent) to /invocations: (status, decoded answer)."""
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    req = urllib.request.Request(
        f"{url}/invocations", data=data, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_good_input_gets_labels_and_probabilities(served: Served) -> None:
    registered = served.registered
    x = registered.x
    expected_ids = registered.logits[served.kind].argmax(1)
    status, answer = post(served.url, {"inputs": x.tolist()})
    assert status == 200, answer
    rows = answer["predictions"]
    assert [row["label"] for row in rows] == [CLASSES[i] for i in expected_ids]
    assert [row["class_id"] for row in rows] == expected_ids.tolist()
    probabilities = np.array([row["probabilities"] for row in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(probabilities, softmax(registered.logits[served.kind].astype(np.float64)), atol=1e-5)
    # The same rows as a DataFrame: one column holding each sample flattened.
    split = {"dataframe_split": {"columns": ["x"], "data": [[row.ravel().tolist()] for row in x]}}
    status, by_frame = post(served.url, split)
    assert status == 200 and by_frame == answer


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, from Linux's /proc."""
    tree, index = [pid], 0
    while index < len(tree):
        for task in Path(f"/proc/{tree[index]}/task").glob("*"):
            children = (task / "children").read_text().split() if (task / "children").exists() else []
            tree += [int(c) for c in children]
        index += 1
    return tree


def test_an_onnx_model_is_served_without_torch(served: Served) -> None:
    """The scoring server of an ONNX artifact never loads torch (seconds of start-up it saves);
    a torch artifact's does, which shows the check can see it."""
    if not Path(f"/proc/{served.pid}/maps").exists():
        pytest.skip("needs Linux /proc to see which libraries the server loaded")
    maps = "".join(Path(f"/proc/{pid}/maps").read_text() for pid in _process_tree(served.pid))
    assert ("libtorch" in maps) == (served.kind == "torch")
    assert ("onnxruntime" in maps) == (served.kind == "onnx")


def _sample(first: str = "1") -> str:
    """One [1, 4, 4] sample as JSON text whose first value is ``first`` (JSON allows NaN only as text)."""
    values = [first] + ["1"] * 15
    rows = ", ".join("[" + ", ".join(values[i : i + 4]) + "]" for i in range(0, 16, 4))
    return f"[[{rows}]]"


# (case, request body, what the 400's message must say)
BAD_REQUESTS: list[tuple[str, str | dict, str]] = [
    ("wrong shape", {"inputs": [[1, 2, 3]]}, r"Shape of input \(1, 3\) does not match expected shape \(-1, 1, 4, 4\)"),
    ("no batch axis", {"inputs": [[1.0] * 4] * 4}, r"Shape of input \(4, 4\) does not match expected shape"),
    ("NaN", f'{{"inputs": [{_sample("NaN")}]}}', r"bad input: 1 NaN/null and 0 inf value\(s\) in row\(s\) 0"),
    ("inf", f'{{"inputs": [{_sample("1e999")}, {_sample()}]}}', r"0 NaN/null and 1 inf value\(s\) in row\(s\) 0"),
    ("null", f'{{"inputs": [{_sample()}, {_sample("null")}]}}', r"1 NaN/null and 0 inf value\(s\) in row\(s\) 1"),
    (
        "a string",
        f'{{"inputs": [{_sample(chr(34) + "seven" + chr(34))}]}}',
        r"could not convert string to float: 'seven'",
    ),
    ("empty batch", {"inputs": []}, r"Failed to enforce schema of data '\[\]' with schema '\[Tensor\('float32'"),
    ("frame of strings", {"dataframe_split": {"columns": ["x"], "data": [[["a"] * 16]]}}, r"coerced to .*float32"),
    ("frame, wrong width", {"dataframe_split": {"columns": ["x"], "data": [[[1.0] * 5]]}}, r"\(-1, 1, 4, 4\)"),
    ("not JSON", '{"inputs": [1,', r"Ensure that input is a valid JSON formatted string"),
]


@pytest.mark.parametrize(("case", "body", "message"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_400_naming_the_problem(served: Served, case: str, body: str | dict, message: str) -> None:
    status, answer = post(served.url, body)
    assert status == 400, (case, answer)
    assert answer["error_code"] in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST")
    assert "predictions" not in answer
    assert re.search(message, answer["message"]), answer["message"]


@pytest.mark.slow
def test_verify_passes_registry_credentials_to_its_fresh_process(
    auth_mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verify_version's child reads a basic-auth registry with the caller's MLFLOW_TRACKING_USERNAME/PASSWORD.

    Slow (about 40 s here): the server checks the password on every request, and logging and
    downloading a model are one request per file (the model ships kd_lib's ~80 source files).
    """
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN[1])
    registered = register_models(tmp_path, "auth-served", auth_mlflow_server.url, kinds=("onnx",))
    version, expected = registered.versions["onnx"], registered.logits["onnx"].argmax(1)
    result = verify_version(auth_mlflow_server.url, registered.name, version, registered.x, expected)
    assert result.ok and result.checked == len(expected), result.detail

    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    refused = verify_version(auth_mlflow_server.url, registered.name, version, registered.x, expected)
    assert not refused.ok and refused.checked == 0
    assert "kdflow-verify: load of" in refused.detail and "401" in refused.detail, refused.detail
