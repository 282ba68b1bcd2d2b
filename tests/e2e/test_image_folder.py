"""A folder of PNG images through the whole pipeline on kfp.local, read lazily: a user's own
ResNet (``arch: tests.helpers:user_resnet``: BatchNorm, residual adds) as teacher and student,
KD with a feature loss on layers named by module path, an unlabeled folder as transfer set,
DataLoader workers, ONNX Runtime static int8, registered and served by ``mlflow models serve``.

The dataset artifact between the steps is a manifest (no decoded samples); every step reads the
images from the folder itself. The images are 1,000 of the real MNIST digits shipped in the
package (``mnist14``), written as PNG files here.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from kd_lib.artifacts.dataset_dir import MANIFEST_FILE, SPLITS_FILE, load_splits
from pipelines.local import run_local
from tests.e2e.test_serve import post, serve
from tests.helpers import mnist14_pngs, tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("image-folder-e2e")
    picked = np.random.default_rng(0).permutation(5000)[:1200]  # mnist14 is sorted by digit: a seeded draw
    mnist14_pngs(tmp / "digits", picked[:1000], class_prefix="digit")  # 1,000 labelled, 10 class folders
    mnist14_pngs(tmp / "unlabeled", picked[1000:], class_prefix=None)  # 200 more without labels
    user_resnet = "tests.helpers:user_resnet"
    cfg = tiny_config(
        tmp,
        data={"source": str(tmp / "digits"), "num_workers": 2},
        teacher={
            "model": {"arch": user_resnet, "params": {"width": 16}},
            "train": {"epochs": 8, "batch_size": 64, "lr": 0.01, "patience": 8},
        },
        student={"model": {"arch": user_resnet, "params": {"width": 4}}},
        distill={
            "losses": [
                {"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}},
                {"name": "ce", "weight": 0.1},
                # Attention transfer between the second residual blocks, named by module path.
                {"name": "at", "weight": 10.0, "params": {"student_layer": "4", "teacher_layer": "4"}},
            ],
            "train": {"epochs": 12, "batch_size": 64, "lr": 0.02, "patience": 12},
            "transfer_source": str(tmp / "unlabeled"),
        },
        quantize={"scheme": "onnx_static_int8", "calibration_batches": 4},
        # A few seconds of training on 700 images: the gate's thresholds are not what this test is about.
        gate={"min_accuracy": 0.5, "max_accuracy_drop": 40.0, "min_compression_ratio": 2.0},
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", cfg.tracking.tracking_uri or "")
        # The user's module is importable in every task (kfp.local runs each in its own process).
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        result = run_local(cfg, root=tmp / "runs")
    assert result.succeeded, f"{result.failed_task}: {result.failure_cause} {result.error}"
    return {"cfg": cfg, "result": result, "tmp": tmp}


def test_the_steps_read_a_manifest_and_register_static_int8(pipeline: dict) -> None:
    cfg, result = pipeline["cfg"], pipeline["result"]
    dataset_dir = result.pipeline_root / "prepare-data" / "dataset"
    assert (dataset_dir / MANIFEST_FILE).is_file() and not (dataset_dir / SPLITS_FILE).exists()
    dataset = load_splits(dataset_dir, transfer=True)
    assert dataset.meta.manifest is not None and dataset.meta.manifest.kind == "folder"
    assert dataset.meta.transfer is not None and dataset.meta.transfer.size == 200
    assert dataset.meta.class_names == [f"digit{i}" for i in range(10)]
    summary = result.summary
    assert summary["gate"]["passed"] is True, summary["gate"]["checks"]
    assert summary["evaluation"]["teacher"]["num_params"] >= 4 * summary["evaluation"]["student"]["num_params"]
    client = MlflowClient(tracking_uri=cfg.tracking.tracking_uri, registry_uri=cfg.tracking.tracking_uri)
    champion = client.get_model_version_by_alias(cfg.registry.model_name, "champion")
    tags = champion.tags
    assert tags["validation_status"] == "passed"  # served in a fresh process what evaluate measured
    assert tags["kdflow.backend"] == "onnxruntime" and tags["kdflow.quantization"] == "onnx_static_int8"


def test_served_raw_images_answer_what_evaluate_measured(pipeline: dict) -> None:
    cfg, result, tmp = pipeline["cfg"], pipeline["result"], pipeline["tmp"]
    measured = result.summary["evaluation"]["quantized"]["predictions"]
    dataset = load_splits(result.pipeline_root / "prepare-data" / "dataset")
    files = dataset.manifest.ids["test"]  # type: ignore[union-attr]
    raw = np.stack([np.asarray(Image.open(tmp / "digits" / str(f)), dtype=np.float32)[None] for f in files])
    assert len(raw) == len(measured)
    registered = SimpleNamespace(
        uri=cfg.tracking.tracking_uri,
        name=cfg.registry.model_name,
        versions={"onnx": result.summary["registered"]["version"]},
    )
    for served in serve(registered, "onnx", tmp / "serve.log"):  # type: ignore[arg-type]
        status, answer = post(served.url, {"inputs": raw.tolist()})
        assert status == 200, answer
        assert [row["class_id"] for row in answer["predictions"]] == measured
        assert [row["label"] for row in answer["predictions"]] == [f"digit{i}" for i in measured]
        status, bad = post(served.url, {"inputs": raw[:, :, :7].tolist()})
        assert status == 400 and "does not match expected shape" in bad["message"]
        break
