"""Post-training quantization schemes behind one interface, and pickle-free save/load.

A scheme is an object with ``name``, ``backend`` (the implementation used, recorded with the
artifact), ``apply(model)`` and ``prepare_for_load(model)``. Schemes are registered in
``QUANTIZERS`` so a config names one (``quantize.scheme: dynamic_int8``) and a new backend
(torchao, PT2E, ...) is one more registered class, chosen by measurement.

A saved model is a directory with ``weights.pt`` (``torch.save(state_dict)``, loaded with
``weights_only=True``) and ``spec.json`` (architecture, params, input shape, classes,
quantization scheme). Loading rebuilds the fp32 architecture from the spec, converts it to
the quantized structure with ``prepare_for_load``, then loads the weights: no pickled code.
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from pathlib import Path
from typing import Any, Iterator, Protocol

import torch
from torch import nn

from kd_lib.models import build_model
from kd_lib.registry import Registry

WEIGHTS_FILE = "weights.pt"
SPEC_FILE = "spec.json"
REQUIRED_SPEC_KEYS = ("arch", "params", "input_shape", "num_classes", "quantization")


class ArtifactError(ValueError):
    """A saved model directory is missing a file, or a file is corrupt or does not match its spec."""


class Quantizer(Protocol):
    """The interface every quantization scheme implements."""

    name: str
    backend: str

    def apply(self, model: nn.Module) -> nn.Module:
        """Return a NEW quantized module in eval mode on CPU; ``model`` is left untouched."""
        ...

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        """Turn a freshly built fp32 architecture into the structure ``apply`` produces,
        so that ``load_state_dict`` of a saved quantized state dict fits it exactly."""
        ...


QUANTIZERS: Registry[Quantizer] = Registry("quantizer")


@contextlib.contextmanager
def _quiet_torch_ao() -> Iterator[None]:
    # torch.ao.quantization is deprecated in torch 2.13 (its successor is torchao) and warns on
    # every call. We chose it by measurement (see DESIGN.md), so silence only those warnings,
    # only here, and leave every other warning visible.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.ao\.quantization is deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated", category=UserWarning)
        # Serializing the packed int8 weights goes through TypedStorage, which also warns.
        warnings.filterwarnings("ignore", message=r"TypedStorage is deprecated", category=UserWarning)
        yield


class NoQuantization:
    """Keeps the model in fp32: the baseline every other scheme is measured against."""

    name = "none"
    backend = "none"

    def apply(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).cpu().eval()

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        return model.cpu().eval()


class DynamicInt8:
    """Dynamic int8 quantization of ``nn.Linear`` layers with ``torch.ao``.

    Weights are stored as int8 (about 4x smaller); activations are quantized on the fly per
    batch, so no calibration data is needed. Other layers (convolutions, ...) stay fp32.
    """

    name = "dynamic_int8"
    backend = "torch.ao.quantization.quantize_dynamic"

    def _quantize(self, model: nn.Module) -> nn.Module:
        if not any(isinstance(m, nn.Linear) for m in model.modules()):
            raise ValueError(
                f"quantization scheme {self.name!r} applies to nn.Linear layers only and this "
                f"{type(model).__name__} has none; choose scheme 'none' or add Linear layers"
            )
        from torch.ao.quantization import quantize_dynamic

        with _quiet_torch_ao():
            return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)

    def apply(self, model: nn.Module) -> nn.Module:
        # Copy first: quantize_dynamic(inplace=False) would still need the model on CPU, and
        # moving the caller's model there would be a side effect.
        return self._quantize(copy.deepcopy(model).cpu().eval()).eval()

    def prepare_for_load(self, model: nn.Module) -> nn.Module:
        # The int8 structure (packed-params modules) only depends on which layers are Linear,
        # so quantizing the random fresh weights gives the right shape; load_state_dict then
        # overwrites every packed weight, scale and zero point.
        return self._quantize(model.cpu().eval()).eval()


QUANTIZERS.register("none")(NoQuantization())
QUANTIZERS.register("dynamic_int8")(DynamicInt8())


def quantize(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize with a registered scheme.

    Args:
        model: fp32 module mapping ``[B, *input_shape]`` to ``[B, C]``; left untouched.
        scheme: A name in ``QUANTIZERS`` (``"none"``, ``"dynamic_int8"``).

    Returns:
        A new module in eval mode on CPU, same input and output shapes.

    Raises:
        UnknownNameError: unknown scheme.
        ValueError: the scheme does not apply to this model (e.g. int8 Linear on a model without Linear).
    """
    return QUANTIZERS.get(scheme).apply(model)


