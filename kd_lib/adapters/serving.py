"""The served model: what ``models:/NAME@alias`` is when MLflow loads or serves it.

The registered model is an MLflow *models-from-code* pyfunc: its artifact is a kdflow model
directory, ``spec.json`` plus either a weights file (``weights.bin``, kdflow's pickle-free format,
see ``kd_lib.artifacts.weights_file``) or an ONNX model (``model.onnx``, run by onnxruntime);
loading executes ``kd_lib/adapters/pyfunc_model.py`` from the model's own code directory, never
unpickles an object. So ``models:/NAME@champion`` loads with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

Served (``mlflow models serve``) or loaded (``mlflow.pyfunc.load_model``), it takes raw features
``[N, *input_shape]`` (a text model: raw strings, a column ``text`` or a list, tokenized with the
``tokenizer.json`` the model carries) and answers a DataFrame of ``label`` (class name),
``class_id`` and ``probabilities``; bad input is an ``MlflowException`` of
``INVALID_PARAMETER_VALUE`` (HTTP 400).
Registering versions and moving aliases is ``kd_lib.adapters.model_registry``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types.schema import Array, ColSpec, DataType, Schema, TensorSpec

import kd_lib
from kd_lib.adapters.model_registry import RegistryError
from kd_lib.artifacts.errors import ArtifactError
from kd_lib.artifacts.model_dir import TOKENIZER_FILE, is_onnx, onnx_path, read_spec
from kd_lib.data.normalization import normalize
from kd_lib.errors import KdflowError

_PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_ARTIFACT_KEY = "model"
OUTPUT_COLUMNS = ("label", "class_id", "probabilities")
# The input column of a text model: one raw string per row.
TEXT_COLUMN = "text"


class KdflowPyfunc(PythonModel):
    """Serves a kdflow model: raw features in (as in the source data), labels and probabilities out.

    Two kinds of model directory load here: torch weights (``weights.bin``, loaded by
    ``kd_lib.compress.quantization.load_model``) and ONNX Runtime models (``model.onnx``, spec
    ``format: onnx``), which run on an ``onnxruntime.InferenceSession`` without importing torch,
    so a server of an ONNX model starts seconds sooner.

    Input: numbers ``[N, *input_shape]`` (the logged signature asks for float32), *unnormalized*
    as in the source data; the train-split normalization from the spec is applied here (the
    identity for an ONNX model, whose graph holds it), so callers never have to know it. Bad
    input (``checked_input``) is refused with an ``MlflowException`` of ``INVALID_PARAMETER_VALUE``
    (HTTP 400 when served). Output: ``prediction_frame`` of the logits.

    A text model (spec ``text``) takes raw strings instead (``checked_texts``): a DataFrame
    column ``text`` or a list of strings. They are tokenized with the model's own
    ``tokenizer.json`` (the ``tokenizers`` library alone: serving an ONNX text model needs
    neither torch nor transformers) into int64 ids ``[N, max_length]``, which the model takes.
    """

    model: Any = None  # the torch module of a torch artifact
    session: Any = None  # the onnxruntime.InferenceSession of an ONNX artifact
    spec: dict[str, Any]
    tokenizer: Any = None  # a text model's tokenizers.Tokenizer
    _input_name = "x"

    def load_context(self, context: Any) -> None:
        directory = Path(context.artifacts[MODEL_ARTIFACT_KEY])
        spec = read_spec(directory).to_dict()
        if spec.get("text") is not None:
            # lazy: tokenizers is needed only by a process that serves a text model
            from kd_lib.data.text import load_tokenizer

            try:
                self.tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
            except KdflowError as err:
                raise ArtifactError(f"text model {directory}: {err.cause}") from None
        if is_onnx(spec):
            # lazy: onnxruntime is needed only by a process that serves an ONNX model
            import onnxruntime

            path = onnx_path(directory)
            options = onnxruntime.SessionOptions()
            options.log_severity_level = 3  # errors only: ORT's notes about its own graph choices are noise
            try:
                self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as err:  # ORT raises its own pybind types (Fail, InvalidGraph, ...)
                raise ArtifactError(f"{path}: not a loadable ONNX model ({type(err).__name__}: {err})") from None
            self._input_name = self.session.get_inputs()[0].name
            self.spec = spec
            return
        # lazy: torch (imported by quantization) costs seconds; `kdflow models` imports this module and serves nothing
        from kd_lib.compress.quantization import load_model

        self.model, self.spec = load_model(directory)

    # np.ndarray and pd.DataFrame are hints MLflow accepts without deriving a schema or validation
    # from them: the logged TensorSpec signature stays the one that is enforced, and MLflow no
    # longer warns "Add type hints to the `predict` method" in every process that defines this
    # class. A hint MLflow would parse (list[...], Any) would change validation.
    def predict(
        self, context: PythonModelContext, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Label, class id and class probabilities for each row of raw features.

        Args:
            context: Unused (the model was loaded by ``load_context``).
            model_input: ``[N, *input_shape]`` numbers, as in the source data; for a text model
                N raw strings (a DataFrame column ``text``, or a list).
            params: Unused.

        Returns:
            ``prediction_frame``: N rows of ``label``, ``class_id``, ``probabilities``.

        Raises:
            MlflowException: ``INVALID_PARAMETER_VALUE``, the input is refused (``checked_input``,
                for a text model ``checked_texts``).
        """
        if self.tokenizer is not None:
            # lazy: tokenizers is needed only by a process that serves a text model
            from kd_lib.data.text import encode

            x = encode(self.tokenizer, checked_texts(model_input), int(self.spec["text"]["max_length"]))
        else:
            x = checked_input(model_input, self.spec.get("input_shape"))
            # The very transform prepare_data applied (scalar or per channel); identity for ONNX.
            x = normalize(x, self.spec.get("normalization") or {})
        logits = self._logits(x)
        names = class_names(self.spec) if "num_classes" in self.spec else None
        return prediction_frame(logits, names)

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """float32 logits ``[N, C]`` of normalized inputs ``x`` ``[N, *input_shape]`` (a text model:
        int64 token ids ``[N, max_length]``)."""
        if self.session is not None:
            return np.asarray(self.session.run(None, {self._input_name: x})[0], dtype=np.float32)
        # lazy: torch costs seconds at import; only a process that serves a torch model needs it
        import torch

        with torch.no_grad():
            return self.model(torch.from_numpy(x)).float().numpy()


