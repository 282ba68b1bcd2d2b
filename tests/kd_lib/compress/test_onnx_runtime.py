"""ONNX Runtime artifacts: the fp32 export with normalization folded in, ORT's static and dynamic
int8, the model directory (``model.onnx`` + ``spec.json``) and ``OrtModule`` as kdflow's code
uses it. Real torch.onnx.export and ONNX Runtime sessions throughout; nothing is mocked."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from torch import Tensor, nn

from kd_lib.artifacts import SPEC_FILE, ArtifactError, read_spec
from kd_lib.artifacts.model_dir import ONNX_FILE, WEIGHTS_FILE, has_model, model_file
from kd_lib.compress import onnx_export
from kd_lib.compress.onnx_runtime import (
    NORMALIZATION_KEY,
    OrtModule,
    build_onnx_artifact,
    export_fp32_onnx,
    folded_normalization,
    quantize_onnx_file,
    save_onnx_model,
)
from kd_lib.compress.quantization import QuantizationError, load_model, save_model
from kd_lib.evaluate import metrics
from kd_lib.models.builders import build_model
from kd_lib.models.resnet import resnet
from kd_lib.train.inference import compute_logits

GRAY = (1, 8, 8)
RGB = (3, 8, 8)
# Raw inputs look like pixels: far from normalized, so a normalization not folded in shows.
GRAY_NORM = {"mean": 110.0, "std": 60.0}
RGB_NORM = {"mean": [120.0, 100.0, 90.0], "std": [50.0, 60.0, 70.0]}


def _resnet() -> nn.Module:
    """The builtin ResNet-8 (stem, three stages of one BasicBlock, two of them strided with 1x1
    projection shortcuts, adaptive average pooling, a Linear head) on RGB, width 8/16/32."""
    torch.manual_seed(0)
    model = resnet(RGB, 5, depth=8, width=0.5)
    # Running statistics far from (0, 1), so an unfolded or train-mode BatchNorm shows in the logits.
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def _builtin(arch: str, params: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    return build_model(arch, params, GRAY, 5).eval()


# name -> (model, input_shape, normalization)
CASES: dict[str, tuple[Any, tuple[int, ...], dict[str, Any]]] = {
    "mlp": (lambda: _builtin("mlp", {"width": 32, "depth": 2}), GRAY, GRAY_NORM),
    "cnn": (lambda: _builtin("cnn", {"channels": 4, "depth": 2, "hidden": 16}), GRAY, GRAY_NORM),
    "resnet": (_resnet, RGB, RGB_NORM),
}


def _raw(n: int, shape: tuple[int, ...], seed: int = 2) -> Tensor:
    return torch.rand(n, *shape, generator=torch.Generator().manual_seed(seed)) * 255


def _normalize(x: Tensor, norm: dict[str, Any]) -> Tensor:
    mean, std = torch.as_tensor(norm["mean"]), torch.as_tensor(norm["std"])
    if mean.ndim == 1:
        mean, std = mean.view(-1, 1, 1), std.view(-1, 1, 1)
    return (x - mean) / std


def _spec(arch: str, shape: tuple[int, ...], norm: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "arch": arch,
        "params": {},
        "input_shape": list(shape),
        "num_classes": 5,
        "quantization": "none",
        "normalization": norm,
        **extra,
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    """Each case's model and its fp32 export (one export per model for the whole file)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, (make, shape, norm) in CASES.items():
        model = make()
        out[name] = (model, export_fp32_onnx(model, shape, norm, root / f"{name}.onnx"))
    return out


@pytest.fixture(scope="module")
def trained_mlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Tensor, Tensor, Path]:
    """An MLP trained to ~100% on raw-scale Gaussian blobs, and its fp32 export:
    (model, raw x [400, 1, 8, 8], y [400], export)."""
    gen = torch.Generator().manual_seed(3)
    centers = torch.rand(5, *GRAY, generator=gen) * 255
    y = torch.arange(400) % 5
    x = (centers[y] + 25 * torch.randn(400, *GRAY, generator=gen)).clamp(0, 255)
    torch.manual_seed(0)
    model = build_model("mlp", {"width": 64, "depth": 2}, GRAY, 5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    xn = _normalize(x, GRAY_NORM)
    for _ in range(60):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xn), y).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert (model(xn).argmax(1) == y).float().mean() > 0.95
    return model, x, y, export_fp32_onnx(model, GRAY, GRAY_NORM, tmp_path_factory.mktemp("trained") / "fp32.onnx")


