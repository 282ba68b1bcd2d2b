"""Small shared test helpers (importable, unlike conftest)."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from kd_lib.artifacts.dataset_dir import SPLIT_NAMES, Splits, save_splits
from kd_lib.config import PipelineConfig, parse_config
from kd_lib.data import dataset as data_lib
from kd_lib.data import lazy

if TYPE_CHECKING:  # mlflow costs seconds at import; the helpers only take a client built by the caller
    from mlflow import MlflowClient
    from mlflow.pyfunc import PyFuncModel


# Every config field added after config hashes were in use, written out by hand (not read from
# kd_lib.config.pipeline): a config that leaves them at their defaults must hash as it did before.
LATER_FIELDS = (
    ("quantize", "candidates"),
    ("quantize", "select"),
    ("gate", "max_latency_ms"),
    ("gate", "min_speedup"),
    ("distill", "promote"),
    ("distill", "transfer_source"),
    ("teacher", "fine_tune"),
    ("teacher", "input_normalization"),
    ("data", "text_column"),
    ("data", "max_length"),
    ("data", "vocab_size"),
    ("data", "tokenizer"),
    ("data", "num_workers"),
    ("student", "init_from_teacher"),
)
LATER_TRAIN_FIELDS = ("augment", "keep", "sync_batchnorm")  # in teacher.train and distill.train


def recipe_before_extensions(cfg: PipelineConfig) -> dict:
    """``cfg``'s hashed recipe as it was before any of ``LATER_FIELDS`` existed: its JSON dump
    without them (nor the labels ``tracking``, ``image``, ``cluster``, ``sweep``, ``candidate``),
    for a config that leaves them all at their defaults."""
    dump = cfg.model_dump(mode="json", exclude={"tracking", "image", "cluster", "sweep", "candidate"})
    for section, field in LATER_FIELDS:
        del dump[section][field]
    for step in ("teacher", "distill"):
        for field in LATER_TRAIN_FIELDS:
            del dump[step]["train"][field]
    del dump["data"]["augment"]["mixup_alpha"]  # a field added to a nested section
    return dump


def as_arrays(splits: Splits, fetch=None) -> Splits:  # noqa: ANN001 - a kd_lib.data.dataset.Fetch
    """``kd_lib.data.dataset.prepare``'s splits as the steps read them, in arrays: data prepared
    as a manifest (image folders, tables) is saved, opened lazily and read whole, transfer set too."""
    if splits.manifest is None:
        return splits
    with tempfile.TemporaryDirectory() as tmp:
        opened = lazy.open_splits(save_splits(splits, Path(tmp) / "ds"), Path(tmp) / "scratch", fetch, transfer=True)
        x = {name: np.asarray(opened.x[name]) for name in SPLIT_NAMES}
        transfer = np.asarray(opened.transfer) if opened.transfer is not None else None
        return Splits(x=x, y=opened.y, meta=opened.meta, transfer=transfer)


def tiny_config(tmp_path: Path, **sections: dict) -> PipelineConfig:
    """A config small enough for a pipeline run in seconds on 2 cores (digits, few epochs)."""
    tree: dict = {
        "name": "kdflow-test",
        "data": {"source": "digits", "seed": 0},
        "teacher": {
            "model": {"arch": "mlp", "params": {"width": 128, "depth": 1}},
            "train": {"epochs": 6, "batch_size": 64, "lr": 0.003, "patience": 3},
        },
        "student": {"model": {"arch": "mlp", "params": {"width": 24, "depth": 1}}},
        "distill": {
            "losses": [{"name": "kd", "weight": 0.9, "params": {"temperature": 4.0}}, {"name": "ce", "weight": 0.1}],
            "train": {"epochs": 8, "batch_size": 64, "lr": 0.005, "patience": 4},
        },
        "quantize": {"scheme": "dynamic_int8"},
        "evaluate": {"latency_warmup": 1, "latency_iters": 3},
        "gate": {
            "min_accuracy": 0.80,
            "max_accuracy_drop": 10.0,
            "max_quantization_drop": 2.0,
            "max_size_mb": 1.0,
            "min_compression_ratio": 4.0,
        },
        "registry": {"model_name": f"kdflow-test-{uuid.uuid4().hex[:8]}"},
        "tracking": {"experiment": "kdflow-test", "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
    }
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    return parse_config(tree)


class TableTeacher(torch.nn.Module):
    """A "teacher" that answers fixed logits per known input row (exact match), for tests
    that need to control exactly what the teacher says about each training sample."""

    # Registered buffers, declared so the type checker sees tensors rather than Module.__getattr__'s union.
    x: torch.Tensor
    logits: torch.Tensor

    def __init__(self, x: torch.Tensor, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("x", x.flatten(1).clone())
        self.register_buffer("logits", logits.clone())
        self.calls = 0

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        match = (batch.flatten(1)[:, None, :] == self.x[None]).all(-1)
        if not bool(match.any(1).all()):
            raise AssertionError("TableTeacher got an input it has no row for")
        return self.logits[match.float().argmax(1)]


def experiment_id(client: MlflowClient, name: str) -> str:
    """The id of the MLflow experiment ``name``, which the code under test must have created."""
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, f"no MLflow experiment {name!r}"
    return experiment.experiment_id


class _Residual(nn.Module):
    """conv-BN-ReLU-conv-BN added to the input (or to its strided 1x1 projection), then ReLU."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(),
            nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels_out),
        )
        same = stride == 1 and channels_in == channels_out
        self.skip: nn.Module = (
            nn.Identity()
            if same
            else nn.Sequential(
                nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False), nn.BatchNorm2d(channels_out)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.skip(x))


