from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kd_lib.artifacts import ArtifactError
from kd_lib.compress.quantization import QUANTIZERS, load_model, quantize, save_model
from kd_lib.evaluate.metrics import artifact_size_bytes
from kd_lib.models.builders import build_model
from kd_lib.plugins import UnknownNameError

SPEC: dict[str, Any] = {"arch": "mlp", "params": {"width": 128, "depth": 2}, "input_shape": [64], "num_classes": 10}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model(SPEC["arch"], SPEC["params"], tuple(SPEC["input_shape"]), SPEC["num_classes"])


def test_registered_schemes_follow_the_interface() -> None:
    assert {"none", "dynamic_int8"} <= set(QUANTIZERS.names())
    for name in QUANTIZERS.names():
        quantizer = QUANTIZERS.get(name)
        assert quantizer.name == name and isinstance(quantizer.backend, str)
    assert QUANTIZERS.get("dynamic_int8").backend == "torch.ao.quantization.quantize_dynamic"


@pytest.mark.parametrize("scheme", ["none", "dynamic_int8"])
def test_apply_returns_a_new_eval_module_and_leaves_the_input_alone(scheme: str) -> None:
    model = _mlp().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized = quantize(model, scheme)
    assert quantized is not model and not quantized.training
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert any(type(m) is nn.Linear for m in model.modules())  # still fp32
    x = torch.randn(16, 64)
    model.eval()
    with torch.no_grad():
        # int8 weights perturb the logits a little, never the shape; argmax mostly agrees.
        assert quantized(x).shape == (16, 10)
        agreement = (quantized(x).argmax(1) == model(x).argmax(1)).float().mean().item()
    assert agreement >= 0.8


def test_dynamic_int8_replaces_every_linear() -> None:
    quantized = quantize(_mlp(), "dynamic_int8")
    assert not any(type(m) is nn.Linear for m in quantized.modules())


def test_dynamic_int8_emits_no_deprecation_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(_mlp(), "dynamic_int8")


def test_dynamic_int8_refuses_a_model_without_linear_layers() -> None:
    conv_only = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(ValueError, match="'dynamic_int8' applies to nn.Linear layers only"):
        quantize(conv_only, "dynamic_int8")


def test_unknown_scheme() -> None:
    with pytest.raises(UnknownNameError, match="quantizer 'int3'.*dynamic_int8, fp16, none, qat_int8, static_int8"):
        quantize(_mlp(), "int3")


def test_int8_artifact_is_smaller_and_spec_records_backend(tmp_path: Path) -> None:
    model = _mlp()
    fp32_dir = save_model(quantize(model, "none"), {**SPEC, "quantization": "none"}, tmp_path / "fp32")
    int8_dir = save_model(quantize(model, "dynamic_int8"), {**SPEC, "quantization": "dynamic_int8"}, tmp_path / "int8")
    assert sorted(p.name for p in int8_dir.iterdir()) == ["spec.json", "weights.bin"]
    # Linear weights go from 4 bytes to 1: expect well over 2x even with the per-file overhead.
    assert artifact_size_bytes(fp32_dir) > 2.5 * artifact_size_bytes(int8_dir)
    spec = json.loads((int8_dir / "spec.json").read_text())
    assert spec["backend"] == "torch.ao.quantization.quantize_dynamic"
    assert spec["torch_version"] == torch.__version__
    assert json.loads((fp32_dir / "spec.json").read_text())["backend"] == "none"


def test_save_model_does_not_mutate_the_spec_and_checks_it(tmp_path: Path) -> None:
    spec = {**SPEC, "quantization": "none", "normalization": {"mean": 0.5}}
    frozen = json.dumps(spec, sort_keys=True)
    save_model(_mlp(), spec, tmp_path)
    assert json.dumps(spec, sort_keys=True) == frozen
    assert json.loads((tmp_path / "spec.json").read_text())["normalization"] == {"mean": 0.5}
    with pytest.raises(ValueError, match="missing quantization"):
        save_model(_mlp(), SPEC, tmp_path / "bad")


