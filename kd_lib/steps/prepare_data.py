"""The ``prepare_data`` step: load, validate, split and fingerprint the data."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from kd_lib.adapters import storage
from kd_lib.adapters.tracking import step_run
from kd_lib.artifacts.dataset_dir import save_splits
from kd_lib.config import PipelineConfig
from kd_lib.data import dataset as data_lib


def prepare_data(cfg: PipelineConfig, pipeline_run_id: str, dataset_dir: str | Path) -> dict[str, Any]:
    """Load, validate, split and fingerprint the data; write it to ``dataset_dir``.

    ``s3://`` sources are fetched with ``tracking.retry``'s attempts and timeouts.

    Returns:
        The dataset's metadata (``DatasetMeta`` fields: fingerprint, sizes, classes ...).
    """
    with step_run(cfg, pipeline_run_id, "prepare_data") as run:
        splits = data_lib.prepare(cfg.data, fetch=partial(storage.fetch, retry=cfg.tracking.retry))
        save_splits(splits, dataset_dir)

        meta = splits.meta
        params: dict[str, Any] = {
            "source": meta.source,
            "fingerprint": meta.fingerprint,
            "input_shape": meta.input_shape,
        }
        if meta.test_source:
            params["test_source"] = meta.test_source
        if meta.class_names:
            # A param for search and display (MLflow caps its length); the full list is in dataset_meta.json.
            params["class_names"] = ",".join(meta.class_names)[:500]
        run.log_params(params)
        run.log_metrics({f"n_{k}": v for k, v in meta.sizes.items()} | {"num_classes": meta.num_classes})
        run.set_tags({"kdflow.dataset_fingerprint": meta.fingerprint}, on_parent=True)
        run.log_dict(meta.model_dump(), "dataset_meta.json")
        return meta.model_dump()
