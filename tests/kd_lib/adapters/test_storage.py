"""kd_lib.adapters.storage against a real S3-compatible server on loopback (moto's server over HTTP).

Nothing is mocked: every request goes through boto3 and botocore to the server's socket, and
the server enforces credentials (signature and IAM policy) in the tests that switch that on.
"""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from kd_lib.adapters import storage
from kd_lib.config import RetryConfig
from tests.kd_lib.conftest import S3, s3_environment

FAST = RetryConfig(max_attempts=2, backoff_s=0, timeout_s=1.0)


def test_is_remote_and_local_paths_pass_through(tmp_path: Path) -> None:
    assert storage.is_remote("s3://bucket/key.csv")
    assert not storage.is_remote(tmp_path / "data.csv")
    assert not storage.is_remote("data/s3://odd")
    # A local path is returned as it is: no client, no copy, no environment needed.
    assert storage.fetch(str(tmp_path / "data.csv"), tmp_path / "dl") == tmp_path / "data.csv"
    assert not (tmp_path / "dl").exists()


@pytest.mark.parametrize("uri", ["s3://", "s3:///key.csv", "s3://Bad_Bucket/key", "s3://ab/key"])
def test_malformed_uri_names_it(uri: str, tmp_path: Path) -> None:
    with pytest.raises(storage.StorageError, match="not a valid bucket name") as err:
        storage.fetch(uri, tmp_path)
    assert repr(uri) in str(err.value) and "s3://BUCKET/KEY" in str(err.value)


def test_file_round_trip(s3: S3, tmp_path: Path) -> None:
    src = tmp_path / "train.csv"
    src.write_bytes(b"label,a\n0,1.5\n" * 1000)
    assert storage.put(src, s3.uri("data/train.csv")) == s3.uri("data/train.csv")
    got = storage.fetch(s3.uri("data/train.csv"), tmp_path / "dl", FAST)
    assert got == tmp_path / "dl" / "train.csv"
    assert got.read_bytes() == src.read_bytes()
    # Nothing but the file: the temporary download name was renamed away.
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["train.csv"]
    # Uploading to a prefix keeps the file's name.
    storage.put(src, s3.uri("other/"))
    assert storage.fetch(s3.uri("other/train.csv"), tmp_path / "dl2").read_bytes() == src.read_bytes()


def test_prefix_round_trip_as_a_directory(s3: S3, tmp_path: Path) -> None:
    src = tmp_path / "images"
    for rel in ("cat/1.png", "cat/2.png", "dog/a/deep.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode())
    storage.put(src, s3.uri("sets/images"))
    s3.client().put_object(Bucket=s3.bucket, Key="sets/images/empty-dir/", Body=b"")  # a console "folder" marker
    for uri in (s3.uri("sets/images"), s3.uri("sets/images/")):  # with or without the trailing slash
        got = storage.fetch(uri, tmp_path / "dl")
        assert got == tmp_path / "dl" / "images"
        files = sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file())
        assert files == ["cat/1.png", "cat/2.png", "dog/a/deep.png"]
        assert (got / "dog/a/deep.png").read_bytes() == b"dog/a/deep.png"
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["images"]


def test_missing_bucket_names_bucket_and_endpoint(s3: S3, tmp_path: Path) -> None:
    uri = "s3://kdflow-no-such-bucket/data.csv"
    with pytest.raises(storage.StorageError, match="bucket 'kdflow-no-such-bucket' does not exist") as err:
        storage.fetch(uri, tmp_path, FAST)
    assert uri in str(err.value) and s3.endpoint in str(err.value)
    with pytest.raises(storage.StorageError, match="does not exist"):
        storage.fetch("s3://kdflow-no-such-bucket/images/", tmp_path, FAST)


def test_missing_key_and_empty_prefix(s3: S3, tmp_path: Path) -> None:
    with pytest.raises(storage.StorageError, match="no such key") as err:
        storage.fetch(s3.uri("absent.csv"), tmp_path / "dl", FAST)
    assert s3.uri("absent.csv") in str(err.value) and "upload the data first" in str(err.value)
    with pytest.raises(storage.StorageError, match="no objects under the prefix images/"):
        storage.fetch(s3.uri("images/"), tmp_path / "dl", FAST)
    assert list((tmp_path / "dl").iterdir()) == []  # nothing half-written


