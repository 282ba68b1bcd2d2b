"""Text models: shapes at any sequence length, padding masked out, the registry, ONNX export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kd_lib.config import ConfigError
from kd_lib.models.builders import MODELS, build_model, text_params
from kd_lib.models.text import BertClassifier
from kd_lib.train.inference import compute_logits, trim_padding

VOCAB, PAD, MAX_LENGTH = 120, 0, 24
SMALL: dict[str, dict[str, Any]] = {
    "transformer": {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32},
    "bilstm": {"embedding": 8, "hidden": 8},
    "textcnn": {"embedding": 8, "channels": 8, "kernel_sizes": [3, 5]},
}


def _model(arch: str, **params: object) -> torch.nn.Module:
    torch.manual_seed(0)
    full = {"vocab_size": VOCAB, "pad_id": PAD, **SMALL[arch], **params}
    return build_model(arch, full, (MAX_LENGTH,), 3).eval()


def _ids(lengths: list[int], width: int = MAX_LENGTH) -> torch.Tensor:
    """Right-padded rows of random non-pad ids with the given lengths: ``[B, width]`` int64."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.full((len(lengths), width), PAD, dtype=torch.int64)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=gen)
    return ids


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_any_length_gives_logits_and_padding_changes_none(arch: str) -> None:
    model = _model(arch)
    ids = _ids([5, 9, 2])
    with torch.no_grad():
        short = model(ids[:, :9])  # trimmed to the longest row
        full = model(ids)  # padded to max_length
        alone = model(ids[2:, :2])  # one sample, no padding at all
    assert short.shape == (3, 3) and short.dtype == torch.float32
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone[0], full[2], atol=1e-5, rtol=1e-5)
    # A real token where padding was does change the logits: the mask is what made them equal.
    changed = ids.clone()
    changed[0, 5] = 7
    with torch.no_grad():
        moved = (model(changed)[0] - full[0]).abs().max().item()
    # Random BERT weights give logits of ~1e-2, so compare with the padding's effect rather than a fixed atol.
    assert moved > 100 * (short - full).abs().max().item() and moved > 0


def test_text_models_are_registered_and_take_data_params() -> None:
    assert {"transformer", "bilstm", "textcnn"} <= set(MODELS.names())
    assert text_params("textcnn", VOCAB, PAD) == {"vocab_size": VOCAB, "pad_id": PAD}
    # A builder of float features takes neither.
    assert text_params("mlp", VOCAB, PAD) == {}
    encoder = _model("transformer")
    assert isinstance(encoder, BertClassifier)
    assert encoder.bert.config.vocab_size == VOCAB and encoder.bert.config.max_position_embeddings == MAX_LENGTH
    # Feature layers are nameable by module path.
    names = dict(encoder.named_modules())
    assert "bert.bert.encoder.layer.0" in names and "convs.1" in dict(_model("textcnn").named_modules())


@pytest.mark.parametrize(
    ("arch", "params", "message"),
    [
        ("transformer", {"hidden": 15}, "multiple of heads"),
        ("transformer", {"pad_id": VOCAB}, "outside the vocabulary"),
        ("textcnn", {"kernel_sizes": [2]}, "odd widths"),
        ("bilstm", {"hidden": 0}, "hidden must be an integer >= 1"),
        ("bilstm", {"dropout": 1.0}, "dropout must be a number in"),
    ],
)
def test_bad_params_are_config_errors(arch: str, params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _model(arch, **params)


def test_float_input_shapes_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"token ids of shape \(max_length,\)"):
        build_model("textcnn", {"vocab_size": VOCAB, "pad_id": PAD}, (1, 8, 8), 3)


