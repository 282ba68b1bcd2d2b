"""A stand-in for the Kubernetes API server's custom-objects endpoints, on 127.0.0.1.

No Kubernetes cluster (nor the Training Operator) can run on the project's machines, so the
PyTorchJob tests point the real ``kubernetes`` client at this server instead: it is a mock of
the cluster, said so wherever it is used. It speaks
``/apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs[/{name}]`` (create, get, delete) with
Kubernetes' JSON and status codes, records every request, and moves a created job through
its conditions one way or the other:

- ``phases``: scripted, one condition per status read (the last one repeats), with
  ``on_phase(phase, job)`` called the first time each is reported (to play rank 0 writing
  its outputs, say);
- ``run_master``: like the operator and a kubelet, it runs the Master pod's container
  command as a local process (``$(VAR)`` expanded from the env the operator would add,
  Secrets from ``secrets``), reports Running while it runs, then Succeeded or Failed by its
  exit code.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

PATH = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/(?P<ns>[^/]+)/pytorchjobs(?:/(?P<name>[^/]+))?$")


@dataclass
class Request:
    method: str
    namespace: str
    name: str | None
    query: dict[str, str]
    body: Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeKubernetesApi:
    """Run with ``with FakeKubernetesApi(...) as k8s: ...``; ``k8s.api()`` is a ``CustomObjectsApi``."""

    phases: list[str] = field(default_factory=lambda: ["Created", "Running", "Succeeded"])
    on_phase: Callable[[str, dict], None] | None = None
    run_master: bool = False
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)  # Secret name -> key -> value
    create_error: tuple[int, str] | None = None  # answer every create with this status and reason
    jobs: dict[str, dict] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    master_log: str = ""

    def __post_init__(self) -> None:
        self._reads: dict[str, int] = {}
        self._reported: dict[str, set[str]] = {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._frozen: dict[str, str] = {}

    def __enter__(self) -> FakeKubernetesApi:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                match = PATH.match(url.path)
                if match is None:
                    status, payload = 404, _status(404, "NotFound", f"{url.path} is not served by the fake")
                else:
                    req = Request(
                        self.command,
                        match["ns"],
                        match["name"],
                        {k: v[0] for k, v in parse_qs(url.query).items()},
                        json.loads(raw) if raw else None,
                    )
                    fake.requests.append(req)
                    status, payload = fake.route(req)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._server.shutdown()
        self._server.server_close()

    def api(self) -> Any:
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.CustomObjectsApi(client.ApiClient(configuration))

    def calls(self, method: str) -> list[Request]:
        return [r for r in self.requests if r.method == method]

    def add_existing(self, name: str, namespace: str, phase: str) -> None:
        """A job left by an earlier attempt, stuck in ``phase`` until it is deleted."""
        self.jobs[name] = {"metadata": {"name": name, "namespace": namespace}, "spec": {}, "status": {}}
        self._frozen[name] = phase

    # -- the API -------------------------------------------------------------------------------

    def route(self, req: Request) -> tuple[int, Any]:
        if req.method == "POST" and req.name is None:
            if self.create_error:
                code, reason = self.create_error
                return code, _status(code, reason, f"pytorchjobs.kubeflow.org is {reason.lower()}")
            name = req.body["metadata"]["name"]
            if name in self.jobs:
                return 409, _status(409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{name}" already exists')
            job = dict(req.body) | {"status": {}}
            job["metadata"] = dict(job["metadata"]) | {"uid": f"uid-{len(self.requests)}", "resourceVersion": "1"}
            self.jobs[name] = job
            self._reads[name], self._reported[name] = 0, set()
            if self.run_master:
                self._start_master(job)
            return 201, job
        if req.name is None or req.name not in self.jobs:
            return 404, _status(404, "NotFound", f'pytorchjobs.kubeflow.org "{req.name}" not found')
        if req.method == "GET":
            return 200, self._advance(self.jobs[req.name])
        if req.method == "DELETE":
            proc = self._procs.pop(req.name, None)
            if proc is not None and proc.poll() is None:
                proc.kill()
            del self.jobs[req.name]
            self._frozen.pop(req.name, None)
            return 200, _status(200, "Success", "deleted")
        return 405, _status(405, "MethodNotAllowed", req.method)

    def _advance(self, job: dict) -> dict:
        name = job["metadata"]["name"]
        if name in self._frozen:
            job["status"] = {"conditions": [{"type": self._frozen[name], "status": "True"}]}
            return job
        if self.run_master:
            proc = self._procs.get(name)
            code = proc.poll() if proc is not None else None
            phase = "Running" if code is None else ("Succeeded" if code == 0 else "Failed")
        else:
            self._reads[name] += 1
            phase = self.phases[min(self._reads[name], len(self.phases)) - 1]
        message = f"PyTorchJob {name} is {phase.lower()}."
        job["status"] = {
            "conditions": [{"type": phase, "status": "True", "reason": f"PyTorchJob{phase}", "message": message}],
            "replicaStatuses": {"Master": {"active": 1} if phase == "Running" else {}},
        }
        if phase not in self._reported[name]:
            self._reported[name].add(phase)
            if self.on_phase is not None:
                self.on_phase(phase, job)
        return job

    def _start_master(self, job: dict) -> None:
        """What the operator and the kubelet would do for the Master pod, as a local process."""
        pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        (container,) = [c for c in pod["containers"] if c["name"] == "pytorch"]
        port = _free_port()
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0"}
        for e in container.get("env", []):
            if "value" in e:
                env[e["name"]] = e["value"]
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                value = self.secrets.get(ref["name"], {}).get(ref["key"])
                if value is None and not ref.get("optional"):
                    raise AssertionError(
                        f"the pod needs Secret {ref['name']}/{ref['key']}, which the test did not provide"
                    )
                if value is not None:
                    env[e["name"]] = value
        argv = [
            re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), a) for a in container["command"] + container["args"]
        ]
        argv[0] = sys.executable if argv[0] == "python" else argv[0]  # the image's python is this venv's here
        log = open(os.devnull, "w") if not self.master_log else open(self.master_log, "w")  # noqa: SIM115
        self._procs[job["metadata"]["name"]] = subprocess.Popen(
            argv, env=os.environ | env, stdout=log, stderr=subprocess.STDOUT
        )


def _status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure" if code >= 400 else "Success",
        "message": message,
        "reason": reason,
        "code": code,
    }
