"""MLflow Model Registry: version registration with its tags, and the champion alias.

What a registered version *is* (the served pyfunc, its signature and requirements, how it is
logged) is ``kd_lib.adapters.serving``; whether it serves is ``kd_lib.adapters.verify``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from kd_lib.artifacts import SPEC_FILE
from kd_lib.errors import KdflowError
from kd_lib.evaluate.gates import GateDecision


class RegistryError(KdflowError, RuntimeError):
    """Registration or promotion failed; nothing was promoted."""

    default_fix = "check the model's versions with `kdflow models NAME`; nothing was promoted"


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
        version = self.client.create_model_version(self.name, source, run_id=run_id, tags=tags, model_id=model_id)
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
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
                return None
            raise

    def set_alias(self, alias: str, version: str, require_passed: bool = True) -> None:
        """Point ``alias`` at ``version``; for the champion alias only if it is tagged passed."""
        if require_passed:
            tags = self.client.get_model_version(self.name, version).tags
            if tags.get("validation_status") != "passed":
                raise RegistryError(
                    f"{self.name} v{version} is not tagged validation_status=passed; refusing to alias it"
                )
        self.client.set_registered_model_alias(self.name, alias, version)

    def promote(self, version: str, alias: str) -> None:
        """Point ``alias`` at ``version``, only if that version is tagged as validated."""
        self.set_alias(alias, version, require_passed=True)

    def _all_versions(self) -> list[Any]:
        return list(self.client.search_model_versions(f"name = '{self.name}'", max_results=10000))

    def find_by_tag(self, key: str, value: str) -> str | None:
        """The version whose tag ``key`` equals ``value`` (e.g. this pipeline run's), or None."""
        for v in self._all_versions():
            if v.tags.get(key) == value:
                return str(v.version)
        return None

    def best_passed(self, ranking: str) -> str | None:
        """The version that should be champion: the best ``validation_status=passed`` one."""
        passed = [v for v in self._all_versions() if v.tags.get("validation_status") == "passed"]
        if not passed:
            return None
        return str(max(passed, key=lambda v: rank_key(v.tags, int(v.version), ranking)).version)

    def converge(self, alias: str, ranking: str, max_rounds: int = 30, settle_s: float = 0.3) -> str | None:
        """Make ``alias`` point at the best passed version, race-safely.

        ``set_registered_model_alias`` is last-writer-wins, so two pipelines promoting at
        once could leave the worse model as champion. Here every writer re-reads after it
        writes, until it has seen the alias on the best version twice in a row. A stale write
        by a slower process is always followed by that process's own re-read, which corrects
        it; so the alias settles on the best passed version whatever the interleaving.
        """
        confirmed = 0
        for _ in range(max_rounds):
            best = self.best_passed(ranking)
            if best is None:
                return None
            if self.alias_version(alias) == best:
                confirmed += 1
                if confirmed >= 2:
                    return best
                time.sleep(settle_s)
                continue
            confirmed = 0
            try:
                self.set_alias(alias, best)
            except MlflowException as err:
                if not _is_write_conflict(err):
                    raise
                # MLflow's alias upsert is select-then-insert: two writers inserting the first
                # alias row at once make one fail on the primary key. The winner's write is
                # visible now; re-read and decide again.
                time.sleep(random.uniform(0.05, settle_s))
        raise RegistryError(f"{self.name}@{alias} did not settle after {max_rounds} rounds of concurrent promotion")

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

    def download_ref(
        self,
        dst: str | Path,
        alias: str | None = None,
        version: str | None = None,
        accept_transformers: bool = False,
    ) -> tuple[str, Path]:
        """Resolve ``@alias`` or a version number and download it: ``(version, model dir)``.

        With ``accept_transformers``, a model of MLflow's ``transformers`` flavor comes back as
        its downloaded directory (``transformers_flavor`` reads it) instead of being refused.

        Raises:
            RegistryError: the model, alias or version does not exist (named, with the fix).
        """
        ref = f"models:/{self.name}@{alias}" if alias else f"models:/{self.name}/{version}"
        try:
            resolved = version or self.alias_version(alias or "")
            if resolved is None:
                raise RegistryError(
                    f"{ref}: model {self.name!r} has no alias {alias!r}; check the name and alias in the registry"
                )
            return resolved, self.download_version(resolved, dst, accept_transformers)
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(err).lower():
                raise RegistryError(
                    f"{ref}: no such registered model or version in {self.client.tracking_uri}"
                ) from None
            raise

    def download_version(self, version: str, dst: str | Path, accept_transformers: bool = False) -> Path:
        """Download a version's kdflow model directory (weights + spec) and return its path; with
        ``accept_transformers``, a ``transformers``-flavor model's downloaded directory."""
        # The concrete artifact location, not models:/..., which MLflow resolves through its
        # global registry URI rather than this client's.
        location = self.client.get_model_version_download_uri(self.name, version)
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=str(dst), tracking_uri=self.client.tracking_uri
            )
        )
        specs = [p for p in local.rglob(SPEC_FILE) if "code" not in p.relative_to(local).parts]
        if not specs and accept_transformers and transformers_flavor(local) is not None:
            return local
        if len(specs) != 1:
            raise RegistryError(
                f"{self.name} v{version}: expected one kdflow model in its artifacts, found {len(specs)}"
            )
        return specs[0].parent