# ------------------------------------------------------------------------------------ export


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("batch", [1, 7])
def test_the_fp32_export_takes_raw_inputs_and_equals_torch_on_normalized_ones(
    exported: dict[str, tuple[nn.Module, Path]], name: str, batch: int
) -> None:
    model, path = exported[name]
    _, shape, norm = CASES[name]
    raw = _raw(batch, shape)
    with torch.no_grad():
        expected = model(_normalize(raw, norm))
    got = OrtModule.from_file(path)(raw)
    assert got.shape == (batch, 5) and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 1e-4
    # Normalization matters here: fed the normalized inputs, the export is far off.
    assert (OrtModule.from_file(path)(_normalize(raw, norm)) - expected).abs().max().item() > 1e-2


def test_the_export_is_one_self_contained_file_with_a_dynamic_batch_axis(
    exported: dict[str, tuple[nn.Module, Path]],
) -> None:
    model, path = exported["resnet"]
    assert model.training is False  # the export worked on a copy in eval mode
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["x"] and [o.name for o in proto.graph.output] == ["logits"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    assert not path.with_suffix(".onnx.data").exists() and not list(path.parent.glob("*.data"))
    # The exporter's per-node debug records (source paths, FX nodes) are not shipped.
    assert b"onnx_runtime.py" not in path.read_bytes() and b"pkg.torch.onnx" not in path.read_bytes()
    assert all(not n.metadata_props and not n.doc_string for n in proto.graph.node)
    # BatchNorm is folded into the convolutions (eval mode), the residual adds are there.
    ops = [n.op_type for n in proto.graph.node]
    assert "BatchNormalization" not in ops and ops.count("Add") >= 2
    assert folded_normalization(path) == RGB_NORM
    assert json.loads({p.key: p.value for p in proto.metadata_props}[NORMALIZATION_KEY]) == RGB_NORM


def test_a_model_torch_cannot_export_is_a_quantization_error_naming_it(tmp_path: Path) -> None:
    class Unexportable(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            if x.sum() > 0:  # a branch on the data: torch.export cannot trace it
                return x.flatten(1)[:, :5]
            return -x.flatten(1)[:, :5]

    with pytest.raises(QuantizationError, match=r"torch\.onnx\.export cannot export this Unexportable") as info:
        export_fp32_onnx(Unexportable(), GRAY, None, tmp_path / "u.onnx")
    assert "data-dependent" in info.value.cause and "if x.sum() > 0" in info.value.cause
    assert "choose a torch scheme" in info.value.fix


# ------------------------------------------------------------------------------------- int8


@pytest.mark.parametrize("scheme", ["onnx_static_int8", "onnx_dynamic_int8"])
def test_int8_agrees_with_fp32_on_a_trained_model(
    trained_mlp: tuple[nn.Module, Tensor, Tensor, Path], scheme: str, tmp_path: Path
) -> None:
    _, x, y, fp32 = trained_mlp
    calibration = [x[i : i + 32] for i in range(0, 128, 32)]  # RAW batches: the graph normalizes
    int8 = quantize_onnx_file(fp32, tmp_path / "int8.onnx", scheme, calibration)
    fp32_pred = OrtModule.from_file(fp32)(x).argmax(1)
    int8_logits = OrtModule.from_file(int8)(x)
    assert (int8_logits.argmax(1) == fp32_pred).float().mean().item() >= 0.98
    assert (int8_logits.argmax(1) == y).float().mean().item() >= 0.95
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert ({"QuantizeLinear", "DequantizeLinear"} <= ops) if scheme == "onnx_static_int8" else ("MatMulInteger" in ops)
    assert folded_normalization(int8) == GRAY_NORM  # the metadata survives quantization


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_static_int8_quantizes_convolutions_with_batchnorm_and_residual_adds(
    exported: dict[str, tuple[nn.Module, Path]], name: str, tmp_path: Path
) -> None:
    model, path = exported[name]
    _, shape, norm = CASES[name]
    calibration = [_raw(32, shape, seed=s) for s in range(4)]
    int8 = quantize_onnx_file(path, tmp_path / "int8.onnx", "onnx_static_int8", calibration)
    proto = onnx.load(str(int8))
    conv_weights = {n.input[1] for n in proto.graph.node if n.op_type == "Conv"}
    dequantized = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    initializers = {t.name: t for t in proto.graph.initializer}
    assert conv_weights and conv_weights <= set(dequantized)  # every Conv reads a dequantized weight ...
    for weight in conv_weights:  # ... stored as int8, one scale per output channel
        assert initializers[dequantized[weight]].data_type == onnx.TensorProto.INT8
    raw = _raw(64, shape, seed=9)
    with torch.no_grad():
        expected = model(_normalize(raw, norm))
    got = OrtModule.from_file(int8)(raw)
    # Random weights, so logits are close together; most argmaxes still agree.
    assert (got.argmax(1) == expected.argmax(1)).float().mean().item() >= 0.8


def test_int8_of_a_wide_mlp_is_at_most_030x_the_fp32_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("mlp", {"width": 1200, "depth": 2}, (1, 28, 28), 10).eval()
    fp32 = export_fp32_onnx(model, (1, 28, 28), {"mean": 33.0, "std": 78.0}, tmp_path / "fp32.onnx")
    calibration = [torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255]
    for scheme in ("onnx_static_int8", "onnx_dynamic_int8"):
        int8 = quantize_onnx_file(fp32, tmp_path / f"{scheme}.onnx", scheme, calibration)
        ratio = int8.stat().st_size / fp32.stat().st_size
        assert ratio <= 0.30, f"{scheme}: {ratio:.3f}"


def test_quantizing_needs_a_known_scheme_and_static_needs_calibration(
    exported: dict[str, tuple[nn.Module, Path]], tmp_path: Path
) -> None:
    _, path = exported["mlp"]
    with pytest.raises(QuantizationError, match="needs calibration batches"):
        quantize_onnx_file(path, tmp_path / "q.onnx", "onnx_static_int8", [])
    with pytest.raises(QuantizationError, match="'static_int8' is not an ONNX Runtime int8 scheme"):
        quantize_onnx_file(path, tmp_path / "q.onnx", "static_int8", [])


# -------------------------------------------------------------------------------- artifacts


@pytest.mark.parametrize("scheme", ["onnx_fp32", "onnx_static_int8", "onnx_dynamic_int8"])
def test_an_artifact_round_trips_through_load_model(
    exported: dict[str, tuple[nn.Module, Path]], scheme: str, tmp_path: Path
) -> None:
    model, fp32 = exported["resnet"]
    spec = _spec("resnet", RGB, RGB_NORM, role="student", dataset_fingerprint="abc") | {
        "params": {"depth": 8, "width": 0.5}
    }
    calibration = [_raw(16, RGB, seed=s) for s in range(2)]
    if scheme == "onnx_static_int8":  # the whole way: export, quantize, save
        directory = build_onnx_artifact(model, scheme, spec, calibration, tmp_path / "artifact")
    else:  # one export per model file-wide keeps this file fast; the same steps as build_onnx_artifact
        path = fp32 if scheme == "onnx_fp32" else quantize_onnx_file(fp32, tmp_path / "q.onnx", scheme, calibration)
        directory = save_onnx_model(path, spec, tmp_path / "artifact", scheme=scheme)
    assert sorted(p.name for p in directory.iterdir()) == [ONNX_FILE, SPEC_FILE]
    assert has_model(directory) and model_file(directory) == directory / ONNX_FILE

    loaded, written = load_model(directory)
    assert isinstance(loaded, OrtModule) and not loaded.training
    raw = _raw(7, RGB)
    assert torch.equal(loaded(raw), OrtModule.from_file(directory / ONNX_FILE)(raw))
    with torch.no_grad():
        expected = model(_normalize(raw, RGB_NORM))
    tolerance = 1e-4 if scheme == "onnx_fp32" else 0.5
    assert (loaded(raw) - expected).abs().max().item() < tolerance

    assert written == read_spec(directory).to_dict()
    assert written["quantization"] == scheme
    assert written["backend"] == "onnxruntime" and written["format"] == "onnx"
    assert written["normalization"] == {"mean": 0.0, "std": 1.0}  # it takes raw inputs
    assert written["folded_normalization"] == RGB_NORM
    assert written["versions"]["onnxruntime"] == onnxruntime.__version__
    assert written["versions"]["onnx"] == onnx.__version__
    assert written["versions"]["torch"] == written["torch_version"] == torch.__version__
    assert written["role"] == "student" and written["dataset_fingerprint"] == "abc"
    assert written["input_shape"] == list(RGB) and written["arch"] == "resnet"
    assert ("calibration" in written) == (scheme == "onnx_static_int8")
    assert spec["quantization"] == "none"  # the caller's spec is not modified


def test_save_onnx_model_records_what_the_file_folded_in(
    exported: dict[str, tuple[nn.Module, Path]], tmp_path: Path
) -> None:
    _, path = exported["cnn"]
    spec = _spec("cnn", GRAY, GRAY_NORM)
    directory = save_onnx_model(path, spec, tmp_path / "a", scheme="onnx_fp32")
    assert read_spec(directory).to_dict()["folded_normalization"] == GRAY_NORM
    with pytest.raises(ValueError, match="scheme 'none' is not one of onnx_fp32"):
        save_onnx_model(path, spec, tmp_path / "b")
    with pytest.raises(ValueError, match=r"folds in normalization .* but the spec says"):
        save_onnx_model(path, spec | {"normalization": {"mean": 0.5, "std": 0.2}}, tmp_path / "c", scheme="onnx_fp32")
    plain = tmp_path / "plain.onnx"
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.save(proto, str(plain))
    with pytest.raises(ValueError, match=f"has no {NORMALIZATION_KEY} metadata"):
        save_onnx_model(plain, spec, tmp_path / "d", scheme="onnx_fp32")


def test_a_corrupt_or_missing_model_onnx_is_an_artifact_error_naming_it(
    exported: dict[str, tuple[nn.Module, Path]], tmp_path: Path
) -> None:
    _, path = exported["mlp"]
    directory = save_onnx_model(path, _spec("mlp", GRAY, GRAY_NORM), tmp_path / "a", scheme="onnx_fp32")
    target = directory / ONNX_FILE
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=f"{target}: not a loadable ONNX model") as info:
        load_model(directory)
    assert "export the model again" in info.value.fix
    target.write_bytes(b"")
    with pytest.raises(ArtifactError, match=f"{target}: empty"):
        load_model(directory)
    target.unlink()
    with pytest.raises(ArtifactError, match=f"{target}: missing"):
        load_model(directory)


def test_a_spec_disagreeing_with_the_graph_is_an_artifact_error(
    exported: dict[str, tuple[nn.Module, Path]], tmp_path: Path
) -> None:
    _, path = exported["mlp"]
    directory = save_onnx_model(path, _spec("mlp", (1, 4, 16), GRAY_NORM), tmp_path / "a", scheme="onnx_fp32")
    with pytest.raises(ArtifactError, match=r"model\.onnx: takes samples of shape \[1, 8, 8\].*input_shape \[1, 4"):
        load_model(directory)


def test_torch_and_onnx_writers_leave_one_model_in_a_directory(
    exported: dict[str, tuple[nn.Module, Path]], tmp_path: Path
) -> None:
    model, path = exported["mlp"]
    directory = tmp_path / "m"
    save_model(model, _spec("mlp", GRAY, GRAY_NORM) | {"params": {"width": 32, "depth": 2}}, directory)
    save_onnx_model(path, _spec("mlp", GRAY, GRAY_NORM), directory, scheme="onnx_fp32")
    assert sorted(p.name for p in directory.iterdir()) == [ONNX_FILE, SPEC_FILE]
    save_model(model, _spec("mlp", GRAY, GRAY_NORM) | {"params": {"width": 32, "depth": 2}}, directory)
    assert sorted(p.name for p in directory.iterdir()) == [SPEC_FILE, WEIGHTS_FILE]
    torch_model, spec = load_model(directory)
    assert not isinstance(torch_model, OrtModule) and "format" not in spec


# -------------------------------------------------------------------------------- OrtModule


def test_ort_module_follows_torch_set_num_threads(exported: dict[str, tuple[nn.Module, Path]]) -> None:
    _, path = exported["cnn"]
    module = OrtModule.from_file(path)
    x = _raw(4, GRAY)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 1):
            torch.set_num_threads(threads)
            module(x)
            assert module.session().get_session_options().intra_op_num_threads == threads
        options = module.session().get_session_options()
        assert options.inter_op_num_threads == 1
        assert options.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        assert options.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # kdflow's latency timer pins threads with torch.set_num_threads while it times.
        torch.set_num_threads(2)
        metrics.latency_ms(module, x[:1], batch_size=4, warmup=1, iters=2, threads=1)
        assert module.threads == 1  # the timed passes ran on one thread
        module(x)
        assert module.threads == 2 == torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


