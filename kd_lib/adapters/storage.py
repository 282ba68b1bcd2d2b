"""Object storage: ``s3://bucket/key`` -> a local file (a prefix -> a local directory), and back.

The only module of kdflow that imports boto3. Endpoint and credentials come from the standard
environment, never from the config (the config becomes MLflow params and KFP parameters):

- ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``), read by boto3;
- ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for an S3-compatible server such as MinIO,
  read by boto3; else ``MLFLOW_S3_ENDPOINT_URL``, the variable MLflow's own artifact store uses,
  so one variable serves both.

Retries and timeouts come from ``tracking.retry``. Every failure a user can cause is a
``StorageError`` naming the URI (and the endpoint) and the fix. Downloads are boto3's managed
transfers (s3transfer), which also ask again for a body that breaks off mid-stream. They go to
a temporary name beside the destination and are renamed into place only when complete, so a
failed or interrupted download never leaves a half-written file that a later run would trust.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path, PurePosixPath

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)
from s3transfer.exceptions import RetriesExceededError

from kd_lib.config import RetryConfig
from kd_lib.errors import KdflowError

SCHEME = "s3://"
CREDENTIAL_VARS = "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary credentials)"
ENDPOINT_VARS = "AWS_ENDPOINT_URL (or MLFLOW_S3_ENDPOINT_URL)"
# S3's own bucket naming rules (3-63 chars, lowercase letters, digits, dots, hyphens).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_NOT_FOUND_KEY = {"NoSuchKey", "404", "NotFound"}
_DENIED = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "403",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "AllAccessDisabled",
}
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)


class StorageError(KdflowError, ValueError):
    """An object store URI cannot be read or written; the message names the URI and the fix."""


def is_remote(uri: str | Path) -> bool:
    """True for an ``s3://`` URI, False for a local path."""
    return str(uri).startswith(SCHEME)


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b.csv`` -> ``("bucket", "a/b.csv")``; the key may be empty (the whole bucket).

    Raises:
        StorageError: not an ``s3://`` URI, or the bucket name is not a valid S3 bucket name.
    """
    if not is_remote(uri):
        raise StorageError(f"{uri!r} is not an s3:// URI", "write it as s3://BUCKET/KEY")
    bucket, _, key = uri[len(SCHEME) :].partition("/")
    if not _BUCKET.match(bucket):
        raise StorageError(
            f"{uri!r}: {bucket!r} is not a valid bucket name",
            "write the URI as s3://BUCKET/KEY (bucket: 3-63 lowercase letters, digits, '.' or '-')",
        )
    return bucket, key


def endpoint_url() -> str | None:
    """The S3 endpoint the client will use: an explicit S3 endpoint variable, else None (AWS)."""
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
        if os.environ.get(var):
            return os.environ[var]
    return None


def client(retry: RetryConfig | None = None):  # noqa: ANN201 - boto3 clients have no static type
    """An S3 client configured from the environment, with ``retry``'s attempts and timeouts.

    botocore's ``standard`` retry mode retries throttling, 5xx and connection errors with its own
    jittered exponential backoff (``retry.backoff_s`` is not a knob botocore exposes);
    ``retry.max_attempts`` bounds the tries, ``retry.timeout_s`` each connect and each read.
    """
    retry = retry or RetryConfig()
    config = Config(
        retries={"mode": "standard", "total_max_attempts": retry.max_attempts},
        connect_timeout=retry.timeout_s,
        read_timeout=retry.timeout_s,
    )
    # boto3 reads AWS_ENDPOINT_URL itself; passing the endpoint explicitly only adds the MLflow
    # fallback (and makes the error messages name what was actually used).
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url(), config=config)


def _where(s3) -> str:  # noqa: ANN001
    return s3.meta.endpoint_url


def _error(err: Exception, uri: str, s3, action: str = "read") -> StorageError:  # noqa: ANN001
    """Translate a boto3/botocore exception into a StorageError that says what to do."""
    endpoint = _where(s3)
    if isinstance(err, _UNREACHABLE):
        return StorageError(
            f"{uri}: S3 endpoint {endpoint} is unreachable ({type(err).__name__})",
            f"check {ENDPOINT_VARS} points at a running S3-compatible server, or raise tracking.retry "
            "(max_attempts, timeout_s) for a slow one",
        )
    if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
        return StorageError(f"{uri}: no S3 credentials found ({err})", f"set {CREDENTIAL_VARS} in the environment")
    if isinstance(err, ClientError):
        code = str(err.response.get("Error", {}).get("Code", ""))
        message = err.response.get("Error", {}).get("Message", "") or code
        if code == "NoSuchBucket":
            bucket, _ = parse_uri(uri)
            return StorageError(
                f"{uri}: bucket {bucket!r} does not exist at {endpoint}",
                f"create it, fix the bucket name in the URI, or check {ENDPOINT_VARS} names the right server",
            )
        if code in _NOT_FOUND_KEY:
            return StorageError(
                f"{uri}: no such key at {endpoint}", "check the key (list it with `aws s3 ls`) or upload the data first"
            )
        if code in _DENIED:
            return StorageError(
                f"{uri}: S3 at {endpoint} refused to {action} it ({code}: {message})",
                f"check {CREDENTIAL_VARS}: the key must exist on this server, the secret must match, and it must "
                f"be allowed to {action} this bucket",
            )
        return StorageError(
            f"{uri}: S3 at {endpoint} answered {code}: {message}", "check the URI and the server's logs"
        )
    return StorageError(
        f"{uri}: S3 request to {endpoint} failed ({type(err).__name__}: {err})", "retry, or check the server"
    )


def _temp_beside(dest: Path) -> Path:
    # Same directory as the destination, so the final os.replace is an atomic rename.
    return dest.with_name(f".{dest.name}.part-{uuid.uuid4().hex[:8]}")


def _transfer_config(retry: RetryConfig) -> TransferConfig:
    """s3transfer's settings: ``retry.max_attempts`` also bounds the re-downloads of a body that
    fails mid-stream (botocore's own retries end once the response headers have arrived)."""
    # classic: s3transfer itself, whose retry of a broken body this module relies on; "auto"
    # would switch to the CRT client (which ignores these settings) wherever awscrt is installed.
    return TransferConfig(num_download_attempts=retry.max_attempts, preferred_transfer_client="classic")


def _refusal(err: ClientError, s3, bucket: str, key: str) -> ClientError:  # noqa: ANN001
    """The managed download starts with a HEAD request, whose error response has no body: a
    refusal reads as a bare "403". A GET of the same object returns the reason
    (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied...); return that error instead."""
    code = str(err.response.get("Error", {}).get("Code", ""))
    if err.operation_name != "HeadObject" or not code.isdigit() or code in _NOT_FOUND_KEY:
        return err
    try:
        s3.get_object(Bucket=bucket, Key=key)["Body"].close()
    except ClientError as reason:
        return reason
    return err  # the GET went through (a passing glitch): report what the download saw


def _get_object(s3, bucket: str, key: str, dest: Path, retry: RetryConfig) -> None:  # noqa: ANN001
    """Download one object into ``dest`` via a temporary file; nothing is left on failure.

    Raises:
        ClientError, BotoCoreError: as botocore raised them, for ``_error`` to translate.
        RetriesExceededError: the body broke off on every attempt; ``last_exception`` says how.
    """
    part = _temp_beside(dest)
    try:
        with open(part, "wb") as f:
            try:
                s3.download_fileobj(bucket, key, f, Config=_transfer_config(retry))
            except ClientError as err:
                raise _refusal(err, s3, bucket, key) from None
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def _list_keys(s3, bucket: str, prefix: str) -> list[str]:  # noqa: ANN001
    """Every object key under ``prefix`` (pagination included), directory markers left out."""
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [obj["Key"] for obj in page.get("Contents", []) if not obj["Key"].endswith("/")]
    return keys


def _relative(key: str, prefix: str, uri: str) -> PurePosixPath:
    rel = PurePosixPath(key[len(prefix) :])
    # A key such as "a/../../etc/x" must not write outside the destination directory.
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise StorageError(f"{uri}: object key {key!r} would be written outside the download directory", "rename it")
    return rel


def _download_prefix(  # noqa: ANN001
    s3, uri: str, bucket: str, prefix: str, keys: list[str], dest: Path, retry: RetryConfig
) -> Path:
    """Download ``keys`` (all under ``prefix``) into directory ``dest``, renamed into place at the end."""
    part = _temp_beside(dest)
    part.mkdir(parents=True)
    try:
        for key in keys:
            target = part / _relative(key, prefix, uri)
            target.parent.mkdir(parents=True, exist_ok=True)
            _get_object(s3, bucket, key, target, retry)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(part, dest)
    finally:
        if part.exists():
            shutil.rmtree(part)
    return dest


def fetch(uri: str | Path, dest_dir: str | Path, retry: RetryConfig | None = None) -> Path:
    """Make ``uri`` available locally: a local path comes back unchanged.

    ``s3://bucket/path/data.csv`` (an object) becomes ``dest_dir/data.csv``;
    ``s3://bucket/path/images/`` (a prefix: a trailing ``/``, or a key that is not an object
    but has objects under it) becomes the directory ``dest_dir/images`` holding every object
    under it, with the same relative paths.

    Args:
        uri: a local path or an ``s3://`` URI.
        dest_dir: where downloads go (created if needed).
        retry: attempts and timeouts of every S3 request; ``tracking.retry`` in a pipeline.

    Returns:
        The local file or directory.

    Raises:
        StorageError: malformed URI, missing bucket, missing key or empty prefix, refused
            credentials, or an unreachable endpoint; the message names the URI and the fix.
    """
    if not is_remote(uri):
        return Path(uri)
    uri = str(uri)
    bucket, key = parse_uri(uri)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    retry = retry or RetryConfig()
    s3 = client(retry)
    try:
        if key and not key.endswith("/"):
            dest = dest_dir / PurePosixPath(key).name
            try:
                _get_object(s3, bucket, key, dest, retry)
                return dest
            except ClientError as err:
                if err.response.get("Error", {}).get("Code") not in _NOT_FOUND_KEY:
                    raise
            key += "/"  # not an object: maybe a "folder" of objects
        keys = _list_keys(s3, bucket, key)
        if not keys:
            raise StorageError(
                f"{uri}: no such key, and no objects under the prefix {key or '/'} at {_where(s3)}",
                "check the URI (list it with `aws s3 ls`) or upload the data first",
            )
        name = PurePosixPath(key.rstrip("/")).name or bucket
        return _download_prefix(s3, uri, bucket, key, keys, dest_dir / name, retry)
    except (ClientError, BotoCoreError) as err:
        raise _error(err, uri, s3) from None
    except RetriesExceededError as err:
        raise _error(err.last_exception or err, uri, s3) from None


def put(local_path: str | Path, uri: str, retry: RetryConfig | None = None) -> str:
    """Upload a local file to ``uri`` (an object key), or a directory under ``uri`` (a prefix).

    A directory's files keep their relative paths under the prefix. Returns ``uri``.

    Raises:
        StorageError: the local path does not exist, or as for ``fetch``.
    """
    local = Path(local_path)
    bucket, key = parse_uri(uri)
    if not local.exists():
        raise StorageError(f"{local}: no such file or directory to upload to {uri}", "check the path")
    s3 = client(retry)
    try:
        if local.is_dir():
            prefix = key.rstrip("/") + "/" if key else ""
            for path in sorted(p for p in local.rglob("*") if p.is_file()):
                s3.upload_file(str(path), bucket, prefix + path.relative_to(local).as_posix())
        else:
            if not key or key.endswith("/"):
                key += local.name
            s3.upload_file(str(local), bucket, key)
    except (ClientError, BotoCoreError) as err:
        raise _error(err, uri, s3, action="write") from None
    except S3UploadFailedError as err:
        # boto3 re-raises the server's ClientError as this, keeping the original as context.
        cause = err.__context__ if isinstance(err.__context__, ClientError) else err
        raise _error(cause, uri, s3, action="write") from None
    return uri
