"""The teacher and distill steps on real files and a real sqlite MLflow store: teacher import
from the registry and from a checkpoint, every KD method through the step, config errors."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from kd_lib.adapters.model_registry import ModelRegistry
from kd_lib.adapters.serving import log_pyfunc, pip_requirements
from kd_lib.adapters.storage import StorageError
from kd_lib.adapters.tracking import fluent_run
from kd_lib.artifacts.dataset_dir import load_splits
from kd_lib.compress import quantization
from kd_lib.config import ConfigError
from kd_lib.steps.common import StepError
from kd_lib.steps.distill import distill
from kd_lib.steps.import_teacher import import_teacher
from kd_lib.steps.prepare_data import prepare_data
from kd_lib.steps.train_teacher import train_teacher
from tests.helpers import tiny_config

CNN_TEACHER = {"model": {"arch": "cnn", "params": {"channels": 8, "depth": 2, "hidden": 32}}, "train": {"epochs": 3}}
CNN_STUDENT = {"model": {"arch": "cnn", "params": {"channels": 2, "depth": 2, "hidden": 8}}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Digits split and a small CNN teacher trained once for the module."""
    tmp = tmp_path_factory.mktemp("distill-steps")
    cfg = tiny_config(tmp, teacher=CNN_TEACHER, student=CNN_STUDENT, distill={"train": {"epochs": 2}})
    prepare_data(cfg, "setup", tmp / "dataset")
    train_teacher(cfg, "setup", tmp / "dataset", tmp / "teacher")
    return {"cfg": cfg, "tmp": tmp, "dataset": tmp / "dataset", "teacher": tmp / "teacher"}


def _with_teacher(cfg, source: str, uri: str):
    """A copy of cfg whose teacher comes from ``source``/``uri`` (both set at once: they are validated together)."""
    cfg = cfg.model_copy(deep=True)
    cfg.teacher = type(cfg.teacher)(**(cfg.teacher.model_dump() | {"source": source, "uri": uri}))
    return cfg


def _predict(model_dir: Path, dataset: Path) -> torch.Tensor:
    model, _ = quantization.load_model(model_dir)
    x = torch.from_numpy(load_splits(dataset).x["val"])
    with torch.no_grad():
        return model(x).argmax(1)


@pytest.mark.parametrize(
    "losses",
    [
        [{"name": "dkd", "weight": 1.0, "params": {"beta": 4.0}}, {"name": "ce", "weight": 1.0}],
        [{"name": "fitnets", "weight": 1.0}, {"name": "ce", "weight": 1.0}],
        [{"name": "at", "weight": 500.0}, {"name": "kd", "weight": 0.9}, {"name": "ce", "weight": 0.1}],
    ],
    ids=["dkd", "fitnets", "at"],
)
def test_every_method_runs_through_the_step_and_logs_its_terms(prepared: dict, tmp_path: Path, losses: list) -> None:
    cfg = prepared["cfg"].model_copy(deep=True)
    cfg.distill.losses = [type(cfg.distill.losses[0])(**t) for t in losses]
    summary = distill(
        cfg, "methods", prepared["dataset"], prepared["teacher"], tmp_path / "student", tmp_path / "h.json"
    )
    history = json.loads((tmp_path / "h.json").read_text())
    assert summary["epochs_run"] == 2 and 0.0 <= summary["best_val_accuracy"] <= 1.0
    assert {f"loss_{t['name']}" for t in losses} <= set(history[0])
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(summary["run_id"])
    assert run.data.params["objective"].startswith(f"{losses[0]['weight']:g}*{losses[0]['name']}")
    # Feature losses run the teacher live; logit losses alone use the cache.
    assert run.data.params["teacher_logit_cache"] == str(losses[0]["name"] == "dkd").lower()
    # The regressor of fitnets is training-only: the saved student is the plain architecture.
    model, spec = quantization.load_model(tmp_path / "student")
    assert spec["arch"] == "cnn" and not any("regressor" in k for k in model.state_dict())


