"""The ``register`` step: the gated student registered with its checks and lineage, and promoted."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kd_lib.adapters.model_registry import ModelRegistry, gate_tags, registry_errors
from kd_lib.adapters.serving import log_pyfunc, pip_requirements
from kd_lib.adapters.tracking import StepRun, fluent_run, step_run
from kd_lib.adapters.verify import verify_version
from kd_lib.artifacts import read_decision, read_evaluation, read_spec
from kd_lib.artifacts.dataset_dir import Splits, load_splits, read_meta
from kd_lib.config import PipelineConfig
from kd_lib.data.normalization import denormalize
from kd_lib.evaluate import gates
from kd_lib.steps.common import StepError

# The version tag a version's state lives in: created unverified, then passed / rejected once it
# serves the evaluated predictions from a fresh process, or broken when it does not.
VALIDATION_STATUS = "validation_status"
UNVERIFIED = "unverified"
BROKEN = "broken"


def register(
    cfg: PipelineConfig,
    pipeline_run_id: str,
    dataset_dir: str | Path,
    quantized_dir: str | Path,
    evaluation_path: str | Path,
    decision_path: str | Path,
) -> dict[str, str]:
    """Log the quantized student as a pyfunc, register it with its checks and lineage, promote it.

    Runs only under the gate's non-``reject`` branch and re-derives the action itself. The
    version is created ``validation_status=unverified`` and then verified: loaded from
    ``models:/NAME/VERSION`` in a fresh process with pickle off, it must predict the classes the
    evaluate step measured on the test split. A version that fails is tagged ``broken`` and no
    alias moves. A verified ``promote`` becomes ``validation_status=passed`` and the champion
    alias converges onto the best passed version (race-safe); a verified ``challenger``
    becomes ``rejected`` under the challenger alias, never champion. Re-running the same
    pipeline run reuses its version (verifying it if an earlier try stopped before that).

    Returns:
        ``model_name``, ``version``, ``alias``, ``champion`` (the version now holding the
        champion alias, or "") and ``reused`` ("true"/"false").

    Raises:
        StepError: the gate's decision is ``reject``, or the registered version does not serve
            the evaluated predictions (it is then tagged ``validation_status=broken``).
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
        verdict = "passed" if action == "promote" else "rejected"
        tags = gate_tags(decision) | {
            VALIDATION_STATUS: UNVERIFIED,
            "kdflow.gate_verdict": verdict,
            "kdflow.dataset_fingerprint": meta.fingerprint,
            "kdflow.teacher_run_id": teacher.mlflow_run_id or "",
            "kdflow.config_hash": cfg.config_hash(),
            "kdflow.pipeline_run_id": pipeline_run_id,
            "kdflow.mlflow_parent_run_id": run.parent_run_id,
            "kdflow.quantization": spec.quantization,
            "kdflow.backend": spec.backend or "",
            "kdflow.source_role": quantized.source_role or "student",
            "kdflow.test_accuracy": f"{quantized.accuracy:.6f}",
            "kdflow.size_bytes": str(quantized.size_bytes),
        }
        for key, text in (
            ("kdflow.selection", quantized.quantization_auto_reason),
            ("kdflow.promotion", quantized.promotion_reason),
        ):
            if text:
                tags[key] = text[:5000]
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
            _verify(cfg, registry, version, verdict, dataset_dir, quantized.predictions, run)
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


def _verify(
    cfg: PipelineConfig,
    registry: ModelRegistry,
    version: str,
    verdict: str,
    dataset_dir: str | Path,
    expected: list[int] | None,
    run: StepRun,
) -> None:
    """Load the new version in a fresh process with pickle off and check it predicts what the
    evaluate step measured on the test split; tag it ``verdict`` (passed / rejected) if so,
    ``broken`` otherwise (and raise: no alias moves)."""
    client, name = registry.client, registry.name
    status = client.get_model_version(name, version).tags.get(VALIDATION_STATUS)
    if status == BROKEN:
        raise StepError(
            f"{name} v{version} (this pipeline run's version) is tagged validation_status=broken: it did not serve "
            "the evaluated predictions; no alias moved",
            fix="see its kdflow.verification tag; fix the cause and run the pipeline again (a new run id)",
        )
    if status != UNVERIFIED:
        return  # verified by an earlier try of this run
    if not expected:
        raise StepError("the evaluation has no predictions of the quantized model to verify the version against")
    if read_meta(dataset_dir).manifest is None:
        x_raw = _served_inputs(dataset_dir, load_splits(dataset_dir))
    else:
        # lazy: reading an image folder's or a table's test split needs torch; the arrays of other data do not
        from kd_lib.steps.inputs import open_dataset

        with open_dataset(cfg, dataset_dir) as splits:
            x_raw = _served_inputs(dataset_dir, splits)
    result = verify_version(client.tracking_uri, name, version, x_raw, np.asarray(expected, dtype=np.int64))
    run.log_metrics({"verify.mismatches": float(result.mismatches), "verify.checked": float(result.checked)})
    client.set_model_version_tag(name, version, "kdflow.verification", result.detail[:5000])
    if not result.ok:
        client.set_model_version_tag(name, version, VALIDATION_STATUS, BROKEN)
        run.set_tags({"kdflow.verification": "broken"}, on_parent=True)
        raise StepError(
            f"{name} v{version} did not serve what was evaluated: {result.detail}; tagged "
            "validation_status=broken and no alias moved",
            fix="load the version by hand (mlflow.pyfunc.load_model) to see the failure; fix it and run again",
        )
    client.set_model_version_tag(name, version, VALIDATION_STATUS, verdict)


def _served_inputs(dataset_dir: str | Path, splits: Splits) -> np.ndarray:
    """The test split as the served model is given it: raw strings for text, raw samples else."""
    if splits.meta.text is not None:  # a text model is served raw strings, tokenized by its own tokenizer.json
        if splits.test_texts is None:
            raise StepError(
                f"{dataset_dir} holds text token ids without the raw test strings the served model is verified on",
                fix="re-run prepare_data with this kdflow (it keeps the test split's texts)",
            )
        return np.asarray(splits.test_texts, dtype=np.str_)
    return denormalize(np.asarray(splits.x["test"]), splits.meta.normalization)
