"""kdflow's pickle-free weights file: exact round trips, validation of hostile bytes, and the
size property the int8 target rests on (int8 artifacts at most 0.27x the fp32 ones)."""

from __future__ import annotations

import json
import pickle
import struct
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kd_lib.artifacts import ArtifactError, weights_file
from kd_lib.artifacts.weights_file import encode_state_dict, read_state_dict, write_state_dict
from kd_lib.compress.quantization import QuantizeContext, load_model, quantize, save_model
from kd_lib.evaluate.metrics import artifact_size_bytes
from kd_lib.models.builders import build_model

# torch 2.13 deprecates creating quantized tensors, which these tests do to have some.
pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")


def _same(a: Any, b: Any) -> bool:
    """Exact equality of state dict values: dtype, shape, bits, and quantization parameters."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_quantized:
            if a.qscheme() != b.qscheme() or not torch.equal(a.int_repr(), b.int_repr()):
                return False
            if a.qscheme() == torch.per_tensor_affine:
                return a.q_scale() == b.q_scale() and a.q_zero_point() == b.q_zero_point()
            return (
                a.q_per_channel_axis() == b.q_per_channel_axis()
                and torch.equal(a.q_per_channel_scales(), b.q_per_channel_scales())
                and torch.equal(a.q_per_channel_zero_points(), b.q_per_channel_zero_points())
            )
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def _every_kind() -> OrderedDict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 4, generator=gen)
    per_channel = torch.quantize_per_channel(
        w,
        torch.rand(4, generator=gen, dtype=torch.float64) + 0.01,  # float64 scales float32 cannot hold
        torch.tensor([3, 0, 250, 17]),  # quint8: different zero point per channel
        1,
        torch.quint8,
    )
    symmetric = torch.quantize_per_channel(
        w, torch.tensor([0.5, 0.25, 0.125, 0.0625, 1.0, 2.0]).double(), torch.zeros(6, dtype=torch.long), 0, torch.qint8
    )
    return OrderedDict(
        [
            ("f32", torch.randn(3, 5, generator=gen)),
            ("f32_scalar", torch.tensor(0.125)),
            ("f64", torch.tensor([1.0, 1e-300, 1 / 3], dtype=torch.float64)),
            ("f16", torch.randn(7, generator=gen).half()),
            ("bf16", torch.randn(2, 3, generator=gen).bfloat16()),
            ("i64_small", torch.tensor([0, -3, 100])),
            ("i64_big", torch.tensor([2**40, -1])),
            ("i32", torch.tensor([1, 2], dtype=torch.int32)),
            ("u8", torch.tensor([0, 255], dtype=torch.uint8)),
            ("bool", torch.tensor([True, False, True])),
            ("empty", torch.empty(0, 3)),
            ("non_contiguous", torch.arange(12.0).reshape(3, 4).t()),
            ("per_tensor", torch.quantize_per_tensor(w, 0.05, -3, torch.qint8)),
            ("per_tensor_u8", torch.quantize_per_tensor(w, 0.1, 128, torch.quint8)),
            ("per_tensor_i32", torch.quantize_per_tensor(w, 1e-4, 0, torch.qint32)),
            ("per_channel", per_channel),
            ("per_channel_symmetric", symmetric),
            ("packed", (torch.quantize_per_tensor(w, 0.05, 0, torch.qint8), None)),
            ("packed_list", [torch.ones(2), 3]),
            ("dtype", torch.qint8),
            ("scalars", (1, 2.5, True, "x", None)),
        ]
    )


def test_every_kind_of_entry_round_trips_exactly(tmp_path: Path) -> None:
    state = _every_kind()
    state._metadata = OrderedDict([("", {"version": 1}), ("lin", {"version": 3})])  # type: ignore[attr-defined]
    size = write_state_dict(state, tmp_path / "w.bin")
    assert size == (tmp_path / "w.bin").stat().st_size
    got = read_state_dict(tmp_path / "w.bin", template=state)
    assert list(got) == list(state)
    for key in state:
        assert _same(state[key], got[key]), key
    assert got._metadata == state._metadata  # type: ignore[attr-defined]


def test_scales_and_zero_points_are_stored_narrow_when_exact() -> None:
    w = torch.randn(64, 32)
    scales = (w.abs().amax(dim=1) / 127).float().double()  # float32 values, as observers make them
    q = torch.quantize_per_channel(w, scales, torch.zeros(64, dtype=torch.long), 0, torch.qint8)
    blob = encode_state_dict({"w": q})
    # 64*32 int8 + 64 float32 scales + prefix and header; the zero points (all 0) are in the header.
    assert len(blob) < 64 * 32 + 64 * 4 + 128  # stored as float64 + int64 they would add 1 kB
    assert _same(weights_file._decode(blob)["w"], q)


def test_a_model_loads_with_no_pickle_and_no_torch_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec: dict[str, Any] = {
        "arch": "cnn",
        "params": {"channels": 4, "depth": 2, "hidden": 16},
        "input_shape": [1, 8, 8],
        "num_classes": 3,
        "quantization": "static_int8",
    }
    torch.manual_seed(0)
    fp32 = build_model("cnn", spec["params"], (1, 8, 8), 3)
    quantized = quantize(fp32, "static_int8", QuantizeContext(calibration=[torch.randn(16, 1, 8, 8)]))
    save_model(quantized, spec, tmp_path)

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the loader unpickled something")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    loaded, _ = load_model(tmp_path)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), quantized(x))


# --------------------------------------------------------------------------------------------
# corrupt and hostile files


def _small_file(tmp_path: Path) -> tuple[Path, bytes]:
    state = {
        "w": torch.quantize_per_channel(
            torch.randn(3, 2), torch.ones(3).double(), torch.zeros(3).long(), 0, torch.qint8
        ),
        "b": torch.randn(3),
    }
    path = tmp_path / "weights.bin"
    write_state_dict(state, path)
    return path, path.read_bytes()


def test_every_truncation_and_every_flipped_byte_is_an_artifact_error_naming_the_file(tmp_path: Path) -> None:
    path, blob = _small_file(tmp_path)
    for cut in range(len(blob)):
        path.write_bytes(blob[:cut])
        with pytest.raises(ArtifactError, match=r"weights\.bin: corrupt weights file"):
            read_state_dict(path)
    for i in range(len(blob)):
        flipped = bytearray(blob)
        flipped[i] ^= 0x20
        path.write_bytes(bytes(flipped))
        with pytest.raises(ArtifactError, match=r"weights\.bin: corrupt weights file"):
            read_state_dict(path)
    path.write_bytes(blob + b"\0")
    with pytest.raises(ArtifactError, match="CRC-32 mismatch"):
        read_state_dict(path)


def _forge(header: Any, data: bytes = b"", raw_header: bytes | None = None) -> bytes:
    """A file with a valid magic and CRC around whatever header: what the validation must catch."""
    stored = zlib.compress(raw_header if raw_header is not None else json.dumps(header).encode())
    return struct.pack("<8sII", weights_file.MAGIC, len(stored), zlib.crc32(stored + data)) + stored + data


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"state": [["w", {"t": "f32", "s": [4]}]]}, b"\0" * 8, "needs 16 bytes at data offset 0, only 8 left"),
        ({"state": [["w", {"t": "f32", "s": [2]}]]}, b"\0" * 9, "1 bytes of data after the last tensor"),
        ({"state": [["w", {"t": "f32", "s": [2**40, 2**40]}]]}, b"", "needs"),
        ({"state": [["w", {"t": "f128", "s": [1]}]]}, b"\0" * 16, "expected a tensor node"),
        ({"state": [["w", {"t": "f32", "s": [-1]}]]}, b"", "bad shape"),
        ({"state": [["w", {"t": "f32", "s": [1.5]}]]}, b"", "bad shape"),
        ({"state": [["w", {"t": "f32", "s": [1] * 17}]]}, b"\0" * 4, "bad shape"),
        ({"state": [["w", {"t": "i64", "s": [1], "as": "f32"}]]}, b"\0" * 4, None),  # harmless: a 0
        ({"state": [["w", {"t": "i64", "s": [1], "as": "obj"}]]}, b"\0" * 4, "unknown storage dtype"),
        (
            {"state": [["w", {"q": "qint8", "s": [2, 2], "axis": 2, "scales": "f32", "zps": 0}]]},
            b"\0" * 12,
            "axis 2 out of range",
        ),
        (
            {"state": [["w", {"q": "qint8", "s": [2], "axis": 0, "scales": "i8", "zps": 0}]]},
            b"\0" * 4,
            "scales stored as 'i8'",
        ),
        (
            {"state": [["w", {"q": "qint8", "s": [2], "axis": 0, "scales": "f32", "zps": "f32"}]]},
            b"\0" * 12,
            "zero points .f32. are not",
        ),
        ({"state": [["w", {"q": "qint4", "s": [2]}]]}, b"\0" * 2, "unknown quantized dtype"),
        ({"state": [["w", {"q": "qint8", "s": [2], "scale": "x", "zp": 0}]]}, b"\0" * 2, "scale/zero point"),
        ({"state": [["w", {"t": "bool", "s": [2]}]]}, b"\x01\x07", "bytes other than 0 and 1"),
        ({"state": [["w", {"dtype": "object"}]]}, b"", "unknown dtype 'object'"),
        ({"state": [["w", {"sub": "os.system", "s": [1], "inner": []}]]}, b"", "holds a os.system"),
        ({"state": [["w", {"pickle": "cos\nsystem"}]]}, b"", "unknown node"),
        ({"state": [["w", 1], ["w", 2]]}, b"", "appears twice"),
        ({"state": [["w"]]}, b"", "not a \\[key, node\\] pair"),
        ({"state": {"w": 1}}, b"", "'state' list"),
        ({"state": [], "versions": {"lin": "3"}}, b"", "'versions' must map"),
        ([1, 2], b"", "'state' list"),
    ],
)
def test_malformed_headers_are_refused(tmp_path: Path, header: Any, data: bytes, message: str | None) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(_forge(header, data))
    if message is None:
        read_state_dict(path)
        return
    with pytest.raises(ArtifactError, match=rf"weights\.bin: corrupt weights file: .*{message}"):
        read_state_dict(path)


def test_headers_that_are_not_json_or_too_large_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "weights.bin"
    for raw, message in ((b"{", "header is not JSON"), (b'{"state": [NaN]}', "NaN"), (b"\xff\xfe", "not JSON")):
        path.write_bytes(_forge(None, raw_header=raw))
        with pytest.raises(ArtifactError, match=message):
            read_state_dict(path)
    monkeypatch.setattr(weights_file, "_MAX_HEADER_BYTES", 1000)
    path.write_bytes(_forge(None, raw_header=b" " * 5000 + b'{"state": []}'))  # deflates to a few bytes
    with pytest.raises(ArtifactError, match="decompresses beyond 1000 bytes"):
        read_state_dict(path)
    stored = b"not zlib"
    path.write_bytes(struct.pack("<8sII", weights_file.MAGIC, len(stored), zlib.crc32(stored)) + stored)
    with pytest.raises(ArtifactError, match="header is not zlib data"):
        read_state_dict(path)


def test_writing_refuses_what_it_cannot_store_exactly() -> None:
    with pytest.raises(ValueError, match="entry 'head.extra': cannot store a object without pickle"):
        encode_state_dict({"head.extra": object()})
    with pytest.raises(ValueError, match="cannot store a torch.complex64 tensor"):
        encode_state_dict({"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(ValueError, match="cannot store"):
        encode_state_dict({"nan": float("nan")})


# --------------------------------------------------------------------------------------------
# the size property: int8 artifacts at most 0.27x the fp32 artifact (spec.json included)

MNIST: dict[str, Any] = {"input_shape": [1, 28, 28], "num_classes": 10}
STUDENTS: dict[str, dict[str, Any]] = {
    # The students of bench/quantization.py: a CNN whose Conv weights are a small share, and an MLP.
    "cnn": {"arch": "cnn", "params": {"channels": 8, "depth": 2, "hidden": 32}, **MNIST},
    "cnn_hidden64": {"arch": "cnn", "params": {"channels": 16, "depth": 2, "hidden": 64}, **MNIST},
    "mlp": {"arch": "mlp", "params": {"width": 128, "depth": 1}, **MNIST},
}
INT8 = [
    (model, scheme)
    for model in STUDENTS
    for scheme in ("static_int8", "qat_int8", "weight_only_int8", "dynamic_int8")
    # dynamic_int8 does not quantize Conv layers (they stay fp32 by design, 0.29x on the CNN):
    # not a property of the file format, so only the MLP is held to the target with it.
    if not (scheme == "dynamic_int8" and model.startswith("cnn"))
]


@pytest.fixture(scope="module")
def fp32_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nn.Module, Path]]:
    out = {}
    for name, spec in STUDENTS.items():
        torch.manual_seed(0)
        model = build_model(spec["arch"], spec["params"], tuple(spec["input_shape"]), spec["num_classes"]).eval()
        out[name] = (model, save_model(model, {**spec, "quantization": "none"}, tmp_path_factory.mktemp(name)))
    return out


def test_fp32_artifacts_carry_almost_nothing_but_the_weights(fp32_dirs: dict[str, tuple[nn.Module, Path]]) -> None:
    for model, directory in fp32_dirs.values():
        raw = sum(p.numel() * p.element_size() for p in model.state_dict().values())
        # The whole header (deflated JSON) plus the 16-byte prefix: a few hundred bytes.
        assert raw < (directory / "weights.bin").stat().st_size < raw + 400


@pytest.mark.parametrize(("name", "scheme"), INT8)
def test_int8_artifacts_are_at_most_027x_the_fp32_artifact(
    fp32_dirs: dict[str, tuple[nn.Module, Path]], tmp_path: Path, name: str, scheme: str
) -> None:
    fp32, fp32_dir = fp32_dirs[name]
    gen = torch.Generator().manual_seed(1)
    context = QuantizeContext(
        calibration=[torch.rand(32, 1, 28, 28, generator=gen) for _ in range(2)], finetune=lambda prepared: None
    )  # QAT's training does not change sizes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = quantize(fp32, scheme, context)
    int8_dir = save_model(quantized, {**STUDENTS[name], "quantization": scheme}, tmp_path)
    ratio = artifact_size_bytes(int8_dir) / artifact_size_bytes(fp32_dir)
    assert ratio <= 0.27, f"{name} {scheme}: {artifact_size_bytes(int8_dir)} / {artifact_size_bytes(fp32_dir)} bytes"