def class_names(spec: Mapping[str, Any]) -> list[str]:
    """The class names in class-id order: ``spec["class_names"]``, else ``"0"``, ``"1"``, ...

    Raises:
        RegistryError: ``class_names`` does not have ``num_classes`` entries.
    """
    count = int(spec["num_classes"])
    names = spec.get("class_names")
    if not names:
        return [str(i) for i in range(count)]
    if len(names) != count:
        raise RegistryError(f"model spec: class_names has {len(names)} names but num_classes is {count}")
    return [str(name) for name in names]


def _refuse(problem: str, input_shape: Sequence[int] | None) -> MlflowException:
    expected = f"[N, {', '.join(str(d) for d in input_shape)}]" if input_shape else "[N, ...]"
    return MlflowException(
        f"bad input: {problem}; expected raw features, float32 numbers of shape {expected} with N >= 1 "
        '(served: {"inputs": [sample, ...]})',
        error_code=INVALID_PARAMETER_VALUE,
    )


def checked_input(model_input: Any, input_shape: Sequence[int] | None) -> np.ndarray:
    """``model_input`` as float32 ``[N, *input_shape]``, or refused with the reason.

    MLflow's signature enforcement already refuses a wrong shape or dtype before ``predict``
    runs; this repeats those checks (``predict`` may be called directly) and adds what the
    signature cannot express: no NaN/inf, no empty batch, no strings.

    Args:
        model_input: An array-like (ndarray, DataFrame, nested lists) of numbers.
        input_shape: One sample's shape from the spec; None skips the shape check.

    Returns:
        float32 array ``[N, *input_shape]``, N >= 1, all finite.

    Raises:
        MlflowException: ``INVALID_PARAMETER_VALUE``; the message names the problem and the
            expected shape.
    """
    if isinstance(model_input, dict):
        raise _refuse(f"a mapping of named inputs ({', '.join(map(str, model_input))})", input_shape)
    try:
        values = model_input.to_numpy() if isinstance(model_input, pd.DataFrame) else np.asarray(model_input)
    except ValueError as err:  # ragged nested lists
        raise _refuse(f"not a rectangular array ({err})", input_shape) from None
    if values.dtype.kind in "USO":
        try:
            values = values.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise _refuse(f"non-numeric values where numbers belong ({err})", input_shape) from None
    elif values.dtype.kind not in "fiu":
        raise _refuse(f"dtype {values.dtype} is not a number type", input_shape)
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
        x = values.astype(np.float32)
    if x.ndim == 0:
        raise _refuse(f"a single number ({x.item()!r})", input_shape)
    if x.size == 0:
        raise _refuse(f"an empty batch (shape {x.shape})", input_shape)
    if input_shape is not None:
        expected = tuple(int(d) for d in input_shape)
        if x.shape == expected:
            raise _refuse(f"one sample of shape {x.shape} without the batch dimension; wrap it in a list", input_shape)
        if x.shape[1:] != expected:
            raise _refuse(f"wrong shape {x.shape}", input_shape)
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.unique(np.nonzero(bad.reshape(len(x), -1))[0])
        listed = ", ".join(str(r) for r in rows[:10]) + (", ..." if len(rows) > 10 else "")
        nans = int(np.isnan(x).sum())
        raise _refuse(
            f"{nans} NaN/null and {int(bad.sum()) - nans} inf value(s) in row(s) {listed}; "
            "every feature must be a finite number",
            input_shape,
        )
    return x