def test_a_feature_loss_on_an_mlp_is_a_config_error(prepared: dict, tmp_path: Path) -> None:
    cfg = prepared["cfg"].model_copy(deep=True)
    cfg.student.model.arch, cfg.student.model.params = "mlp", {"width": 8, "depth": 1}
    cfg.distill.losses = [type(cfg.distill.losses[0])(name="at")]
    with pytest.raises(ConfigError, match=r"distill.losses \(1\*at\).*student_layer"):
        distill(cfg, "bad-at", prepared["dataset"], prepared["teacher"], tmp_path / "student")


def test_augmentation_on_flat_features_is_a_config_error(prepared: dict, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, data={"source": "digits", "augment": {"random_crop_padding": 2}})
    cfg.teacher.model.arch = "mlp"
    prepare_data(cfg, "aug", tmp_path / "dataset")  # digits are [1, 8, 8] images: crop is fine
    cfg.data.augment.random_crop_padding = 0
    cfg.data.augment.horizontal_flip = True
    flat = tmp_path / "flat.npz"
    import numpy as np

    np.savez(flat, x=np.random.default_rng(0).normal(size=(60, 5)).astype("float32"), y=np.arange(60) % 3)
    cfg.data.source = str(flat)
    prepare_data(cfg, "aug", tmp_path / "flat")
    with pytest.raises(ConfigError, match="data.augment.horizontal_flip needs image inputs"):
        train_teacher(cfg, "aug", tmp_path / "flat", tmp_path / "teacher")
    # A step's own augment is named as such.
    cfg.data.augment.horizontal_flip = False
    cfg.teacher.train.augment = type(cfg.data.augment)(random_crop_padding=1)
    with pytest.raises(ConfigError, match="teacher.train.augment.random_crop_padding needs image inputs"):
        train_teacher(cfg, "aug", tmp_path / "flat", tmp_path / "teacher")


def test_import_from_a_checkpoint_reproduces_the_teacher(prepared: dict, tmp_path: Path) -> None:
    model, _ = quantization.load_model(prepared["teacher"])
    ckpt = tmp_path / "teacher.pt"
    torch.save(model.state_dict(), ckpt)
    cfg = _with_teacher(prepared["cfg"], "checkpoint", str(ckpt))
    out = import_teacher(cfg, "ckpt", prepared["dataset"], tmp_path / "imported", tmp_path / "history.json")
    assert torch.equal(
        _predict(tmp_path / "imported", prepared["dataset"]), _predict(prepared["teacher"], prepared["dataset"])
    )
    assert out["imported_from"] == str(ckpt) and out["best_val_accuracy"] > 0.5
    assert json.loads((tmp_path / "history.json").read_text()) == []
    # The same weights under another architecture: named, not silently half-loaded.
    cfg.teacher.model.params = {"channels": 4, "depth": 2, "hidden": 32}
    with pytest.raises(StepError, match=r"teacher.pt: not a state_dict of teacher.model cnn"):
        import_teacher(cfg, "ckpt-bad", prepared["dataset"], tmp_path / "bad")


def test_import_from_an_s3_checkpoint(prepared: dict, tmp_path: Path, s3) -> None:  # noqa: ANN001
    model, _ = quantization.load_model(prepared["teacher"])
    torch.save(model.state_dict(), tmp_path / "teacher.pt")
    s3.client().upload_file(str(tmp_path / "teacher.pt"), s3.bucket, "teachers/v1/teacher.pt")
    cfg = _with_teacher(prepared["cfg"], "checkpoint", s3.uri("teachers/v1/teacher.pt"))
    import_teacher(cfg, "s3", prepared["dataset"], tmp_path / "imported")
    assert torch.equal(
        _predict(tmp_path / "imported", prepared["dataset"]), _predict(prepared["teacher"], prepared["dataset"])
    )
    missing = _with_teacher(prepared["cfg"], "checkpoint", s3.uri("teachers/v2/teacher.pt"))
    with pytest.raises(StorageError, match="teachers/v2/teacher.pt"):
        import_teacher(missing, "s3-missing", prepared["dataset"], tmp_path / "missing")


