"""The ``register`` step: the gated student registered with its checks and lineage, and promoted."""

from __future__ import annotations

from pathlib import Path

from kd_lib.adapters.model_registry import ModelRegistry, gate_tags, log_pyfunc, pip_requirements, registry_errors
from kd_lib.adapters.tracking import fluent_run, step_run
from kd_lib.artifacts import read_decision, read_evaluation, read_spec
from kd_lib.artifacts.dataset_dir import read_meta
from kd_lib.config import PipelineConfig
from kd_lib.evaluate import gates
from kd_lib.steps.common import StepError


def register(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    quantized_dir: str | Path,
    evaluation_path: str | Path,
    decision_path: str | Path,
) -> dict[str, str]:
    """Log the quantized student as a pyfunc, register it with its checks and lineage, promote it.

    Runs only under the gate's non-``reject`` branch and re-derives the action itself:
    ``promote`` registers a ``validation_status=passed`` version and then converges the
    champion alias onto the best passed version (race-safe); ``challenger`` registers a
    ``rejected`` version under the challenger alias, never champion. Re-running the same
    pipeline run reuses its version instead of creating a duplicate.

    Returns:
        ``model_name``, ``version``, ``alias``, ``champion`` (the version now holding the
        champion alias, or "") and ``reused`` ("true"/"false").

    Raises:
        StepError: the gate's decision is ``reject``.
    """
    decision = gates.GateDecision.from_record(read_decision(decision_path))
    action = decision.action(cfg.registry.keep_rejected)
    if action == "reject":
        failed = ", ".join(c.name for c in decision.failed())
        raise StepError(f"refusing to register: the gate failed ({failed})")

    with step_run(cfg, pipeline_run_id, "register") as run:
        meta = read_meta(dataset_dir)
        results = read_evaluation(evaluation_path)
        spec = read_spec(quantized_dir)
        client = run.client
        registry = ModelRegistry(client, cfg.registry.model_name)
        quantized, teacher = results.quantized, results.teacher
        if quantized is None or teacher is None:
            raise StepError(f"{evaluation_path}: no teacher or quantized row; it must come from the evaluate step")
        tags = gate_tags(decision) | {
            "kdflow.dataset_fingerprint": meta.fingerprint,
            "kdflow.teacher_run_id": teacher.mlflow_run_id or "",
            "kdflow.config_hash": cfg.config_hash(),
            "kdflow.pipeline_run_id": pipeline_run_id,
            "kdflow.mlflow_parent_run_id": run.parent_run_id,
            "kdflow.quantization": spec.quantization,
            "kdflow.test_accuracy": f"{quantized.accuracy:.6f}",
            "kdflow.size_bytes": str(quantized.size_bytes),
        }
        if cfg.candidate:
            tags["kdflow.candidate"] = cfg.candidate

        with registry_errors(client.tracking_uri, cfg.registry.model_name):
            earlier = registry.find_by_tag("kdflow.pipeline_run_id", pipeline_run_id)
            reused = earlier is not None
            if earlier is None:
                # MLflow resolves a models:/m-... source through its global store, so
                # registration happens inside the same scoped fluent state as log_model.
                with fluent_run(client, run.run_id):
                    spec_dict = spec.to_dict()
                    source, model_id = log_pyfunc(quantized_dir, spec_dict, pip_requirements(spec_dict))
                    version = registry.register(source, run.run_id, tags, model_id=model_id)
            else:
                version = earlier
            if action == "promote":
                alias, champion = cfg.registry.alias, registry.converge(cfg.registry.alias, cfg.registry.ranking)
            else:
                alias, champion = cfg.registry.challenger_alias, registry.alias_version(cfg.registry.alias)
                registry.set_alias(alias, version, require_passed=False)

        out = {
            "model_name": cfg.registry.model_name,
            "version": version,
            "alias": alias,
            "champion": champion or "",
            "reused": str(reused).lower(),
        }
        run.set_tags(
            {"kdflow.registered_version": version, "kdflow.alias": alias, "kdflow.champion": champion or ""},
            on_parent=True,
        )
        run.log_params(out)
        return out
