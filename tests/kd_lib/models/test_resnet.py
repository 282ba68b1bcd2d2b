"""The builtin CIFAR-style ResNet (``arch: resnet``): sizes, shapes, errors, feature layers, ONNX."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kd_lib.compress.onnx_runtime import build_onnx_artifact, export_fp32_onnx, load_onnx_model
from kd_lib.config import ConfigError
from kd_lib.models.builders import MODELS, Renormalized, build_model, count_parameters
from kd_lib.models.resnet import BasicBlock, ResNet
from kd_lib.train.objective import capture_features, default_feature_layer


def test_resnet_is_in_the_model_registry() -> None:
    assert "resnet" in MODELS.names()


@pytest.mark.parametrize(
    ("depth", "low", "high"),
    # The papers' counts (option-A shortcuts) are 0.27M and 0.85M; the 1x1 projections add ~3k.
    [(8, 0.07e6, 0.09e6), (20, 0.26e6, 0.28e6), (32, 0.45e6, 0.48e6), (56, 0.84e6, 0.87e6)],
)
def test_parameter_counts_match_the_papers(depth: int, low: float, high: float) -> None:
    assert low <= count_parameters(build_model("resnet", {"depth": depth}, (3, 32, 32), 10)) <= high


def test_depth_sets_blocks_per_stage_and_width_scales_channels() -> None:
    model = build_model("resnet", {"depth": 14, "width": 2}, (3, 32, 32), 10)
    assert isinstance(model, ResNet)
    for stage, channels in (("layer1", 32), ("layer2", 64), ("layer3", 128)):
        blocks = getattr(model, stage)
        assert len(blocks) == 2 and all(isinstance(b, BasicBlock) for b in blocks)
        assert blocks[-1].conv2.out_channels == channels
    # Width scales parameters roughly quadratically.
    narrow = count_parameters(build_model("resnet", {"depth": 14, "width": 0.5}, (3, 32, 32), 10))
    assert 10 < count_parameters(model) / narrow < 20


def test_projection_shortcuts_only_where_the_shape_changes() -> None:
    model = build_model("resnet", {"depth": 8}, (3, 32, 32), 10)
    first, second, third = (b for b in model.modules() if isinstance(b, BasicBlock))  # layer1..3, one block each
    # 16 -> 16 at stride 1: identity; 16 -> 32 and 32 -> 64 at stride 2: 1x1 conv + BN.
    assert isinstance(first.shortcut, nn.Identity)
    for block in (second, third):
        conv, bn = block.shortcut.children()
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert conv.kernel_size == (1, 1) and conv.stride == (2, 2)
    # A 1-channel input still gets no projection in layer1: the stem maps it to 16 channels.
    gray = build_model("resnet", {"depth": 8}, (1, 8, 8), 10)
    assert isinstance(next(b for b in gray.modules() if isinstance(b, BasicBlock)).shortcut, nn.Identity)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 5, 7), (1, 1, 1)])
def test_any_channels_and_spatial_size_map_to_logits(shape: tuple[int, int, int]) -> None:
    model = build_model("resnet", {"depth": 8, "width": 0.5}, shape, 7).eval()
    assert model(torch.randn(3, *shape)).shape == (3, 7)


@pytest.mark.parametrize("depth", [7, 9, 21, 2, 0, -4, 20.0, "20", True])
def test_an_invalid_depth_is_a_config_error_listing_valid_depths(depth: object) -> None:
    with pytest.raises(ConfigError, match=rf"depth {depth!r}.*valid depths: 8, 14, 20, 26, 32, 44, 56, 110"):
        build_model("resnet", {"depth": depth}, (1, 8, 8), 10)


@pytest.mark.parametrize(
    ("params", "shape", "match"),
    [
        ({"width": 0}, (1, 8, 8), "width must be a number > 0"),
        ({"width": True}, (1, 8, 8), "width must be a number > 0"),
        ({}, (64,), r"needs a \(C, H, W\) input_shape, got \(64,\)"),
        ({"blocks": 3}, (1, 8, 8), "unknown parameter.*blocks.*accepted parameters: depth, width"),
    ],
)
def test_bad_parameters_are_config_errors_naming_them(params: dict, shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_model("resnet", params, shape, 10)


def test_feature_layers_resolve_by_module_path() -> None:
    model = build_model("resnet", {"depth": 8, "width": 0.5}, (1, 8, 8), 10).eval()
    names = dict(model.named_modules())
    assert {"stem", "layer1", "layer2", "layer3", "pool", "fc", "layer3.0.conv1"} <= set(names)
    x = torch.randn(2, 1, 8, 8)
    out, feats = capture_features(model, {"stem", "layer1", "layer2", "layer3", "layer3.0.conv1"}, x)
    assert out.shape == (2, 10)
    assert feats["stem"].shape == (2, 8, 8, 8) and feats["layer1"].shape == (2, 8, 8, 8)
    assert feats["layer2"].shape == (2, 16, 4, 4) and feats["layer3"].shape == (2, 32, 2, 2)
    assert feats["layer3.0.conv1"].shape == (2, 32, 2, 2)
    # The default layer of fitnets/at is the last feature map, also when the model is wrapped.
    assert default_feature_layer(model) == "layer3"
    assert default_feature_layer(Renormalized(model, {"mean": 1.0}, {})) == "model.layer3"


def _trained_like(model: nn.Module) -> nn.Module:
    """Running statistics far from (0, 1), so an unfolded or train-mode BatchNorm shows in the logits."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 3 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def _ops(path: Path) -> list[str]:
    proto = onnx.load_model(str(path))
    return [n.op_type for n in proto.graph.node] + [n.op_type for f in proto.functions for n in f.node]