def _refuse_text(problem: str) -> MlflowException:
    return MlflowException(
        f"bad input: {problem}; expected text: a list of strings or a DataFrame with a string column "
        f"{TEXT_COLUMN!r}, N >= 1 rows "
        '(served: {"inputs": ["some text", ...]} or {"dataframe_records": [{"text": "some text"}, ...]})',
        error_code=INVALID_PARAMETER_VALUE,
    )


def _kind(value: Any) -> str:
    """How a non-string row is named: ``null`` (None, or the NaN a DataFrame holds for it), else its type."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "null"
    return type(value).__name__


def checked_texts(model_input: Any) -> list[str]:
    """The raw strings of a text model's input, or refused with the reason.

    MLflow's signature enforcement (a required string column ``text``) refuses much of this
    before ``predict`` runs; this repeats it for a direct ``predict`` call and names the rows.
    One thing it cannot see: MLflow itself turns a null in a served ``{"inputs": [...]}`` list
    into the string ``"None"`` before the model is called (``dataframe_records`` and
    ``dataframe_split`` keep it null, and it is refused here).

    Args:
        model_input: A DataFrame with a column ``text``, a mapping with key ``text``, or a
            list / 1-D array / Series of strings.

    Returns:
        N >= 1 strings, in order.

    Raises:
        MlflowException: ``INVALID_PARAMETER_VALUE``: no ``text`` column, an empty batch, a
            single string not in a list, or a row that is not a string (None, a number, a list);
            the message names the problem and the rows.
    """
    if isinstance(model_input, str):
        raise _refuse_text(f"a single string ({model_input[:40]!r}) without the batch; wrap it in a list")
    if isinstance(model_input, (pd.DataFrame, Mapping)):
        columns = list(model_input.columns if isinstance(model_input, pd.DataFrame) else model_input.keys())
        if TEXT_COLUMN not in columns:
            listed = ", ".join(repr(str(c)) for c in columns[:10]) or "none"
            raise _refuse_text(f"no {TEXT_COLUMN!r} column (columns: {listed})")
        model_input = model_input[TEXT_COLUMN]
    if isinstance(model_input, str):
        raise _refuse_text(f"{TEXT_COLUMN!r} is a single string, not a list of strings")
    if isinstance(model_input, pd.Series):
        values = model_input.tolist()
    elif isinstance(model_input, np.ndarray):
        if model_input.ndim != 1:
            raise _refuse_text(f"an array of shape {model_input.shape}, not one string per row")
        values = model_input.tolist()
    elif isinstance(model_input, (list, tuple)):
        values = list(model_input)
    else:
        raise _refuse_text(f"{type(model_input).__name__} input")
    if not values:
        raise _refuse_text("an empty batch (no rows)")
    bad = [(row, value) for row, value in enumerate(values) if not isinstance(value, str)]
    if bad:
        listed = ", ".join(f"row {row}: {_kind(v)}" for row, v in bad[:10])
        more = ", ..." if len(bad) > 10 else ""
        raise _refuse_text(f"{len(bad)} row(s) not a string ({listed}{more})")
    return values


def prediction_frame(logits: np.ndarray, names: Sequence[str] | None = None) -> pd.DataFrame:
    """What the served model answers for logits ``[N, C]``.

    Args:
        logits: ``[N, C]`` float logits.
        names: The C class names in class-id order; None means ``"0"``, ``"1"``, ...

    Returns:
        N rows: ``label`` (the class name, str), ``class_id`` (int64, the argmax of the logits)
        and ``probabilities`` (a list of C floats, the softmax of the logits in class-id order,
        summing to 1).
    """
    z = np.asarray(logits, dtype=np.float64)
    names = list(names) if names is not None else [str(i) for i in range(z.shape[1])]
    ids = np.asarray(logits).argmax(axis=1).astype(np.int64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    probabilities = z / z.sum(axis=1, keepdims=True)
    return pd.DataFrame(
        {
            "label": [names[i] for i in ids],
            "class_id": ids,
            "probabilities": [row.tolist() for row in probabilities],
        }
    )


def model_signature(spec: Mapping[str, Any]) -> ModelSignature:
    """The logged signature: a float32 tensor ``[-1, *input_shape]`` in (a text model: a string
    column ``text``); ``label`` (string), ``class_id`` (long) and ``probabilities`` (array of
    double) columns out."""
    text = spec.get("text") is not None
    return ModelSignature(
        inputs=Schema([ColSpec(DataType.string, TEXT_COLUMN)])
        if text
        else Schema([TensorSpec(np.dtype(np.float32), (-1, *spec["input_shape"]))]),
        outputs=Schema(
            [
                ColSpec(DataType.string, "label"),
                ColSpec(DataType.long, "class_id"),
                ColSpec(Array(DataType.double), "probabilities"),
            ]
        ),
    )


def _pin(distribution: str, version: str | None = None) -> str:
    # A local version label (torch's "+cpu") names a wheel index, not a version pip can resolve.
    return f"{distribution}=={(version or metadata.version(distribution)).split('+')[0]}"


def pip_requirements(spec: Mapping[str, Any] | None = None) -> list[str]:
    """What the served model needs, pinned to the versions that produced it.

    mlflow and the libraries the shipped kd_lib imports while loading (numpy, pandas, pydantic,
    pyyaml, tabulate), plus the runtime of the model: onnxruntime for an ONNX artifact (the
    version its spec records, else the installed one; no torch), otherwise torch (and torchao
    for a torchao backend); a text model adds tokenizers. Read from package metadata: torch is
    not imported.
    """
    spec = spec or {}
    recorded = spec.get("versions") or {}
    pins = [f"mlflow=={mlflow.__version__}"] + [
        _pin(pkg) for pkg in ("numpy", "pandas", "pydantic", "pyyaml", "tabulate")
    ]
    if spec.get("text") is not None:
        pins.append(_pin("tokenizers"))
    if is_onnx(spec):
        return pins + [_pin("onnxruntime", recorded.get("onnxruntime"))]
    pins.append(_pin("torch"))
    return pins + [_pin(pkg, ver) for pkg, ver in sorted(recorded.items()) if pkg == "torchao"]


def user_code_paths(arch: str) -> list[str]:
    """The code a user architecture ``package.module:function`` needs where the model is loaded.

    A torch artifact is rebuilt from its architecture at load time
    (``kd_lib.models.builders.build_model`` imports ``package.module``), so the registered
    model ships the top-level package's directory (or a top-level module's file) as an MLflow
    ``code_paths`` entry: MLflow puts it on ``sys.path`` when it loads the model, and serving
    works in a process where the package is not installed. A registered name (``resnet``)
    needs nothing beyond kd_lib.

    Returns:
        ``[]`` for a registered name, else one path.

    Raises:
        RegistryError: the package cannot be found from this process.
    """
    if ":" not in arch:
        return []
    top = arch.partition(":")[0].split(".")[0]
    found = importlib.util.find_spec(top) if top else None
    if found is None:
        raise RegistryError(
            f"model arch {arch!r}: package {top!r} is not importable here, so its code cannot ship with the model",
            "put the package on PYTHONPATH (or install it) for the register step",
        )
    locations = list(found.submodule_search_locations or [])
    if locations:
        return [locations[0]]
    if found.origin is None:
        raise RegistryError(f"model arch {arch!r}: module {top!r} has no file to ship with the model")
    return [found.origin]


def log_pyfunc(model_dir: str | Path, spec: dict[str, Any], pip_requirements: list[str]) -> tuple[str, str]:
    """Log ``model_dir`` as a pyfunc under the active MLflow run; returns (model URI, model id).

    The logged model carries the signature of ``model_signature`` and, as metadata, the class
    names (``class_names``, in class-id order), ``input_shape``, ``num_classes``, the artifact
    ``format`` (``onnx`` or ``torch``), ``backend`` and ``quantization``. It ships kd_lib and,
    for a user architecture, that package (``user_code_paths``) as ``code_paths``.

    Raises:
        RegistryError: the spec's ``class_names`` do not match ``num_classes``, or a user
            architecture's package cannot be found.
    """
    names = class_names(spec)
    meta = {
        "class_names": names,
        "input": TEXT_COLUMN if spec.get("text") is not None else "features",
        "input_shape": [int(d) for d in spec["input_shape"]],
        "num_classes": len(names),
        "format": "onnx" if is_onnx(spec) else "torch",
        "backend": spec.get("backend"),
        "quantization": spec.get("quantization"),
        "output_columns": list(OUTPUT_COLUMNS),
    }
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(_PYFUNC_CODE),
        artifacts={MODEL_ARTIFACT_KEY: str(model_dir)},
        # Ship kd_lib itself so the model loads where kdflow is not installed, and a user
        # architecture's package so it loads where that is not installed either.
        code_paths=[str(Path(kd_lib.__file__).parent), *user_code_paths(str(spec.get("arch", "")))],
        pip_requirements=pip_requirements,
        signature=model_signature(spec),
        metadata={key: value for key, value in meta.items() if value is not None},
    )
    return info.model_uri, info.model_id