def test_ort_module_behaves_like_an_eval_module_for_kdflows_code(
    exported: dict[str, tuple[nn.Module, Path]], tmp_path: Path
) -> None:
    model, path = exported["cnn"]
    directory = save_onnx_model(path, _spec("cnn", GRAY, GRAY_NORM), tmp_path / "a", scheme="onnx_fp32")
    module, _ = load_model(directory)
    assert list(module.parameters()) == [] and list(module.buffers()) == [] and module.state_dict() == {}
    assert module.to("cpu") is module and module.eval() is module
    raw = _raw(20, GRAY)
    y = torch.arange(20) % 5
    with torch.no_grad():
        expected = model(_normalize(raw, GRAY_NORM))
    with torch.inference_mode():
        assert torch.allclose(module(raw), expected, atol=1e-4)
    logits = compute_logits(module, raw, batch_size=6)
    assert logits.shape == (20, 5) and torch.allclose(logits, expected, atol=1e-4)
    assert module.train().training and torch.allclose(module(raw), expected, atol=1e-4)  # inference graph
    result = metrics.evaluate_model(module.eval(), raw, y, 5, directory, num_params=0, warmup=1, iters=2)
    assert result["predictions"] == expected.argmax(1).tolist()
    assert result["weights_bytes"] == (directory / ONNX_FILE).stat().st_size
    assert {"latency_b1_p50_ms", "latency_b64_p50_ms"} <= set(result) and not module.training
    copy = pickle.loads(pickle.dumps(module))  # the bytes travel, the session is rebuilt
    assert torch.equal(copy(raw), module(raw))
    assert (module(raw.double()) - expected).abs().max().item() < 1e-4  # float64 is cast to float32