def test_batchnorm_is_folded_in_the_export_and_in_onnx_runtimes_optimized_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _trained_like(build_model("resnet", {"depth": 8, "width": 0.5}, (1, 8, 8), 10))
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    norm = {"mean": 0.3, "std": 2.0}
    path = export_fp32_onnx(model, (1, 8, 8), norm, tmp_path / "fp32.onnx")
    exported = _ops(path)
    assert "BatchNormalization" not in exported
    assert exported.count("Conv") == 1 + 3 * 2 + 2 and exported.count("Add") >= 3  # stem, 3 blocks, 2 shortcuts
    # What ONNX Runtime actually runs after its own graph optimizations.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    assert "BatchNormalization" not in _ops(tmp_path / "optimized.onnx")
    # Folded, not dropped: the graph computes the eval-mode model on raw inputs.
    raw = torch.randn(16, 1, 8, 8) * 2 + 0.3
    (onnx_logits,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": raw.numpy()})
    with torch.no_grad():
        expected = model((raw - 0.3) / 2.0)
    torch.testing.assert_close(torch.from_numpy(onnx_logits), expected, atol=1e-4, rtol=1e-4)


def test_static_int8_onnx_artifact_of_a_resnet_agrees_with_fp32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _trained_like(build_model("resnet", {"depth": 8, "width": 1}, (1, 8, 8), 10))
    spec = {
        "arch": "resnet",
        "params": {"depth": 8, "width": 1},
        "input_shape": [1, 8, 8],
        "num_classes": 10,
        "normalization": {"mean": 0.0, "std": 1.0},
    }
    gen = torch.Generator().manual_seed(1)
    calibration = [torch.randn(32, 1, 8, 8, generator=gen) for _ in range(4)]
    build_onnx_artifact(model, "onnx_static_int8", spec, calibration, tmp_path / "int8")
    module, saved = load_onnx_model(tmp_path / "int8")
    assert saved["quantization"] == "onnx_static_int8"
    ops = _ops(tmp_path / "int8" / "model.onnx")
    assert "QuantizeLinear" in ops and "BatchNormalization" not in ops
    x = torch.randn(64, 1, 8, 8, generator=gen)
    with torch.no_grad():
        fp32, int8 = model(x), module(x)
    assert int8.shape == (64, 10)
    assert (fp32.argmax(1) == int8.argmax(1)).float().mean() >= 0.9
