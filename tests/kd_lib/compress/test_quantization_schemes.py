"""Every scheme and backend on an MLP and a CNN: structure, errors, sizes, and a pickle-free
round trip in a fresh process (one subprocess loads every saved model; one test per model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.ao.nn.quantized import Quantize

from kd_lib.compress.quantization import (
    QUANTIZERS,
    SCHEMES,
    Int8WeightLayer,
    QuantizationError,
    QuantizeContext,
    _fusion_groups,
    backends,
    fp32_layers,
    get_quantizer,
    int8_per_channel,
    quantize,
    save_model,
)
from kd_lib.evaluate.metrics import artifact_size_bytes
from kd_lib.models.builders import build_model

ARCHS: dict[str, dict[str, Any]] = {
    "mlp": {"arch": "mlp", "params": {"width": 48, "depth": 2}, "input_shape": [1, 8, 8], "num_classes": 5},
    "cnn": {
        "arch": "cnn",
        "params": {"channels": 4, "depth": 2, "hidden": 16},
        "input_shape": [1, 8, 8],
        "num_classes": 5,
    },
}
CASES = [(arch, scheme, backend) for arch in ARCHS for scheme in SCHEMES for backend in backends(scheme)]


def _build(arch: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    spec = ARCHS[arch]
    return build_model(spec["arch"], spec["params"], tuple(spec["input_shape"]), spec["num_classes"]).eval()


def _calibration(n: int = 2) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 1, 8, 8, generator=gen) for _ in range(n)]


def _finetune_calls() -> tuple[list[nn.Module], Callable[[nn.Module], None]]:
    seen: list[nn.Module] = []

    def finetune(model: nn.Module) -> None:
        seen.append(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        for batch in _calibration():
            loss = model(batch).logsumexp(dim=1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    return seen, finetune


def _input_scale(quantized: nn.Module) -> float:
    """The activation scale of an eager static-int8 model's input QuantStub (set by calibration)."""
    stub = quantized.quant
    assert isinstance(stub, Quantize)
    return stub.scale.item()


def _context() -> QuantizeContext:
    return QuantizeContext(calibration=_calibration(), finetune=_finetune_calls()[1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Quantize, save and record the outputs of every case; reload all in ONE fresh process."""
    root = tmp_path_factory.mktemp("schemes")
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.save(x, root / "x.pt")
    expected: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamic_int8 on the CNN warns about its Conv2d layers
        for arch, scheme, backend in CASES:
            key = f"{arch}-{scheme}-{backend}"
            model = quantize(_build(arch), scheme, _context(), backend)
            save_model(model, {**ARCHS[arch], "quantization": scheme, "backend": backend}, root / key)
            with torch.no_grad():
                expected[key] = model(x)
    script = textwrap.dedent(
        """
        import sys, torch
        from pathlib import Path
        from kd_lib.compress.quantization import load_model
        root = Path(sys.argv[1])
        x = torch.load(root / "x.pt", weights_only=True)
        outs = {}
        for key in sys.argv[2:]:
            model, spec = load_model(root / key)
            assert not model.training
            with torch.no_grad():
                outs[key] = model(x)
        torch.save(outs, root / "outs.pt")
        print("LEAKED", sorted(m for m in sys.modules if m.split(".")[0] in ("kfp", "mlflow")))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(root), *expected], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LEAKED []" in proc.stdout
    got = torch.load(root / "outs.pt", weights_only=True)
    return {key: (expected[key], got[key]) for key in expected}


@pytest.mark.parametrize(("arch", "scheme", "backend"), CASES)
def test_fresh_process_load_gives_identical_predictions(saved, arch: str, scheme: str, backend: str) -> None:
    expected, got = saved[f"{arch}-{scheme}-{backend}"]
    assert got.dtype == torch.float32 and got.shape == (32, 5)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(("arch", "scheme", "backend"), CASES)
def test_every_scheme_stays_close_to_fp32(arch: str, scheme: str, backend: str) -> None:
    fp32 = _build(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize(fp32, scheme, _context(), backend)
    x = torch.cat(_calibration())
    with torch.no_grad():
        ref, out = fp32(x), quantized(x)
    # QAT moved the weights on purpose (toy loss); every post-training scheme must stay close.
    tolerance = 0.5 if scheme == "qat_int8" else 0.1 * ref.abs().max().item() + 1e-6
    assert (out - ref).abs().max().item() <= tolerance


def test_static_int8_quantizes_conv_and_linear_with_per_channel_weights() -> None:
    quantized = quantize(_build("cnn"), "static_int8", QuantizeContext(calibration=_calibration()))
    kinds = {f"{type(m).__module__}.{type(m).__name__}" for m in quantized.modules()}
    assert {
        "torch.ao.nn.intrinsic.quantized.modules.conv_relu.ConvReLU2d",
        "torch.ao.nn.intrinsic.quantized.modules.linear_relu.LinearReLU",
        "torch.ao.nn.quantized.modules.linear.Linear",
    } <= kinds
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in quantized.modules())
    state = quantized.state_dict()
    conv_weight = state["module.0.weight"]
    assert conv_weight.is_quantized and conv_weight.qscheme() == torch.per_channel_affine
    assert conv_weight.q_per_channel_scales().numel() == 4  # one scale per output channel


def test_static_int8_calibration_sets_activation_scales() -> None:
    small = quantize(_build("mlp"), "static_int8", QuantizeContext(calibration=[b * 0.01 for b in _calibration()]))
    large = quantize(_build("mlp"), "static_int8", QuantizeContext(calibration=_calibration()))
    assert _input_scale(small) < _input_scale(large) / 10


def test_static_int8_fuses_conv_batchnorm_relu() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3), nn.ReLU())
    assert _fusion_groups(model) == [["0", "1", "2"], ["4", "5"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the BatchNorm is folded, not left in fp32
        quantized = quantize(model.eval(), "static_int8", QuantizeContext(calibration=_calibration()))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in quantized.modules())
    assert fp32_layers(model, "static_int8") == []
    lone_bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).eval()
    with pytest.raises(QuantizationError, match=r"cannot quantize 2 \(BatchNorm1d\)"):
        quantize(lone_bn, "static_int8", QuantizeContext(calibration=_calibration()))


