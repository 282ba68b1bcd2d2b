"""The fresh-process half of ``kd_lib.adapters.verify``: load a registered model, predict, save class ids.

Run as ``python -m kd_lib.adapters.verify_child MODEL_URI X_NPY OUT_NPY BATCH`` by
``verify_version``, with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` and the tracking and registry
URIs in its environment. It reads ``X_NPY`` (float32 ``[N, *input_shape]``, raw features; or, for a
text model, a unicode array ``[N]`` of raw strings, predicted as a DataFrame column ``text``) with
``allow_pickle=False``, predicts with ``mlflow.pyfunc.load_model(MODEL_URI)``, ``BATCH`` rows per
call (the batches evaluate predicted in: a dynamically quantized model's answers depend on them),
and writes the predicted class ids (int64 ``[N]``) to ``OUT_NPY``. On failure it prints the
traceback and, as its last stderr line, ``kdflow-verify: <stage> of <uri> failed: <error>``, and
exits with 2.

It imports nothing of kd_lib: loading the model puts the model's own copy of kd_lib (shipped in
its code directory) first on ``sys.path``, and that copy is what must be verified.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import mlflow
import numpy as np
import pandas as pd

FAILURE_MARKER = "kdflow-verify: "
USAGE = "usage: python -m kd_lib.adapters.verify_child MODEL_URI X_NPY OUT_NPY BATCH"


def class_ids(prediction: Any) -> np.ndarray:
    """The int64 class ids ``[N]`` in a model's answer: its ``class_id`` column (kdflow's
    DataFrame), or the answer itself when it is a 1-D array of ids (models logged before it).

    Raises:
        TypeError: the answer is neither.
    """
    if isinstance(prediction, pd.DataFrame) and "class_id" in prediction.columns:
        return prediction["class_id"].to_numpy().astype(np.int64)
    values = np.asarray(prediction)
    if values.ndim == 1 and values.dtype.kind in "iu":
        return values.astype(np.int64)
    raise TypeError(
        f"the model answered {type(prediction).__name__} "
        f"{list(prediction.columns) if isinstance(prediction, pd.DataFrame) else values.shape}, "
        "not a DataFrame with a class_id column"
    )


def model_input(values: np.ndarray) -> Any:
    """What the model is given: numbers as they are; strings (a text model's) as a DataFrame column ``text``."""
    if values.dtype.kind == "U":
        return pd.DataFrame({"text": values.tolist()})
    return values


def main(argv: list[str]) -> int:
    """Load, predict, save; returns the exit status (0, or 2 on failure, 64 on bad arguments)."""
    if len(argv) != 4 or not argv[3].isdigit() or int(argv[3]) < 1:
        print(USAGE, file=sys.stderr)
        return 64
    uri, x_path, out_path, batch = argv[0], argv[1], argv[2], int(argv[3])
    stage = "load"
    try:
        model = mlflow.pyfunc.load_model(uri)
        stage = "predict"
        x = np.load(x_path, allow_pickle=False)
        ids = np.concatenate([class_ids(model.predict(model_input(x[i : i + batch]))) for i in range(0, len(x), batch)])
    except Exception as err:  # every failure is the answer: report it, never raise
        traceback.print_exc()
        message = " ".join(str(err).split())[:1000]
        print(f"{FAILURE_MARKER}{stage} of {uri} failed: {type(err).__name__}: {message}", file=sys.stderr)
        return 2
    np.save(out_path, ids)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