def test_ort_module_refuses_a_wrong_input_shape_naming_both(exported: dict[str, tuple[nn.Module, Path]]) -> None:
    _, path = exported["cnn"]
    module = OrtModule.from_file(path)
    with pytest.raises(ValueError, match=r"refused input of shape \(3, 8, 8\); the model takes \[B, 1, 8, 8\]"):
        module(torch.zeros(3, 8, 8))
    with pytest.raises(ArtifactError, match="nowhere.onnx: cannot read"):
        OrtModule.from_file(path.parent / "nowhere.onnx")


# ---------------------------------------------------------------------------- the old API


def test_the_export_onnx_api_still_mirrors_torch_schemes(tmp_path: Path) -> None:
    model = _resnet().train()  # exported in eval mode from a copy; the model stays in training mode
    x = _normalize(_raw(16, RGB), RGB_NORM)  # the older files take what the torch model takes
    fp32 = onnx_export.export_fp32(model, RGB, tmp_path / "fp32.onnx")
    assert model.training
    with torch.no_grad():
        expected = model.eval()(x)
    assert (onnx_export.run_onnx(fp32, x, batch_size=5) - expected).abs().max().item() < 1e-4
    assert folded_normalization(fp32) == {}
    path, how = onnx_export.quantize_onnx(fp32, tmp_path / "q.onnx", "static_int8", [x])
    assert path is not None and path.is_file() and how.startswith("onnxruntime quantize_static, QDQ, per-channel")
    assert onnx_export.quantize_onnx(fp32, tmp_path / "n.onnx", "fp16", [x]) == (
        None,
        "scheme 'fp16' has no onnxruntime counterpart here; only the fp32 model was exported",
    )
    assert onnx_export.quantize_onnx(fp32, tmp_path / "n.onnx", "none", [x])[0] is None
    assert np.isfinite(onnx_export.run_onnx(path, x).numpy()).all()