def test_static_int8_needs_calibration_and_qat_needs_finetuning() -> None:
    with pytest.raises(QuantizationError, match="'static_int8' needs calibration batches"):
        quantize(_build("mlp"), "static_int8")
    with pytest.raises(QuantizationError, match="'qat_int8' needs a fine-tuning function"):
        quantize(_build("mlp"), "qat_int8", QuantizeContext(calibration=_calibration()))


def test_static_int8_names_the_layer_type_it_cannot_quantize() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 5)).eval()
    with pytest.raises(QuantizationError, match=r"'static_int8'.*cannot quantize 2 \(LayerNorm\)"):
        quantize(model, "static_int8", QuantizeContext(calibration=_calibration()))


def test_dynamic_int8_on_a_cnn_says_its_convolutions_stay_fp32() -> None:
    with pytest.warns(UserWarning, match=r"'dynamic_int8'.*Conv2d layer\(s\) 0 \(Conv2d\), 3 \(Conv2d\) stay in fp32"):
        quantized = quantize(_build("cnn"), "dynamic_int8")
    assert [type(m) for m in quantized.modules()].count(nn.Conv2d) == 2
    assert fp32_layers(_build("cnn"), "dynamic_int8") == ["0 (Conv2d)", "3 (Conv2d)"]
    assert fp32_layers(_build("cnn"), "static_int8") == []
    with pytest.raises(QuantizationError, match=r"'dynamic_int8'.*Conv2d layer.*cannot be quantized by it"):
        quantize(_build("cnn"), "dynamic_int8", QuantizeContext(allow_fp32_layers=False))


def test_dynamic_int8_on_an_mlp_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(_build("mlp"), "dynamic_int8")


def test_qat_fine_tunes_a_fake_quantized_model() -> None:
    seen: list[set[str]] = []

    def finetune(model: nn.Module) -> None:
        assert model.training
        seen.append({type(m).__name__ for m in model.modules()})

    quantized = quantize(_build("cnn"), "qat_int8", QuantizeContext(calibration=_calibration(), finetune=finetune))
    assert len(seen) == 1
    assert {"FusedMovingAvgObsFakeQuantize", "ConvReLU2d", "LinearReLU"} <= seen[0]
    assert any(type(m).__module__.startswith("torch.ao.nn.intrinsic.quantized") for m in quantized.modules())