def test_credentials_come_from_the_environment_and_refusals_name_them(
    s3: S3, s3_auth: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server checks signatures and IAM policies here (moto's auth mode)."""
    reader, stranger = s3_auth["reader"], s3_auth["stranger"]
    s3_environment(monkeypatch, s3.endpoint, reader["id"], reader["secret"])
    src = tmp_path / "d.csv"
    src.write_text("label\n1\n")
    storage.put(src, s3.uri("d.csv"))
    assert storage.fetch(s3.uri("d.csv"), tmp_path / "ok").read_text() == "label\n1\n"
    cases = [
        (("AKIAUNKNOWNKEY000000", "whatever"), "InvalidAccessKeyId"),
        ((reader["id"], "not-the-secret"), "SignatureDoesNotMatch"),
        ((stranger["id"], stranger["secret"]), "AccessDenied"),
    ]
    for (key_id, secret), code in cases:
        s3_environment(monkeypatch, s3.endpoint, key_id, secret)
        with pytest.raises(storage.StorageError, match=code) as err:
            storage.fetch(s3.uri("d.csv"), tmp_path / "refused", FAST)
        assert "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in str(err.value)
        assert s3.uri("d.csv") in str(err.value)
        with pytest.raises(storage.StorageError, match=f"refused to write it \\({code}"):
            storage.put(src, s3.uri("w.csv"), FAST)
    assert not (tmp_path / "refused").exists() or list((tmp_path / "refused").iterdir()) == []


def test_mlflow_endpoint_variable_is_the_fallback(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "d.npz"
    src.write_bytes(b"payload")
    storage.put(src, s3.uri("d.npz"))
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3.endpoint)
    assert storage.endpoint_url() == s3.endpoint
    assert storage.fetch(s3.uri("d.npz"), tmp_path / "dl").read_bytes() == b"payload"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_named_and_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    s3_environment(monkeypatch, endpoint)
    start = time.monotonic()
    with pytest.raises(storage.StorageError, match=f"endpoint {endpoint} is unreachable") as err:
        storage.fetch("s3://kdflow-data/train.csv", tmp_path, RetryConfig(max_attempts=3, timeout_s=1.0))
    assert "AWS_ENDPOINT_URL" in str(err.value)
    assert time.monotonic() - start < 15
    assert list(tmp_path.iterdir()) == []


def test_silent_server_times_out_within_the_retry_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts the connection and never answers: the read timeout and the attempt
    bound from RetryConfig, not botocore's 60 s default, decide how long the caller waits."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshakes; nobody ever reads
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        s3_environment(monkeypatch, endpoint)
        start = time.monotonic()
        with pytest.raises(storage.StorageError, match=f"endpoint {endpoint} is unreachable \\(ReadTimeoutError\\)"):
            storage.fetch("s3://kdflow-data/train.csv", tmp_path, RetryConfig(max_attempts=2, timeout_s=0.5))
        elapsed = time.monotonic() - start
    assert 0.9 < elapsed < 8  # two reads of 0.5 s each, plus a short backoff


class _Truncating(http.server.BaseHTTPRequestHandler):
    """Promises 100 kB, sends 10 bytes, hangs up: a connection lost mid-download, on every try.
    (A HEAD, which the managed download sends first, gets the headers as a real server would.)"""

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200)
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"0123456789")
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


def test_interrupted_download_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Truncating)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        s3_environment(monkeypatch, endpoint)
        with pytest.raises(
            storage.StorageError,
            match="s3://kdflow-data/train.csv: S3 request to .* failed \\((IncompleteRead|ResponseStreaming)",
        ):
            storage.fetch("s3://kdflow-data/train.csv", tmp_path / "dl", FAST)
    finally:
        server.shutdown()
        thread.join()
    assert list((tmp_path / "dl").iterdir()) == []  # neither train.csv nor its temporary name


class _FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Forwards every request to the real S3 server; the first GET of an object's body is cut
    off half-way (full Content-Length promised, half sent, connection closed), once."""

    upstream: tuple[str, int]
    gets = 0
    cut = False

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(*self.upstream, timeout=10)
        try:
            # The Host header goes through unchanged: the client signed it.
            conn.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for name, value in resp.getheaders():
            if name.lower() not in ("transfer-encoding", "connection", "server", "date"):
                self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if self.command == "GET" and resp.status == 200 and "list-type" not in self.path:
            type(self).gets += 1
            if not type(self).cut:
                type(self).cut = True
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
        self.wfile.write(payload)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        pass


def test_body_lost_mid_download_is_retried(s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real S3 server behind a proxy that drops the connection half-way through the first
    download: the managed transfer asks again and the file arrives whole, nothing left over."""
    src = tmp_path / "train.csv"
    src.write_bytes(bytes(range(256)) * 1200)  # 300 kB
    storage.put(src, s3.uri("data/train.csv"))
    target = urlparse(s3.endpoint)

    class Proxy(_FlakyProxy):  # counters of its own, for this test alone
        upstream = (target.hostname or "127.0.0.1", target.port or 80)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        s3_environment(monkeypatch, f"http://127.0.0.1:{server.server_address[1]}")
        got = storage.fetch(s3.uri("data/train.csv"), tmp_path / "dl", FAST)
    finally:
        server.shutdown()
        thread.join()
    assert Proxy.cut and Proxy.gets == 2  # cut once, asked again once
    assert got.read_bytes() == src.read_bytes()
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["train.csv"]