def transformers_flavor(directory: str | Path) -> tuple[Path, Path] | None:
    """Where a downloaded model of MLflow's ``transformers`` flavor keeps its parts, by its ``MLmodel`` file.

    Returns:
        ``(model directory, tokenizer.json)``: the ``save_pretrained`` directory of the model
        (the flavor's ``model_binary``) and the tokenizer component's ``tokenizer.json``; None when
        the directory is not such a model (no ``MLmodel``, or another flavor).
    """
    root = Path(directory)
    mlmodel = root / "MLmodel"
    if not mlmodel.is_file():
        return None
    try:
        flavors = (yaml.safe_load(mlmodel.read_text()) or {}).get("flavors") or {}
    except yaml.YAMLError:
        return None
    flavor = flavors.get("transformers")
    if not isinstance(flavor, dict):
        return None
    return root / str(flavor.get("model_binary") or "model"), root / "components" / "tokenizer" / "tokenizer.json"


def _is_write_conflict(err: MlflowException) -> bool:
    text = str(err).lower()
    return any(marker in text for marker in ("unique constraint", "uniqueviolation", "duplicate key", "already exists"))


def rank_key(tags: dict[str, str], version: int, ranking: str) -> tuple[float, ...]:
    """Sort key, larger is better: ``newest`` by version number; ``accuracy`` by test accuracy,
    then smaller artifact, then newer version (so the order is total and every process agrees)."""
    if ranking == "newest":
        return (float(version),)

    def number(key: str, missing: float) -> float:
        try:
            return float(tags[key])
        except (KeyError, ValueError):
            return missing

    return (number("kdflow.test_accuracy", float("-inf")), -number("kdflow.size_bytes", float("inf")), float(version))


@contextmanager
def registry_errors(uri: str, name: str, action: str = "register", permission: str = "EDIT") -> Iterator[None]:
    """Turn MLflow's 403 into a RegistryError saying who lacks which permission, and the fix."""
    try:
        yield
    except MlflowException as err:
        if err.error_code != "PERMISSION_DENIED" and "permission" not in str(err).lower():
            raise
        user = os.environ.get("MLFLOW_TRACKING_USERNAME", "<anonymous>")
        raise RegistryError(
            f"MLflow at {uri} denied user {user!r} permission to {action} {name!r} ({err.error_code}); ask an "
            f"MLflow admin to grant {permission} on registered model {name!r}, or use credentials that have it"
        ) from None


def gate_tags(decision: GateDecision) -> dict[str, str]:
    """One tag per check (``gate.<name>``: value op threshold verdict) plus the overall status."""
    tags = {"validation_status": "passed" if decision.passed else "rejected"}
    for c in decision.checks:
        verdict = f"{c.value:.6g} {c.op} {c.threshold:.6g} {'PASS' if c.passed else 'FAIL'}"
        tags[f"gate.{c.name}"] = (f"{verdict}: {c.detail}" if c.detail else verdict)[:5000]
    return tags