def test_weight_only_int8_keeps_int8_in_the_state_dict_only() -> None:
    quantized = quantize(_build("cnn"), "weight_only_int8")
    layers = [m for m in quantized.modules() if isinstance(m, Int8WeightLayer)]
    assert len(layers) == 4  # 2 Conv2d + 2 Linear
    state = quantized.state_dict()
    assert all(v.dtype == torch.int8 for k, v in state.items() if k.endswith("weight_int8"))
    assert not any(k.endswith(".weight") for k in state)  # no fp32 copy is saved
    assert not any(p.dim() > 1 for p in quantized.parameters())  # only biases remain parameters


def test_int8_per_channel_error_is_at_most_half_a_step() -> None:
    w = torch.randn(6, 3, 3, 3) * torch.arange(1, 7).view(6, 1, 1, 1)
    q, scale = int8_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (6,)
    assert ((q.float() * scale.view(6, 1, 1, 1) - w).abs() <= scale.view(6, 1, 1, 1) / 2 + 1e-6).all()


def test_half_precision_takes_and_returns_float32() -> None:
    for scheme, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        quantized = quantize(_build("mlp"), scheme)
        assert all(p.dtype == dtype for p in quantized.parameters())
        assert quantized(torch.randn(3, 1, 8, 8)).dtype == torch.float32


def test_int8_artifacts_are_at_most_027x_and_half_precision_about_half(tmp_path: Path) -> None:
    spec: dict[str, Any] = {
        "arch": "mlp",
        "params": {"width": 256, "depth": 2},
        "input_shape": [1, 28, 28],
        "num_classes": 10,
    }
    torch.manual_seed(0)
    model = build_model(spec["arch"], spec["params"], (1, 28, 28), 10).eval()
    calibration = [torch.randn(32, 1, 28, 28)]
    _, finetune = _finetune_calls()
    fp32 = artifact_size_bytes(save_model(model, {**spec, "quantization": "none"}, tmp_path / "none"))
    for scheme in ("dynamic_int8", "static_int8", "weight_only_int8", "qat_int8", "fp16", "bf16"):
        context = QuantizeContext(calibration=calibration, finetune=lambda m: None)
        size = artifact_size_bytes(
            save_model(quantize(model, scheme, context), {**spec, "quantization": scheme}, tmp_path / scheme)
        )
        limit = 0.27 if "int8" in scheme else 0.51
        assert size <= limit * fp32, (scheme, size / fp32)


def test_spec_records_backend_engine_and_versions(tmp_path: Path) -> None:
    save_model(
        quantize(_build("mlp"), "static_int8", _context()),
        {**ARCHS["mlp"], "quantization": "static_int8"},
        tmp_path / "a",
    )
    spec = json.loads((tmp_path / "a" / "spec.json").read_text())
    assert spec["backend"] == "torch.ao.quantization.eager[x86]"
    assert spec["versions"] == {"torch": torch.__version__, "quantized_engine": "x86"}
    backend = "torchao.Int8WeightOnlyConfig"
    model = quantize(_build("mlp"), "weight_only_int8", backend=backend)
    save_model(model, {**ARCHS["mlp"], "quantization": "weight_only_int8", "backend": backend}, tmp_path / "b")
    spec = json.loads((tmp_path / "b" / "spec.json").read_text())
    assert spec["backend"] == backend and spec["versions"]["torchao"].startswith("0.")


def test_backends_default_first_and_unknown_backend_is_an_error() -> None:
    assert set(SCHEMES) <= set(QUANTIZERS.names())
    for scheme in SCHEMES:
        names = backends(scheme)
        assert names[0] == QUANTIZERS.get(scheme).backend
        assert all(get_quantizer(scheme, b).name == scheme for b in names)
    assert backends("static_int8") == ["torch.ao.quantization.eager[x86]", "torch.ao.quantization.eager[onednn]"]
    with pytest.raises(QuantizationError, match="scheme 'fp16' has no backend 'onnx'; available: torch.cast"):
        get_quantizer("fp16", "onnx")


def test_quantizing_does_not_change_the_global_quantized_engine() -> None:
    before = torch.backends.quantized.engine
    quantize(_build("mlp"), "static_int8", _context(), backend="torch.ao.quantization.eager[onednn]")
    assert torch.backends.quantized.engine == before