def test_a_pickled_checkpoint_is_refused(prepared: dict, tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.getcwd, ())  # any callable: weights_only must refuse to call it

    ckpt = tmp_path / "evil.pt"
    torch.save({"weights": Payload()}, ckpt)
    cfg = _with_teacher(prepared["cfg"], "checkpoint", str(ckpt))
    with pytest.raises(StepError, match="evil.pt: not a state_dict"):
        import_teacher(cfg, "evil", prepared["dataset"], tmp_path / "imported")


def test_import_from_the_registry_by_alias_and_version(prepared: dict, tmp_path: Path) -> None:
    cfg = prepared["cfg"].model_copy(deep=True)
    name = f"{cfg.registry.model_name}-teacher"
    client = MlflowClient(cfg.tracking.tracking_uri, cfg.tracking.tracking_uri)
    _, spec = quantization.load_model(prepared["teacher"])
    run = client.create_run(client.create_experiment(f"teachers-{uuid.uuid4().hex[:8]}"))
    with fluent_run(client, run.info.run_id):  # leaves no global MLflow state behind
        uri, model_id = log_pyfunc(prepared["teacher"], spec, pip_requirements())
        # models:/m-... sources resolve through the global tracking URI: register inside.
        version = ModelRegistry(client, name).register(uri, run.info.run_id, {}, model_id=model_id)
    client.set_terminated(run.info.run_id)
    client.set_registered_model_alias(name, "champion", version)

    for ref in (f"models:/{name}@champion", f"models:/{name}/{version}"):
        cfg = _with_teacher(cfg, "mlflow", ref)
        out = import_teacher(cfg, "reg", prepared["dataset"], tmp_path / ref.split("/")[-1])
        assert out["imported_from"] == f"models:/{name}/{version}"
        assert torch.equal(
            _predict(tmp_path / ref.split("/")[-1], prepared["dataset"]),
            _predict(prepared["teacher"], prepared["dataset"]),
        )
    cfg = _with_teacher(cfg, "mlflow", f"models:/{name}@nobody")
    with pytest.raises(StepError, match="has no alias 'nobody'"):
        import_teacher(cfg, "reg-missing", prepared["dataset"], tmp_path / "missing")


def test_mixup_distills_from_the_live_teacher_and_leaves_the_baseline_alone(
    prepared: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Function matching: the student learns the teacher's answers on mixed samples (the teacher
    live, no cache); the no-teacher baseline trains on unmixed ones, since they have labels."""
    from kd_lib.config import AugmentConfig
    from kd_lib.data import augment as augment_lib

    cfg = prepared["cfg"].model_copy(deep=True)
    cfg.distill.losses = [type(cfg.distill.losses[0])(name="kd", weight=1.0, params={"temperature": 1.0})]
    cfg.distill.train.augment = AugmentConfig(mixup_alpha=1.0)
    cfg.distill.baseline = True
    calls: list[int] = []
    real_mixup = augment_lib.mixup

    def counted(x: torch.Tensor, *args: object) -> torch.Tensor:
        calls.append(len(x))
        return real_mixup(x, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(augment_lib, "mixup", counted)
    summary = distill(
        cfg, "mixup", prepared["dataset"], prepared["teacher"], tmp_path / "student", None, tmp_path / "baseline"
    )
    n_train = len(load_splits(prepared["dataset"]).y["train"])
    batch, epochs = cfg.distill.train.batch_size, summary["epochs_run"]
    assert len(calls) == epochs * -(-n_train // batch)  # every KD batch mixed, no baseline batch
    assert "baseline_best_val_accuracy" in summary
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(summary["run_id"])
    assert run.data.params["teacher_logit_cache"] == "false"
    assert quantization.load_model(tmp_path / "baseline")[1]["role"] == "baseline"
