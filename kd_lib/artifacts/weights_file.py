"""A compact, pickle-free file for a module's state dict, quantized tensors included.

Why not ``torch.save``: its zip container spends a record (name, headers, 64-byte alignment)
and a pickled rebuild call per tensor, and a quantized tensor pickles its whole structure.
On a small CNN student that overhead alone pushed int8 artifacts from 0.25x to 0.33x the
fp32 bytes. Why not safetensors: it stores plain tensors only, so quantized tensors, packed
``(weight, bias)`` tuples and dtypes (what ``torch.ao`` state dicts hold) would need a second
layer of conventions on top anyway. This format is that layer and nothing more.

Layout (all integers little-endian)::

    offset 0   8 bytes   MAGIC  b"KDFLOWW1"  (the trailing "1" is the format version)
    offset 8   4 bytes   uint32 H, length of the stored header
    offset 12  4 bytes   uint32 CRC-32 of stored header + data
    offset 16  H bytes   header: compact UTF-8 JSON, zlib-compressed
    then       the data: raw tensor bytes, back to back, no padding

The header is compressed because it is the per-tensor cost that remains: its keys repeat
module prefixes, and on a 27k-parameter int8 CNN the plain JSON (1.1 kB) was 4% of the
artifact. Deflate brings it to about 0.3 kB. The tensor data is not compressed: int8 and
float weights barely shrink, and sizes should say what the weights cost.

The header is ``{"state": [[key, node], ...], "versions": {module_prefix: int}}``.
``versions`` is the state dict's ``_metadata``: each module's ``_version``, which quantized
modules read when loading. Only versions other than 1 (nn.Module's default) are written; the
loader gives every other module of the model it built version 1, which is what it was.
A node is one of:

- a tensor ``{"t": "f32", "s": [16, 8, 3, 3]}`` (``"s"`` omitted when 0-d); with ``"as": "i8"``
  when an int64 or float64 tensor is stored in a narrower dtype that holds it exactly;
- a quantized tensor ``{"q": "qint8", "s": shape, ...}``: its ``int_repr()`` bytes, plus
  ``"scale"`` and ``"zp"`` (JSON numbers) when per-tensor affine; when per-channel affine,
  ``"axis"``, ``"scales"`` (the storage dtype of the ``shape[axis]`` float64 scales: "f32"
  when exact, else "f64") and ``"zps"`` (the zero point as a number when every channel has
  the same one, as symmetric int8 always does; else the storage dtype of the int64 array);
- a tensor subclass (torchao) ``{"sub": "module.Class", "s": shape, "inner": [[name, node], ...]}``:
  only its inner tensors are stored; the rest of its structure comes from the module the
  loader built, never from the file;
- ``{"dtype": "qint8"}`` (a ``torch.dtype`` value), ``{"tuple": [nodes]}``, ``{"list": [nodes]}``,
  or a JSON null/bool/number/string.

Each tensor's bytes follow in the order its node appears in the header (depth-first; for a
quantized tensor: the integers, then the scales, then the zero points), so offsets are implicit and
the reader checks that the data is consumed exactly. Reading builds tensors from bytes with
``torch.frombuffer`` and never runs code from the file. Tensors that share storage (tied
weights) are written once per key and come back as separate, equal tensors.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from kd_lib.artifacts.errors import ArtifactError

MAGIC = b"KDFLOWW1"
_PREFIX = struct.Struct("<8sII")  # magic, header length, CRC-32

# Short codes keep the header small (it is part of the artifact's bytes, per tensor).
_DTYPES: dict[str, torch.dtype] = {
    "f64": torch.float64,
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "i64": torch.int64,
    "i32": torch.int32,
    "i16": torch.int16,
    "i8": torch.int8,
    "u8": torch.uint8,
    "bool": torch.bool,
}
_CODES = {dtype: code for code, dtype in _DTYPES.items()}
# Quantized dtype -> the integer dtype of its int_repr().
_QDTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "qint8": (torch.qint8, torch.int8),
    "quint8": (torch.quint8, torch.uint8),
    "qint32": (torch.qint32, torch.int32),
}
# torch.dtype values a state dict may hold (LinearPackedParams keeps its dtype there).
_DTYPE_VALUES: dict[str, torch.dtype] = {
    **{name: q for name, (q, _) in _QDTYPES.items()},
    **{str(d).removeprefix("torch."): d for d in _DTYPES.values()},
}
_MAX_DIMS = 16
# A header decompressing beyond this is refused (a deflate bomb, not a model): at about 50
# bytes of JSON per tensor it allows a million tensors.
_MAX_HEADER_BYTES = 64 * 2**20


# --------------------------------------------------------------------------------------------
# writing


def _narrowest(t: Tensor) -> Tensor:
    """``t`` in the smallest dtype that holds its values exactly (int64 and float64 only).

    Scales and zero points are float64/int64 in torch's quantized tensors and in
    ``torch.ao`` state dicts although they hold float32 values and small integers; storing
    them narrow saves 4-7 bytes per channel, which on a small CNN is a point of ratio.
    """
    if t.numel() == 0:
        return t
    if t.dtype == torch.float64:
        narrow = t.float()
        return narrow if torch.equal(narrow.double(), t) else t
    if t.dtype == torch.int64:
        low, high = int(t.min()), int(t.max())
        for dtype in (torch.int8, torch.int16, torch.int32):
            info = torch.iinfo(dtype)
            if info.min <= low and high <= info.max:
                return t.to(dtype)
    return t


class _Writer:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def _raw(self, t: Tensor) -> dict[str, Any]:
        if t.dtype not in _CODES:
            raise ValueError(f"cannot store a {t.dtype} tensor; supported dtypes: {', '.join(map(str, _CODES))}")
        stored = _narrowest(t)
        # reshape(-1) first: view(uint8) needs at least one dimension.
        self.chunks.append(stored.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        node: dict[str, Any] = {"t": _CODES[t.dtype]}
        if t.dim():
            node["s"] = list(t.shape)
        if stored.dtype != t.dtype:
            node["as"] = _CODES[stored.dtype]
        return node

    def _quantized(self, t: Tensor) -> dict[str, Any]:
        name = str(t.dtype).removeprefix("torch.")
        if name not in _QDTYPES:
            raise ValueError(f"cannot store a {t.dtype} quantized tensor; supported: {', '.join(_QDTYPES)}")
        node: dict[str, Any] = {"q": name, "s": list(t.shape)}
        qscheme = t.qscheme()
        if qscheme == torch.per_tensor_affine:
            node |= {"scale": float(t.q_scale()), "zp": int(t.q_zero_point())}
            self._raw(t.int_repr())
        elif qscheme == torch.per_channel_affine:
            node["axis"] = int(t.q_per_channel_axis())
            self._raw(t.int_repr())  # integers, scales, zero points: the order the reader expects
            scales = self._raw(t.q_per_channel_scales())
            node["scales"] = scales.get("as", scales["t"])
            zps = t.q_per_channel_zero_points()
            if len(zps) and bool((zps == zps[0]).all()):
                node["zps"] = int(zps[0])
            else:
                stored = self._raw(zps)
                node["zps"] = stored.get("as", stored["t"])
        else:
            # per_channel_affine_float_qparams (quantized embeddings) has no exact rebuild here.
            raise ValueError(f"cannot store a quantized tensor with qscheme {qscheme}")
        return node

    def node(self, value: Any, key: str) -> Any:
        if isinstance(value, Tensor):
            if value.is_quantized:
                return self._quantized(value)
            if type(value) not in (Tensor, torch.nn.Parameter) and hasattr(value, "__tensor_flatten__"):
                names, _ctx = value.__tensor_flatten__()  # ctx is rebuilt from the loader's model
                cls = type(value)
                inner = []
                for name in names:
                    t = getattr(value, name)
                    if type(t) is not Tensor or t.is_quantized:
                        raise ValueError(
                            f"state dict entry {key!r}: {cls.__name__}.{name} is not a plain tensor; "
                            "nested tensor subclasses cannot be stored"
                        )
                    inner.append([name, self._raw(t)])
                return {"sub": f"{cls.__module__}.{cls.__qualname__}", "s": list(value.shape), "inner": inner}
            return self._raw(value)
        if isinstance(value, torch.dtype):
            return {"dtype": str(value).removeprefix("torch.")}
        if isinstance(value, tuple):  # LinearPackedParams keeps (weight, bias) as a tuple
            return {"tuple": [self.node(v, key) for v in value]}
        if isinstance(value, list):
            return {"list": [self.node(v, key) for v in value]}
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise ValueError(f"state dict entry {key!r}: cannot store a {type(value).__name__} without pickle")


def encode_state_dict(state: Mapping[str, Any]) -> bytes:
    """Serialize a state dict to the bytes of a kdflow weights file (see the module docstring).

    Args:
        state: ``module.state_dict()``: tensors (plain, quantized per-tensor or per-channel
            affine, torchao subclasses), dtypes, tuples/lists of those and JSON scalars; its
            ``_metadata`` (module versions) is kept.

    Returns:
        The file's bytes.

    Raises:
        ValueError: an entry cannot be stored exactly (unsupported dtype or qscheme, an
            arbitrary object), naming the key.
    """
    if sys.byteorder != "little":  # raw bytes are written in the machine's order
        raise ValueError("kdflow weights files are little-endian; this machine is big-endian")
    writer = _Writer()
    entries = [[str(k), writer.node(v, str(k))] for k, v in state.items()]
    metadata = getattr(state, "_metadata", None) or {}
    versions = {
        prefix: meta["version"]
        for prefix, meta in metadata.items()
        if isinstance(meta.get("version"), int) and meta["version"] != 1
    }
    header_json = json.dumps({"state": entries, "versions": versions}, separators=(",", ":"), allow_nan=False)
    header = zlib.compress(header_json.encode(), 9)
    data = b"".join(writer.chunks)
    return _PREFIX.pack(MAGIC, len(header), zlib.crc32(header + data)) + header + data


def write_state_dict(state: Mapping[str, Any], path: str | Path) -> int:
    """Write ``state`` to ``path`` as a kdflow weights file; returns the bytes written.

    See ``encode_state_dict`` for what ``state`` may hold and what is raised.
    """
    blob = encode_state_dict(state)
    Path(path).write_bytes(blob)
    return len(blob)


# --------------------------------------------------------------------------------------------
# reading


class _Corrupt(Exception):
    """Internal: what is wrong with the file; read_state_dict adds the file name."""


def _reject_constant(name: str) -> float:
    raise _Corrupt(f"header holds {name}, which no weight file written by kdflow does")


class _Reader:
    def __init__(self, data: memoryview, template: Mapping[str, Any] | None) -> None:
        self.data = data
        self.cursor = 0
        self.template = template

    def _shape(self, node: Mapping[str, Any], key: str) -> list[int]:
        shape = node.get("s", [])
        if not isinstance(shape, list) or len(shape) > _MAX_DIMS or not all(type(d) is int and d >= 0 for d in shape):
            raise _Corrupt(f"entry {key!r}: bad shape {shape!r}")
        return shape

    def _take(self, dtype: torch.dtype, shape: list[int], key: str) -> Tensor:
        count = math.prod(shape)
        size = count * dtype.itemsize
        if size > len(self.data) - self.cursor:
            raise _Corrupt(
                f"entry {key!r} needs {size} bytes at data offset {self.cursor}, only "
                f"{len(self.data) - self.cursor} left (truncated file?)"
            )
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        # bytearray: a private, writable copy the tensor owns (frombuffer shares its memory).
        chunk = bytearray(self.data[self.cursor : self.cursor + size])
        self.cursor += size
        if dtype == torch.bool:
            # A bool tensor holding bytes other than 0/1 is undefined behaviour in torch's kernels.
            as_bytes = torch.frombuffer(chunk, dtype=torch.uint8)
            if int(as_bytes.max()) > 1:
                raise _Corrupt(f"entry {key!r}: bool tensor holds bytes other than 0 and 1")
            return as_bytes.view(torch.bool).reshape(shape)
        return torch.frombuffer(chunk, dtype=dtype).reshape(shape)

    def _raw(self, node: Any, key: str) -> Tensor:
        if not isinstance(node, dict) or node.get("t") not in _DTYPES:
            raise _Corrupt(f"entry {key!r}: expected a tensor node, got {str(node)[:80]}")
        stored_code = node.get("as", node["t"])
        if stored_code not in _DTYPES:
            raise _Corrupt(f"entry {key!r}: unknown storage dtype {stored_code!r}")
        tensor = self._take(_DTYPES[stored_code], self._shape(node, key), key)
        return tensor.to(_DTYPES[node["t"]])

    def _quantized(self, node: dict[str, Any], key: str) -> Tensor:
        if node["q"] not in _QDTYPES:
            raise _Corrupt(f"entry {key!r}: unknown quantized dtype {node['q']!r}")
        shape = self._shape(node, key)
        ints = self._take(_QDTYPES[node["q"]][1], shape, key)
        if "axis" in node:
            axis = node["axis"]
            if type(axis) is not int or not 0 <= axis < len(shape):
                raise _Corrupt(f"entry {key!r}: axis {axis!r} out of range for shape {shape}")
            channels = [shape[axis]]
            scales_code, zps_code = node.get("scales"), node.get("zps")
            if scales_code not in ("f32", "f64"):
                raise _Corrupt(f"entry {key!r}: per-channel scales stored as {scales_code!r}, expected 'f32' or 'f64'")
            scales = self._take(_DTYPES[scales_code], channels, key + " scales").double()
            if type(zps_code) is int:
                zps = torch.full(channels, zps_code, dtype=torch.int64)
            elif zps_code in ("i8", "i16", "i32", "i64"):
                zps = self._take(_DTYPES[zps_code], channels, key + " zero points").long()
            else:
                raise _Corrupt(f"entry {key!r}: per-channel zero points {zps_code!r} are not a number or int dtype")
            return torch._make_per_channel_quantized_tensor(ints, scales, zps, axis)
        scale, zp = node.get("scale"), node.get("zp")
        if type(scale) not in (int, float) or type(zp) is not int:
            raise _Corrupt(f"entry {key!r}: per-tensor scale/zero point missing or not numbers")
        return torch._make_per_tensor_quantized_tensor(ints, float(cast(float, scale)), zp)

    def _subclass(self, node: dict[str, Any], key: str) -> Tensor:
        # The file names the class only to be checked: the class and its non-tensor
        # attributes (block sizes, granularity objects) come from the model the loader built.
        example = (self.template or {}).get(key)
        cls = type(example)
        if not isinstance(example, Tensor) or f"{cls.__module__}.{cls.__qualname__}" != node["sub"]:
            raise _Corrupt(
                f"entry {key!r} holds a {node['sub']} but the model built from the spec has "
                f"{cls.__module__}.{cls.__qualname__} there"
            )
        names, ctx = example.__tensor_flatten__()  # type: ignore[attr-defined]  # the subclass protocol
        inner_nodes = node.get("inner")
        if not isinstance(inner_nodes, list) or [pair[0] for pair in inner_nodes if isinstance(pair, list)] != names:
            raise _Corrupt(f"entry {key!r}: inner tensors do not match {names}")
        inner = {name: self._raw(sub, f"{key}.{name}") for name, sub in inner_nodes}
        shape = self._shape(node, key)
        stride = torch.empty(shape, device="meta").stride()
        return cls.__tensor_unflatten__(inner, ctx, torch.Size(shape), stride)  # type: ignore[union-attr]

    def node(self, node: Any, key: str) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if not isinstance(node, dict):
            raise _Corrupt(f"entry {key!r}: unexpected {type(node).__name__} node")
        if "t" in node:
            return self._raw(node, key)
        if "q" in node:
            return self._quantized(node, key)
        if "sub" in node:
            return self._subclass(node, key)
        if "dtype" in node:
            if node["dtype"] not in _DTYPE_VALUES:
                raise _Corrupt(f"entry {key!r}: unknown dtype {node['dtype']!r}")
            return _DTYPE_VALUES[node["dtype"]]
        for kind, make in (("tuple", tuple), ("list", list)):
            if kind in node and isinstance(node[kind], list):
                return make(self.node(item, key) for item in node[kind])
        raise _Corrupt(f"entry {key!r}: unknown node {str(node)[:80]}")


def _decode(blob: bytes, template: Mapping[str, Any] | None = None) -> OrderedDict[str, Any]:
    """Parse the bytes of a kdflow weights file; validates everything, runs nothing from it.

    Args:
        blob: The file's bytes.
        template: The state dict of the module the weights are for; needed only for tensor
            subclass entries (torchao), whose class and attributes are taken from it.

    Returns:
        The state dict, with ``_metadata`` (module versions) attached as ``state_dict()``
        returns it, ready for ``load_state_dict``.

    Raises:
        _Corrupt: bad magic, CRC mismatch, truncated or trailing data, malformed header;
            ``read_state_dict`` turns it into ArtifactError naming the file.
    """
    if len(blob) < _PREFIX.size:
        raise _Corrupt(f"{len(blob)} bytes, shorter than the {_PREFIX.size}-byte prefix (truncated file?)")
    magic, header_len, crc = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise _Corrupt(f"not a kdflow weights file (starts with {magic!r}, expected {MAGIC!r})")
    if header_len > len(blob) - _PREFIX.size:
        raise _Corrupt(f"header length {header_len} exceeds the file (truncated file?)")
    body = memoryview(blob)[_PREFIX.size :]
    if zlib.crc32(body) != crc:
        raise _Corrupt("CRC-32 mismatch: the file was truncated or altered after it was written")
    inflate = zlib.decompressobj()
    try:
        header_json = inflate.decompress(body[:header_len], _MAX_HEADER_BYTES)
    except zlib.error as err:
        raise _Corrupt(f"header is not zlib data ({err})") from None
    if inflate.unconsumed_tail or not inflate.eof:
        raise _Corrupt(f"header is incomplete or decompresses beyond {_MAX_HEADER_BYTES} bytes")
    try:
        header = json.loads(header_json.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise _Corrupt(f"header is not JSON ({err})") from None
    if not isinstance(header, dict) or not isinstance(header.get("state"), list):
        raise _Corrupt("header must be an object with a 'state' list")
    versions = header.get("versions", {})
    if not isinstance(versions, dict) or not all(type(v) is int for v in versions.values()):
        raise _Corrupt("header 'versions' must map module prefixes to integers")

    reader = _Reader(body[header_len:], template)
    state: OrderedDict[str, Any] = OrderedDict()
    for pair in header["state"]:
        if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
            raise _Corrupt(f"state entry {str(pair)[:80]} is not a [key, node] pair")
        key, node = pair
        if key in state:
            raise _Corrupt(f"entry {key!r} appears twice")
        try:
            state[key] = reader.node(node, key)
        except (RuntimeError, ValueError, TypeError) as err:  # torch refusing a rebuilt tensor
            raise _Corrupt(f"entry {key!r}: {str(err).splitlines()[0]}") from None
    if reader.cursor != len(reader.data):
        raise _Corrupt(f"{len(reader.data) - reader.cursor} bytes of data after the last tensor")
    # Every module of the model the loader built is at version 1 unless the file says otherwise
    # (the writer leaves 1s out); without a template, only the recorded versions are known.
    prefixes = list(getattr(template, "_metadata", None) or {})
    prefixes += [p for p in versions if p not in prefixes]
    state._metadata = OrderedDict((p, {"version": versions.get(p, 1)}) for p in prefixes)  # type: ignore[attr-defined]
    return state


def read_state_dict(path: str | Path, template: Mapping[str, Any] | None = None) -> OrderedDict[str, Any]:
    """Read a kdflow weights file written by ``write_state_dict``.

    Args:
        path: The file.
        template: See ``_decode``.

    Returns:
        The state dict (tensors on CPU) with its ``_metadata``.

    Raises:
        ArtifactError: the file is missing, unreadable, truncated, altered or malformed;
            the message names it.
    """
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as err:
        raise ArtifactError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        return _decode(blob, template)
    except _Corrupt as err:
        raise ArtifactError(f"{path}: corrupt weights file: {err}. Re-run the step that wrote it.") from None
