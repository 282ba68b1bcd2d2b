"""Does a registered model version serve what was evaluated? Checked in a fresh process.

``verify_version`` loads ``models:/NAME/VERSION`` the way a deployment does: in a new Python
process (``python -m kd_lib.adapters.verify_child``) that shares nothing with the caller (no
imported modules, no loaded weights, no MLflow client state), with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``. It predicts raw test inputs there and compares the
class ids with the ones the evaluate step measured. The register step calls it before any alias
moves (issue 16, item 6).

numpy and the standard library only: the caller's process never imports mlflow for this.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_lib.config import PREDICT_BATCH_SIZE

CHILD_MODULE = "kd_lib.adapters.verify_child"
# How much of the child's stderr a failed check quotes.
_TAIL_LINES = 12
_TAIL_CHARS = 2500


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of ``verify_version``.

    Attributes:
        ok: The version loaded and predicted every expected class id.
        detail: One sentence saying what happened (on failure, the child's last stderr lines).
        mismatches: Predicted class ids that differ from the expected ones (0 when nothing
            was predicted).
        checked: Predictions compared (0 when the model did not load or predict).
    """

    ok: bool
    detail: str
    mismatches: int
    checked: int


def _tail(stderr: str | bytes | None) -> str:
    text = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
    lines = [line.rstrip() for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-_TAIL_LINES:])[-_TAIL_CHARS:]


def verify_version(
    tracking_uri: str,
    model_name: str,
    version: str,
    x_raw: np.ndarray,
    expected_class_ids: np.ndarray,
    timeout_s: float = 300,
    batch_size: int = PREDICT_BATCH_SIZE,
) -> VerifyResult:
    """Load ``models:/model_name/version`` in a fresh process with pickle off and check its predictions.

    The child process gets this process's environment (registry credentials such as
    ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` and S3 settings pass through) plus
    ``MLFLOW_TRACKING_URI`` and ``MLFLOW_REGISTRY_URI`` set to ``tracking_uri`` and
    ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``, and this working directory (so a relative
    ``sqlite:///mlflow.db`` means the same file). Inputs go to it as a temporary ``.npy``
    file, class ids come back as one.

    Args:
        tracking_uri: The MLflow tracking (and registry) URI holding the model.
        model_name: The registered model.
        version: The version to check.
        x_raw: ``[N, *input_shape]`` raw features, as the source data holds them (sent as float32);
            for a text model ``[N]`` raw strings (sent as a numpy unicode array, predicted as a
            DataFrame column ``text``).
        expected_class_ids: ``[N]`` the class ids the model must predict (evaluate's).
        timeout_s: How long the child may take to load and predict before it is killed.
        batch_size: Rows per ``predict`` call in the child: evaluate's (``PREDICT_BATCH_SIZE``),
            so a dynamically quantized model sees the batches it was evaluated on.

    Returns:
        ``VerifyResult``: ok only when the model loaded, predicted N class ids and all equal
        the expected ones; otherwise ok is False and ``detail`` says what happened (load or
        predict failure with the child's last stderr lines, timeout, mismatches with the first
        differing rows).

    Raises:
        ValueError: ``x_raw`` is empty or does not have one row per expected class id (the
            caller's mistake, not the model's).
    """
    uri = f"models:/{model_name}/{version}"
    texts = np.asarray(x_raw).dtype.kind in "USO"
    x = np.asarray(x_raw, dtype=np.str_) if texts else np.ascontiguousarray(x_raw, dtype=np.float32)
    expected = np.asarray(expected_class_ids).astype(np.int64).reshape(-1)
    if (x.ndim != 1 if texts else x.ndim < 2) or len(x) == 0:
        wanted = "[N] strings" if texts else "[N, *input_shape]"
        raise ValueError(f"verify_version: x_raw must be {wanted} with N >= 1, got shape {x.shape}")
    if len(x) != len(expected):
        raise ValueError(f"verify_version: {len(x)} input rows but {len(expected)} expected class ids")
    env = os.environ | {
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        "MLFLOW_TRACKING_URI": tracking_uri,
        "MLFLOW_REGISTRY_URI": tracking_uri,
    }
    with tempfile.TemporaryDirectory(prefix="kdflow-verify-") as tmp:
        x_path, out_path = Path(tmp) / "x.npy", Path(tmp) / "class_ids.npy"
        np.save(x_path, x)
        started = time.monotonic()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", CHILD_MODULE, uri, str(x_path), str(out_path), str(batch_size)],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            tail = _tail(err.stderr)
            return VerifyResult(
                False,
                f"{uri} did not load and predict within {timeout_s:g} s in a fresh process; it was killed"
                + (f". Its last stderr lines:\n{tail}" if tail else ""),
                0,
                0,
            )
        seconds = time.monotonic() - started
        if proc.returncode != 0 or not out_path.is_file():
            return VerifyResult(
                False,
                f"{uri} failed to load or predict in a fresh process with pickle off (exit {proc.returncode}). "
                f"Its last stderr lines:\n{_tail(proc.stderr) or '(none)'}",
                0,
                0,
            )
        got = np.load(out_path, allow_pickle=False)
    n = len(expected)
    if got.shape != expected.shape:
        return VerifyResult(False, f"{uri} answered {got.shape[0] if got.ndim else 0} class ids for {n} inputs", n, n)
    wrong = np.flatnonzero(got != expected)
    if wrong.size:
        rows = wrong[:10]
        listed = ", ".join(f"row {r}: {got[r]} not {expected[r]}" for r in rows)
        return VerifyResult(
            False,
            f"{uri} loaded in a fresh process but {wrong.size} of {n} predicted class ids differ from the expected "
            f"ones ({listed}{', ...' if wrong.size > len(rows) else ''})",
            int(wrong.size),
            n,
        )
    return VerifyResult(
        True,
        f"{uri} loaded in a fresh process with pickle off and predicted all {n} expected class ids ({seconds:.1f} s)",
        0,
        n,
    )