def user_resnet(input_shape: tuple[int, ...], num_classes: int, width: int = 8) -> nn.Module:
    """A user's own small ResNet (``arch: tests.helpers:user_resnet``): BatchNorm inside residual
    blocks, a strided block with a projection shortcut, adaptive pooling; what torch.ao's eager
    static int8 cannot quantize."""
    return nn.Sequential(
        nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        _Residual(width, width, 1),
        _Residual(width, 2 * width, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def load_versions(uri: str, name: str, versions: dict[str, str]) -> dict[str, PyFuncModel]:
    """Each registered version loaded through models:/ with pickle deserialization off."""
    import mlflow
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        return {kind: mlflow.pyfunc.load_model(f"models:/{name}/{version}") for kind, version in versions.items()}


def tiny_bert(
    layers: int,
    hidden: int = 16,
    heads: int = 2,
    intermediate: int | None = None,
    *,
    length: int = 12,
    vocab_size: int = 30,
    num_classes: int = 3,
    seed: int = 0,
    dropout: float = 0.1,
) -> nn.Module:
    """kdflow's ``transformer`` (a BertModel encoder), seeded, small enough for unit tests; pad id 0."""
    from kd_lib.models.text import transformer  # lazy: transformers only for the text tests

    torch.manual_seed(seed)
    return transformer(
        (length,),
        num_classes,
        vocab_size=vocab_size,
        pad_id=0,
        layers=layers,
        hidden=hidden,
        heads=heads,
        intermediate=2 * hidden if intermediate is None else intermediate,
        dropout=dropout,
    )


class _BatchRelative(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x.flatten(1).mean(dim=1)
        above = level - level.mean()  # brighter than the rest of its batch: class 0
        return torch.stack([above, -above], dim=1)


def batch_relative(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A model whose answer depends on the other samples of its batch (``arch:
    tests.helpers:batch_relative``), as a dynamically quantized one's can: class 0 when a sample is
    brighter than its batch's mean. Two classes; no weights."""
    if num_classes != 2:
        raise ValueError(f"batch_relative has 2 classes, not {num_classes}")
    return _BatchRelative()


def mnist14_pngs(folder: Path, picks: np.ndarray, class_prefix: str | None = "") -> None:
    """Write the shipped MNIST digits ``picks`` (indices into ``mnist14``) as grey PNG files named
    by their position in ``picks``: into ``folder/<class_prefix><label>/`` (an image folder), or,
    with ``class_prefix=None``, straight into ``folder`` (unlabeled images)."""
    from PIL import Image  # lazy: Pillow only for the image-folder tests

    x, y = data_lib.load_source("mnist14")
    for position, k in enumerate(picks):
        target = folder if class_prefix is None else folder / f"{class_prefix}{y[k]}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[k, 0].astype(np.uint8), mode="L").save(target / f"{position:04d}.png")