@pytest.mark.parametrize("scheme", ["none", "dynamic_int8"])
def test_round_trip_in_a_fresh_process_without_pickle(scheme: str, tmp_path: Path, repo_root: Path) -> None:
    quantized = quantize(_mlp(), scheme)
    save_model(quantized, {**SPEC, "quantization": scheme}, tmp_path / "model")
    x = torch.randn(32, 64)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = quantized(x)

    script = textwrap.dedent(
        """
        import sys, torch
        import kd_lib.evaluate.metrics, kd_lib.evaluate.gates, kd_lib.train.losses, kd_lib.train.loop
        from kd_lib.compress.quantization import load_model
        model, spec = load_model(sys.argv[1] + "/model")
        x = torch.load(sys.argv[1] + "/x.pt", weights_only=True)
        with torch.no_grad():
            torch.save(model(x), sys.argv[1] + "/out.pt")
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("kfp", "mlflow"))
        print("LEAKED", leaked, "TRAINING", model.training, "SCHEME", spec["quantization"])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert f"LEAKED [] TRAINING False SCHEME {scheme}" in proc.stdout
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(got, expected)
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_load_model_in_process_matches(tmp_path: Path) -> None:
    quantized = quantize(_mlp(), "dynamic_int8")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.ao deprecation noise stays inside kd_lib
        save_model(quantized, {**SPEC, "quantization": "dynamic_int8"}, tmp_path)
        loaded, spec = load_model(tmp_path)
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))
    assert spec["arch"] == "mlp" and spec["input_shape"] == [64]


def test_cnn_round_trip_quantizes_only_its_linear_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec: dict[str, Any] = {
        "arch": "cnn",
        "params": {"channels": 2, "depth": 2, "hidden": 8},
        "input_shape": [1, 8, 8],
        "num_classes": 3,
    }
    model = build_model(spec["arch"], spec["params"], (1, 8, 8), 3)
    quantized = quantize(model, "dynamic_int8")
    assert any(type(m) is nn.Conv2d for m in quantized.modules())
    save_model(quantized, {**spec, "quantization": "dynamic_int8"}, tmp_path)
    loaded, _ = load_model(tmp_path)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))


def test_missing_and_corrupt_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="spec.json: missing"):
        load_model(tmp_path)
    save_model(quantize(_mlp(), "dynamic_int8"), {**SPEC, "quantization": "dynamic_int8"}, tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"not a weights file")
    with pytest.raises(ArtifactError, match="weights.bin: corrupt weights file: not a kdflow weights file"):
        load_model(tmp_path)
    (tmp_path / "weights.bin").unlink()
    with pytest.raises(ArtifactError, match="weights.bin: missing"):
        load_model(tmp_path)
    (tmp_path / "spec.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="spec.json: unreadable or not JSON"):
        load_model(tmp_path)


def test_weights_that_do_not_fit_the_spec_are_rejected(tmp_path: Path) -> None:
    save_model(quantize(_mlp(), "dynamic_int8"), {**SPEC, "quantization": "dynamic_int8"}, tmp_path)
    spec = json.loads((tmp_path / "spec.json").read_text())
    spec["quantization"], spec["backend"] = "none", "none"  # fp32 structure cannot take int8 packed weights
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="does not match the architecture"):
        load_model(tmp_path)
    spec["backend"] = "torch.ao.quantization.quantize_dynamic"  # a backend of another scheme
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="scheme 'none' has no backend 'torch.ao.quantization.quantize_dynamic'"):
        load_model(tmp_path)


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    save_model(_mlp(), {**SPEC, "quantization": "none"}, tmp_path)
    (tmp_path / "weights.bin").unlink()  # an artifact of the older format: weights.pt only
    torch.save({"evil": object()}, tmp_path / "weights.pt")  # needs pickle to load
    with pytest.raises(ArtifactError, match="weights.pt: not a loadable weights-only"):
        load_model(tmp_path)


def test_artifacts_of_the_older_torch_save_format_still_load(tmp_path: Path) -> None:
    quantized = quantize(_mlp(), "dynamic_int8")
    save_model(quantized, {**SPEC, "quantization": "dynamic_int8"}, tmp_path)
    (tmp_path / "weights.bin").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.save of packed int8 weights warns (TypedStorage)
        torch.save(quantized.state_dict(), tmp_path / "weights.pt")  # what kdflow wrote before weights.bin
    loaded, _ = load_model(tmp_path)
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))
    # Saving again converts the directory: the stale weights.pt goes, so nothing is ambiguous.
    save_model(loaded, {**SPEC, "quantization": "dynamic_int8"}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.json", "weights.bin"]
    torch.save(quantized.state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ArtifactError, match="holds both weights.bin and weights.pt"):
        load_model(tmp_path)
