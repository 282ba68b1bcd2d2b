"""The ``prepare_data`` step: load, validate, split and fingerprint the data."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from kd_lib.adapters import storage
from kd_lib.adapters.tracking import StepRun, step_run
from kd_lib.artifacts.dataset_dir import save_splits
from kd_lib.config import PipelineConfig
from kd_lib.data import dataset as data_lib


def prepare_data(cfg: PipelineConfig, pipeline_run_id: str, dataset_dir: str | Path) -> dict[str, Any]:
    """Load, validate, split and fingerprint the data; write it to ``dataset_dir``.

    ``s3://`` sources are fetched with ``tracking.retry``'s attempts and timeouts. Text data
    with ``data.tokenizer: auto`` is tokenized with the teacher's own tokenizer when the teacher
    has one (``teacher.source: huggingface``), else with one trained on the train split. A
    transfer set (``distill.transfer_source``) is read here too and encoded like the train split,
    for the distill step.

    Returns:
        The dataset's metadata (``DatasetMeta`` fields: fingerprint, sizes, classes ...).
    """
    with step_run(cfg, pipeline_run_id, "prepare_data") as run:
        fetch = partial(storage.fetch, retry=cfg.tracking.retry)
        with tempfile.TemporaryDirectory(prefix="kdflow-tokenizer-") as tmp:
            teacher_tokenizer = _teacher_tokenizer(cfg, tmp, fetch, run)
            splits = data_lib.prepare(
                cfg.data, fetch=fetch, teacher_tokenizer=teacher_tokenizer, transfer_source=cfg.distill.transfer_source
            )
        save_splits(splits, dataset_dir)

        meta = splits.meta
        params: dict[str, Any] = {
            "source": meta.source,
            "fingerprint": meta.fingerprint,
            "input_shape": meta.input_shape,
        }
        if meta.test_source:
            params["test_source"] = meta.test_source
        if meta.transfer is not None:
            params |= {f"transfer_{k}": v for k, v in meta.transfer.model_dump().items()}
        if meta.text is not None:
            params |= {f"text.{k}": v for k, v in meta.text.model_dump().items() if k != "tokenizer_file"}
        if meta.class_names:
            # A param for search and display (MLflow caps its length); the full list is in dataset_meta.json.
            params["class_names"] = ",".join(meta.class_names)[:500]
        run.log_params(params)
        sizes = meta.sizes | ({"transfer": meta.transfer.size} if meta.transfer is not None else {})
        run.log_metrics({f"n_{k}": v for k, v in sizes.items()} | {"num_classes": meta.num_classes})
        run.set_tags({"kdflow.dataset_fingerprint": meta.fingerprint}, on_parent=True)
        run.log_dict(meta.model_dump(exclude={"transfer"} if meta.transfer is None else None), "dataset_meta.json")
        return meta.model_dump()


def _teacher_tokenizer(cfg: PipelineConfig, tmp: str, fetch: data_lib.Fetch, run: StepRun) -> Path | None:
    """The teacher's own ``tokenizer.json`` for text data with ``data.tokenizer: auto``, else None.

    A ``huggingface`` teacher's directory holds one; so does a registered (``mlflow``) model of
    MLflow's ``transformers`` flavor, or a kdflow text model.
    """
    if cfg.data.text_column is None or cfg.data.tokenizer != "auto":
        return None
    if cfg.teacher.source == "mlflow":
        # lazy: the import_teacher step module imports torch; only a registered teacher's text data needs it.
        from kd_lib.steps.import_teacher import registered_tokenizer

        return registered_tokenizer(run, cfg.teacher.uri or "", tmp)
    if cfg.teacher.source != "huggingface":
        return None
    # lazy: the Hugging Face module imports torch; only a Hugging Face teacher's data needs it.
    from kd_lib.models import huggingface

    return huggingface.teacher_tokenizer(cfg.teacher.source, cfg.teacher.uri, tmp, fetch)