def test_trim_padding_and_batched_logits_match_untrimmed() -> None:
    ids = _ids([3, 1, 6, 2])
    assert trim_padding(ids, PAD).shape == (4, 6)
    assert trim_padding(_ids([0, 0]), PAD).shape == (2, 1)  # all padding: one column kept
    assert trim_padding(ids, None) is ids
    floats = torch.zeros(2, 5)
    assert trim_padding(floats, PAD) is floats  # not token ids
    model = _model("transformer")
    torch.testing.assert_close(
        compute_logits(model, ids, batch_size=2, pad_id=PAD), compute_logits(model, ids), atol=1e-5, rtol=1e-5
    )


def test_onnx_export_takes_int64_ids_of_any_length_and_dynamic_int8_matches(tmp_path: Path) -> None:
    from kd_lib.compress import onnx_runtime
    from kd_lib.compress.base import QuantizationError

    model = _model("transformer")
    spec = {
        "arch": "transformer",
        "params": {"vocab_size": VOCAB, "pad_id": PAD, **SMALL["transformer"]},
        "input_shape": [MAX_LENGTH],
        "num_classes": 3,
        "quantization": "none",
        "normalization": {},
        "text": {"pad_id": PAD, "max_length": MAX_LENGTH, "vocab_size": VOCAB},
    }
    ids = _ids([5, 12, 3, 24])
    with torch.no_grad():
        expected = model(ids)
    # One export, quantized once (each export takes seconds); the artifact path is the same functions.
    fp32 = onnx_runtime.export_fp32_onnx(model, [MAX_LENGTH], {}, tmp_path / "fp32.onnx", token_ids=True)
    int8 = onnx_runtime.quantize_onnx_file(fp32, tmp_path / "int8.onnx", "onnx_dynamic_int8", [])
    for path, tolerance in ((fp32, 1e-4), (int8, 0.05)):
        module = onnx_runtime.OrtModule.from_file(path)
        assert module.input_dtype == torch.int64 and module.input_shape == (None,)  # dynamic sequence axis
        with torch.no_grad():
            torch.testing.assert_close(module(ids), expected, atol=tolerance, rtol=0)
            torch.testing.assert_close(module(ids[:1, :5]), expected[:1], atol=tolerance, rtol=0)  # shorter, batch 1
    assert int8.stat().st_size < fp32.stat().st_size
    with pytest.raises(QuantizationError, match="not offered for text models"):
        onnx_runtime.build_onnx_artifact(model, "onnx_static_int8", spec, [ids], tmp_path / "static")


@pytest.mark.parametrize("arch", ["transformer", "textcnn"])
def test_dynamic_int8_stores_a_text_models_embedding_int8_and_agrees_with_fp32(arch: str, tmp_path: Path) -> None:
    # The embedding table (vocab x width) is most of a text model's weights: dynamic int8 must
    # quantize its Gather as well as the MatMuls, or the file barely shrinks (int8 is 1/4 of fp32).
    from kd_lib.compress import onnx_runtime

    vocab, width = 3000, 32
    params = {"embedding": width} if arch == "textcnn" else {"hidden": width}
    torch.manual_seed(0)
    model = build_model(arch, {**SMALL[arch], **params, "vocab_size": vocab, "pad_id": PAD}, (MAX_LENGTH,), 3).eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, vocab, (200, MAX_LENGTH), generator=gen)
    fp32 = onnx_runtime.export_fp32_onnx(model, [MAX_LENGTH], {}, tmp_path / "fp32.onnx", token_ids=True)
    int8 = onnx_runtime.quantize_onnx_file(fp32, tmp_path / "int8.onnx", "onnx_dynamic_int8", [])
    assert int8.stat().st_size <= 0.35 * fp32.stat().st_size
    with torch.no_grad():
        want, got = onnx_runtime.OrtModule.from_file(fp32)(ids), onnx_runtime.OrtModule.from_file(int8)(ids)
    assert (got.argmax(1) == want.argmax(1)).float().mean().item() >= 0.9
    assert (got - want).abs().max().item() < 0.1 * want.abs().max().item() + 1e-3
