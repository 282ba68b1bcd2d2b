"""Tiny shared fixtures for the kd_lib tests: a separable toy problem, a fast train config, and
a real S3-compatible server on loopback (moto's server, spoken to over HTTP; never AWS)."""

from __future__ import annotations

import json
import logging
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor

from kd_lib.config import TrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def make_blobs(n_per_class: int, num_classes: int = 3, features: int = 8, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Gaussian blobs around well separated centres: x [N, features] float32, y [N] int64."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(num_classes, features) * 4.0
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centres[y] + torch.randn(len(y), features, generator=gen)
    order = torch.randperm(len(y), generator=gen)
    return x[order], y[order]


@pytest.fixture(scope="session")
def blobs() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train [240, 8], y_train [240], x_val [90, 8], y_val [90]) with 3 classes."""
    x_train, y_train = make_blobs(80, seed=0)
    x_val, y_val = make_blobs(30, seed=1)
    return x_train, y_train, x_val, y_val


@pytest.fixture
def fast_cfg() -> TrainConfig:
    return TrainConfig(epochs=12, batch_size=32, lr=0.01, patience=12, seed=0, scheduler="none", device="cpu")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@dataclass
class S3:
    """A bucket of its own on the loopback S3 server; the environment points boto3 at it."""

    endpoint: str
    bucket: str

    def uri(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def client(self):  # noqa: ANN201
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3-compatible server in a thread of this process, on 127.0.0.1 and a free port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3_environment(
    monkeypatch: pytest.MonkeyPatch, endpoint: str, key_id: str = "testing", secret: str = "testing"
) -> None:
    """Point boto3 at ``endpoint`` with these credentials, ignoring any ~/.aws of the machine."""
    for var in ("AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/kdflow-test-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/kdflow-test-aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> S3:
    """A fresh, empty bucket on the loopback server, with the environment set to reach it."""
    s3_environment(monkeypatch, s3_server)
    store = S3(endpoint=s3_server, bucket=f"kdflow-{uuid.uuid4().hex[:12]}")
    store.client().create_bucket(Bucket=store.bucket)
    return store


def _moto_auth(endpoint: str, count: str) -> None:
    # moto's own control endpoint: after `count` more requests it checks every request's
    # signature against the access keys its IAM knows ("inf" switches that off again).
    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(req, timeout=10).read()


@pytest.fixture
def s3_auth(s3: S3) -> Iterator[dict[str, dict[str, str]]]:
    """Make the server enforce credentials; yields key pairs that it knows.

    ``reader`` may use S3; ``stranger`` exists but has no policy (AccessDenied). Enforcement is
    switched off again afterwards, so the other tests' ``testing`` credentials keep working.
    """
    import boto3

    iam = boto3.client("iam", endpoint_url=s3.endpoint, region_name="us-east-1")
    keys = {}
    for role, policy in (("reader", True), ("stranger", False)):
        user = f"{role}-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        if policy:
            allow = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(allow))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[role] = {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    _moto_auth(s3.endpoint, "0")
    try:
        yield keys
    finally:
        _moto_auth(s3.endpoint, "inf")
