"""MLflow Model Registry: the pyfunc wrapper, version registration and the champion alias.

The registered model is an MLflow *models-from-code* pyfunc: its artifacts are a weights file
(``torch.save(state_dict)``, read back with ``weights_only=True``) and ``spec.json``; loading
executes ``kd_lib/pyfunc_model.py`` from the model's own code directory, never unpickles an
object. So ``models:/NAME@champion`` loads with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Schema, TensorSpec

import kd_lib
from kd_lib.gates import GateDecision

_PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
MODEL_ARTIFACT_KEY = "model"


class RegistryError(RuntimeError):
    """Registration or promotion failed; nothing was promoted."""


class KdflowPyfunc(mlflow.pyfunc.PythonModel):
    """Serves a kdflow model: raw features in (as in the source data), class ids out.

    Input: float array ``[N, *input_shape]`` or ``[N, prod(input_shape)]`` (or a DataFrame of
    the flattened features), *unnormalized*; the train-split normalization from the spec is
    applied here so callers never have to know it.
    """

    def load_context(self, context: Any) -> None:
        from kd_lib.quantization import load_model

        self.model, self.spec = load_model(context.artifacts[MODEL_ARTIFACT_KEY])

    # No type hints on predict: MLflow parses them as a schema and warns about Any.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        import torch

        x = np.asarray(getattr(model_input, "values", model_input), dtype=np.float32)
        shape = tuple(self.spec["input_shape"])
        x = x.reshape((x.shape[0], *shape))
        norm = self.spec.get("normalization") or {}
        x = (x - norm.get("mean", 0.0)) / norm.get("std", 1.0)
        with torch.no_grad():
            logits = self.model(torch.from_numpy(x))
        return logits.argmax(dim=1).numpy().astype(np.int64)


def pip_requirements() -> list[str]:
    """What the served model needs, pinned to the versions that produced it."""
    from importlib.metadata import version

    import torch

    pins = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
    return pins + [f"{pkg}=={version(pkg)}" for pkg in ("numpy", "pydantic", "pyyaml")]


def log_pyfunc(model_dir: str | Path, spec: dict[str, Any], pip_requirements: list[str]) -> tuple[str, str]:
    """Log ``model_dir`` as a pyfunc under the active MLflow run; returns (model URI, model id)."""
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *spec["input_shape"]))]),
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1,))]),
    )
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(_PYFUNC_CODE),
        artifacts={MODEL_ARTIFACT_KEY: str(model_dir)},
        # Ship kd_lib itself so the model loads where kdflow is not installed.
        code_paths=[str(Path(kd_lib.__file__).parent)],
        pip_requirements=pip_requirements,
        signature=signature,
    )
    return info.model_uri, info.model_id


class ModelRegistry:
    """The one registry class: register versions with their tags, move aliases."""

    def __init__(self, client: MlflowClient, name: str) -> None:
        self.client = client
        self.name = name

    def ensure_model(self) -> None:
        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    self.name, description="kdflow distilled + quantized student, promoted by its gate"
                )
            except MlflowException:
                self.client.get_registered_model(self.name)  # created concurrently: fine

    def register(
        self, source: str, run_id: str, tags: dict[str, str], model_id: str | None = None, timeout_s: float = 120.0
    ) -> str:
        """Create a version carrying ``tags`` from the start and wait until it is READY.

        Tags are passed to ``create_model_version`` itself so a version never exists without
        its validation record.
        """
        self.ensure_model()
        version = self.client.create_model_version(
            self.name, source, run_id=run_id, tags=tags, model_id=model_id
        )
        deadline = time.monotonic() + timeout_s
        while version.status != "READY":
            if version.status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
                raise RegistryError(
                    f"{self.name} version {version.version} did not become READY ({version.status}); not promoted"
                )
            time.sleep(0.5)
            version = self.client.get_model_version(self.name, version.version)
        return str(version.version)

    def alias_version(self, alias: str) -> str | None:
        try:
            return str(self.client.get_model_version_by_alias(self.name, alias).version)
        except MlflowException:
            return None

    def promote(self, version: str, alias: str) -> None:
        """Point ``alias`` at ``version``, only if that version is tagged as validated."""
        tags = self.client.get_model_version(self.name, version).tags
        if tags.get("validation_status") != "passed":
            raise RegistryError(f"{self.name} v{version} is not tagged validation_status=passed; refusing to alias it")
        self.client.set_registered_model_alias(self.name, alias, version)

    def versions(self) -> list[dict[str, Any]]:
        """Every version, newest first: version, tags, aliases, run_id, status, created (epoch ms)."""
        found = self.client.search_model_versions(f"name = '{self.name}'")
        # search_model_versions leaves ModelVersion.aliases empty on some stores: read them
        # from the registered model, which always carries alias -> version.
        by_version: dict[str, list[str]] = {}
        for alias, version in self.client.get_registered_model(self.name).aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        rows = [
            {
                "version": str(v.version),
                "tags": dict(v.tags),
                "aliases": sorted(set(v.aliases) | set(by_version.get(str(v.version), []))),
                "run_id": v.run_id or "",
                "status": v.status,
                "created": int(v.creation_timestamp or 0),
            }
            for v in found
        ]
        return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def gate_tags(decision: GateDecision) -> dict[str, str]:
    """One tag per check (``gate.<name>``: value op threshold verdict) plus the overall status."""
    tags = {"validation_status": "passed" if decision.passed else "rejected"}
    for c in decision.checks:
        tags[f"gate.{c.name}"] = f"{c.value:.6g} {c.op} {c.threshold:.6g} {'PASS' if c.passed else 'FAIL'}"
    return tags
