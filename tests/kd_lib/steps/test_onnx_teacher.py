"""``teacher.source: onnx``: an ONNX file alone as the teacher, its input normalization folded in,
checked against the data, distilled from (cached and live), and counted by its initializers."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from kd_lib.artifacts.dataset_dir import load_splits
from kd_lib.compress.onnx_runtime import (
    OrtModule,
    export_fp32_onnx,
    folded_normalization,
    taking_raw_inputs,
    weight_count,
)
from kd_lib.compress.quantization import load_model
from kd_lib.config import ConfigError, PipelineConfig
from kd_lib.models.builders import count_parameters, mlp
from kd_lib.models.resnet import resnet
from kd_lib.steps.common import StepError
from kd_lib.steps.distill import distill
from kd_lib.steps.evaluate import evaluate
from kd_lib.steps.import_teacher import import_teacher
from kd_lib.steps.prepare_data import prepare_data
from tests.helpers import tiny_config

# The foreign teacher was trained on (raw - 8) / 4: digits' raw pixels are 0..16.
TEACHER_NORM = {"mean": 8.0, "std": 4.0}


def _raw(x: torch.Tensor, norm: dict) -> torch.Tensor:
    return x * torch.as_tensor(norm["std"]) + torch.as_tensor(norm["mean"])


def _foreign_teacher(dataset: Path, tmp: Path) -> tuple[nn.Module, Path]:
    """A logistic regression trained outside kdflow on (raw - 8) / 4, exported as a plain ONNX file."""
    splits = load_splits(dataset)
    x = (_raw(torch.from_numpy(splits.x["train"]), splits.meta.normalization) - 8.0) / 4.0
    y = torch.from_numpy(splits.y["train"])
    torch.manual_seed(0)
    model = mlp((1, 8, 8), 10, depth=0)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    path = export_fp32_onnx(model.eval(), (1, 8, 8), None, tmp / "foreign.onnx")
    proto = onnx.load_model(str(path))
    del proto.metadata_props[:]  # nothing kdflow-specific left: a file from anywhere
    onnx.save_model(proto, str(path))
    return model, path


def _onnx_cfg(tmp: Path, uri: Path | str, teacher: dict | None = None, **sections: dict) -> PipelineConfig:
    own = {"source": "onnx", "uri": str(uri), "input_normalization": dict(TEACHER_NORM)} | (teacher or {})
    return tiny_config(tmp, teacher=own, **sections)


def test_folding_the_input_normalization_makes_the_graph_take_raw_inputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = resnet((3, 6, 6), 4, depth=8, width=0.25).eval()
    path = export_fp32_onnx(model, (3, 6, 6), None, tmp_path / "plain.onnx")
    norm = {"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]}
    folded = taking_raw_inputs(path.read_bytes(), norm, "plain.onnx")
    (tmp_path / "folded.onnx").write_bytes(folded)
    assert folded_normalization(tmp_path / "folded.onnx") == norm
    raw = torch.rand(5, 3, 6, 6)
    mean, std = torch.tensor(norm["mean"]).view(3, 1, 1), torch.tensor(norm["std"]).view(3, 1, 1)
    with torch.no_grad():
        expected = model((raw - mean) / std)
    torch.testing.assert_close(OrtModule(folded)(raw), expected, atol=1e-4, rtol=1e-4)
    # "raw": the graph is left as it is.
    torch.testing.assert_close(OrtModule(taking_raw_inputs(path.read_bytes(), {}, "p"))(raw), model(raw).detach())


def test_weight_count_counts_the_initializers_like_count_parameters(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = mlp((1, 8, 8), 10, width=32, depth=2)
    path = export_fp32_onnx(plain, (1, 8, 8), None, tmp_path / "mlp.onnx")
    assert weight_count(path.read_bytes()) == count_parameters(plain)
    # BatchNorm folded into the convolutions: the convolutions gain a bias, BN's scale and shift go.
    net = resnet((1, 8, 8), 10, depth=8, width=0.5).eval()
    for m in net.modules():  # trained statistics: a fresh BatchNorm is the identity, folded to nothing
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None
            m.running_mean.uniform_(-1, 1)
    bn = sum(2 * m.num_features for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    convs = sum(m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d))
    path = export_fp32_onnx(net, (1, 8, 8), None, tmp_path / "resnet.onnx")
    assert weight_count(path.read_bytes()) == count_parameters(net) - bn + convs


def test_an_onnx_teacher_is_imported_checked_distilled_from_and_counted(in_tmp: Path) -> None:
    tmp = in_tmp
    fast = {"epochs": 3, "batch_size": 64, "lr": 0.03}
    cfg = _onnx_cfg(tmp, tmp / "foreign.onnx", distill={"train": fast})
    prepare_data(cfg, "ox", tmp / "dataset")
    torch_teacher, path = _foreign_teacher(tmp / "dataset", tmp)

    out = import_teacher(cfg, "ox", tmp / "dataset", tmp / "teacher")
    model, spec = load_model(tmp / "teacher")
    assert isinstance(model, OrtModule)
    assert spec["arch"] == "onnx" and spec["quantization"] == "onnx_fp32" and spec["imported_from"] == str(path)
    assert spec["normalization"] == {"mean": 0.0, "std": 1.0} and spec["folded_normalization"] == TEACHER_NORM
    # The validation accuracy it logged is the torch model's on the inputs it was trained with.
    splits = load_splits(tmp / "dataset")
    x_val, y_val = torch.from_numpy(splits.x["val"]), torch.from_numpy(splits.y["val"])
    with torch.no_grad():
        expected = (torch_teacher((_raw(x_val, splits.meta.normalization) - 8) / 4).argmax(1) == y_val).float().mean()
    assert out["best_val_accuracy"] == pytest.approx(float(expected)) and out["best_val_accuracy"] > 0.8

    # Distilled from with the logit cache, and live on augmented batches.
    cached = distill(cfg, "ox", tmp / "dataset", tmp / "teacher", tmp / "student")
    live = _onnx_cfg(
        tmp,
        path,
        distill={"train": fast | {"augment": {"random_crop_padding": 1}}},
    )
    live_result = distill(live, "ox", tmp / "dataset", tmp / "teacher", tmp / "student_live")
    assert cached["best_val_accuracy"] > 0.7 and live_result["best_val_accuracy"] > 0.5

    # evaluate counts the teacher's weights from its ONNX initializers.
    models = {"teacher": tmp / "teacher", "student": tmp / "student", "quantized": tmp / "student"}
    evaluate(cfg, "ox", tmp / "dataset", models, tmp / "evaluation.json")
    record = json.loads((tmp / "evaluation.json").read_text())
    assert record["teacher"]["num_params"] == count_parameters(torch_teacher) + 2  # + the folded mean and std
    assert record["teacher"]["accuracy"] > 0.8


def test_an_onnx_teacher_that_does_not_fit_the_data_is_refused(in_tmp: Path) -> None:
    tmp = in_tmp
    cfg = tiny_config(tmp)
    prepare_data(cfg, "ox", tmp / "dataset")
    wrong_shape = export_fp32_onnx(mlp((64,), 10, depth=0), (64,), None, tmp / "flat.onnx")
    with pytest.raises(StepError, match=r"takes samples of shape \[64\], but the data's are \[1, 8, 8\]"):
        import_teacher(_onnx_cfg(tmp, wrong_shape), "ox", tmp / "dataset", tmp / "t1")
    wrong_classes = export_fp32_onnx(mlp((1, 8, 8), 3, depth=0), (1, 8, 8), None, tmp / "three.onnx")
    with pytest.raises(StepError, match="returns 3 logits per sample, but the data has 10 classes"):
        import_teacher(_onnx_cfg(tmp, wrong_classes), "ox", tmp / "dataset", tmp / "t2")
    (tmp / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(StepError, match="junk.onnx: not an ONNX model"):
        import_teacher(_onnx_cfg(tmp, tmp / "junk.onnx"), "ox", tmp / "dataset", tmp / "t3")


def test_an_onnx_teacher_needs_its_input_normalization_and_refuses_feature_losses(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="source 'onnx' needs input_normalization: 'raw'"):
        tiny_config(tmp_path, teacher={"source": "onnx", "uri": "t.onnx"})
    with pytest.raises(ConfigError, match="input_normalization describes an ONNX teacher"):
        tiny_config(tmp_path, teacher={"input_normalization": "raw"})
    with pytest.raises(ConfigError, match="gives logits only.*feature loss\\(es\\) at, fitnets"):
        _onnx_cfg(
            tmp_path,
            "t.onnx",
            distill={"losses": [{"name": "fitnets"}, {"name": "at"}, {"name": "ce"}]},
        )
    # Logit losses are fine; a zero-weighted feature term is never computed.
    cfg = _onnx_cfg(tmp_path, "t.onnx", distill={"losses": [{"name": "dkd"}, {"name": "at", "weight": 0}]})
    assert cfg.teacher.input_normalization is not None
    assert _onnx_cfg(tmp_path, "t.onnx", teacher={"input_normalization": "raw"}).teacher.input_normalization == "raw"


def test_the_config_knows_every_registered_feature_loss() -> None:
    from kd_lib.config.train import FEATURE_LOSSES
    from kd_lib.train.losses import LOSSES

    assert {n for n in LOSSES.names() if LOSSES.get(n).needs_features} == set(FEATURE_LOSSES)
