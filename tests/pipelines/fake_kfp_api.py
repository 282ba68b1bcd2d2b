"""A stand-in for the Kubeflow Pipelines REST API (v2beta1) on 127.0.0.1, for submission tests.

No KFP backend can run on the project's machines (it needs a Kubernetes cluster with Argo
and the KFP API server), so the tests point the real ``kfp.Client`` at this server instead.
It implements just the endpoints ``kdflow submit`` and ``kdflow schedule`` call, stores what
it is sent and records every request (method, path, query, headers, JSON body), so a test
can assert what a real backend would have received.
"""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

API = "/apis/v2beta1"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any

    @property
    def raw(self) -> str:
        return json.dumps(self.body) if self.body is not None else ""


@dataclass
class FakeKfpApi:
    """Run with ``with FakeKfpApi() as api: ...``; ``api.url`` is the host to pass to the client."""

    multi_user: bool = False
    requests: list[Request] = field(default_factory=list)
    experiments: dict[str, dict] = field(default_factory=dict)
    runs: dict[str, dict] = field(default_factory=dict)
    recurring_runs: dict[str, dict] = field(default_factory=dict)
    fail_with: tuple[int, str] | None = None  # answer every non-healthz call with this status and message

    def __enter__(self) -> FakeKfpApi:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep pytest output clean
                pass

            def _handle(self) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                req = Request(
                    self.command,
                    url.path,
                    {k: v[0] for k, v in parse_qs(url.query).items()},
                    {k.lower(): v for k, v in self.headers.items()},
                    json.loads(raw) if raw else None,
                )
                api.requests.append(req)
                status, payload = api.route(req)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- what the tests look at ------------------------------------------------------------

    def calls(self, method: str, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == method and r.path == API + path]

    # -- the API -----------------------------------------------------------------------------

    @staticmethod
    def _name_filter(query: dict[str, str]) -> str | None:
        if "filter" not in query:
            return None
        for p in json.loads(query["filter"]).get("predicates", []):
            if p.get("key") == "display_name":
                return p.get("string_value", p.get("stringValue"))
        return None

    def route(self, req: Request) -> tuple[int, Any]:
        path = req.path.removeprefix(API)
        if req.method == "GET" and path == "/healthz":
            return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}
        if self.fail_with:
            code, message = self.fail_with
            return code, {"error_message": message, "code": 7}
        if path == "/experiments" and req.method == "GET":
            name = self._name_filter(req.query)
            found = [e for e in self.experiments.values() if name is None or e["display_name"] == name]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if path == "/experiments" and req.method == "POST":
            exp = dict(req.body) | {"experiment_id": str(uuid.uuid4()), "storage_state": "AVAILABLE"}
            self.experiments[exp["experiment_id"]] = exp
            return 200, exp
        if path == "/runs" and req.method == "POST":
            run = dict(req.body) | {"run_id": str(uuid.uuid4()), "state": "PENDING"}
            self.runs[run["run_id"]] = run
            return 200, run
        if path == "/recurringruns" and req.method == "GET":
            name = self._name_filter(req.query)
            exp_id = req.query.get("experiment_id")
            found = [
                r
                for r in self.recurring_runs.values()
                if (name is None or r["display_name"] == name) and (exp_id is None or r["experiment_id"] == exp_id)
            ]
            return 200, {"recurringRuns": found, "total_size": len(found)} if found else {}
        if path == "/recurringruns" and req.method == "POST":
            rr = dict(req.body) | {"recurring_run_id": str(uuid.uuid4()), "status": "ENABLED"}
            self.recurring_runs[rr["recurring_run_id"]] = rr
            return 200, rr
        if path.startswith("/recurringruns/") and req.method == "DELETE":
            rid = path.rsplit("/", 1)[1]
            if self.recurring_runs.pop(rid, None) is None:
                return 404, {"error_message": f"recurring run {rid} not found", "code": 5}
            return 200, {}
        return 404, {"error_message": f"{req.method} {req.path} is not implemented by the fake", "code": 12}