def save_model(model: nn.Module, spec: dict[str, Any], directory: str | Path) -> Path:
    """Write a model as ``weights.pt`` + ``spec.json``, loadable without pickle by ``load_model``.

    Args:
        model: The (possibly quantized) module; its state dict is saved.
        spec: JSON-able description: ``arch``, ``params``, ``input_shape``, ``num_classes``,
            ``quantization`` (scheme name), plus anything else the caller wants kept (e.g.
            normalization). Not modified; ``backend`` and ``torch_version`` are added to the
            written copy.
        directory: Created if missing.

    Returns:
        The directory.

    Raises:
        ValueError: a required spec key is missing or the spec is not JSON-able.
        UnknownNameError: ``spec["quantization"]`` is not a registered scheme.
    """
    missing = [k for k in REQUIRED_SPEC_KEYS if k not in spec]
    if missing:
        raise ValueError(
            f"model spec is missing {', '.join(missing)}; required keys: {', '.join(REQUIRED_SPEC_KEYS)}"
        )
    quantizer = QUANTIZERS.get(spec["quantization"])
    written = {
        **spec,
        "input_shape": list(spec["input_shape"]),
        "backend": quantizer.backend,
        "torch_version": torch.__version__,
    }
    try:
        spec_text = json.dumps(written, indent=2, sort_keys=True)
    except TypeError as err:
        raise ValueError(f"model spec is not JSON-serializable: {err}") from None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with _quiet_torch_ao():
        torch.save(model.state_dict(), out / WEIGHTS_FILE)
    (out / SPEC_FILE).write_text(spec_text + "\n")
    return out


def load_model(directory: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Load a model written by ``save_model``; never unpickles code.

    Args:
        directory: Holds ``spec.json`` and ``weights.pt``.

    Returns:
        ``(model, spec)``: the module in eval mode on CPU, mapping ``[B, *input_shape]`` to
        ``[B, num_classes]``, and the spec as written.

    Raises:
        ArtifactError: a file is missing or corrupt, or the weights do not fit the spec; the
            message names the file.
    """
    root = Path(directory)
    spec_path, weights_path = root / SPEC_FILE, root / WEIGHTS_FILE
    try:
        spec = json.loads(spec_path.read_text())
    except FileNotFoundError:
        raise ArtifactError(
            f"{spec_path}: missing; a saved model directory holds {SPEC_FILE} and {WEIGHTS_FILE}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{spec_path}: unreadable or not JSON ({err})") from None
    if not isinstance(spec, dict):
        raise ArtifactError(f"{spec_path}: must hold a JSON object")
    missing = [k for k in REQUIRED_SPEC_KEYS if k not in spec]
    if missing:
        raise ArtifactError(f"{spec_path}: missing key(s) {', '.join(missing)}")
    if not weights_path.is_file():
        raise ArtifactError(f"{weights_path}: missing; a saved model directory holds {SPEC_FILE} and {WEIGHTS_FILE}")

    model = build_model(spec["arch"], spec["params"], tuple(spec["input_shape"]), spec["num_classes"])
    model = QUANTIZERS.get(spec["quantization"]).prepare_for_load(model)
    with _quiet_torch_ao():
        try:
            state = torch.load(weights_path, weights_only=True, map_location="cpu")
        except Exception as err:  # torch raises several types for a bad file; all mean "corrupt"
            raise ArtifactError(f"{weights_path}: not a loadable weights-only state dict ({err})") from None
        try:
            model.load_state_dict(state, strict=True)
        except (RuntimeError, TypeError, AttributeError) as err:
            raise ArtifactError(f"{weights_path}: does not match the architecture in {spec_path} ({err})") from None
    return model.eval(), spec
