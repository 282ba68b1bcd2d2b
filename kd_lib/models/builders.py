"""Architecture builders behind a registry.

Every builder has the signature ``(input_shape, num_classes, **params) -> nn.Module`` where
``input_shape`` is the shape of ONE sample (``(1, 8, 8)`` for an image, ``(64,)`` for a feature
vector) and the module maps ``[B, *input_shape]`` float32 to ``[B, num_classes]`` logits.
A config names a builder (``arch: mlp``) or a user function (``arch: mypkg.models:resnet``);
``build_model`` resolves the name and turns bad parameters into a ConfigError.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kd_lib.config import ConfigError
from kd_lib.models import huggingface
from kd_lib.models import text as text_models
from kd_lib.models.resnet import resnet
from kd_lib.plugins import Registry

ModelBuilder = Callable[..., nn.Module]

# kd_lib.plugins.PROVIDERS names this registry by module path (config lists its names that way).
MODELS: Registry[ModelBuilder] = Registry("model")


def _positive_int(name: str, value: Any) -> int:
    # bool is an int subclass; `width: true` in YAML is a mistake, not width 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _non_negative_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    return value


def _dropout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {value!r}")
    return float(value)


@MODELS.register("mlp")
def mlp(
    input_shape: tuple[int, ...],
    num_classes: int,
    width: int = 128,
    depth: int = 2,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Multi-layer perceptron on the flattened input.

    ``Flatten -> depth x [Linear(width) -> ReLU (-> Dropout)] -> Linear(num_classes)``.
    ``depth=0`` is multinomial logistic regression.

    Args:
        input_shape: Per-sample shape, any rank; it is flattened to ``prod(input_shape)`` features.
        num_classes: Number of output logits C.
        width: Units of every hidden layer.
        depth: Number of hidden layers.
        dropout: Dropout probability after each hidden ReLU; 0 adds no Dropout module.

    Returns:
        A module mapping ``[B, *input_shape]`` to logits ``[B, C]``.
    """
    _positive_int("num_classes", num_classes)
    _positive_int("width", width)
    _non_negative_int("depth", depth)
    dropout = _dropout(dropout)
    features = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


@MODELS.register("cnn")
def cnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    channels: int = 16,
    depth: int = 2,
    hidden: int = 64,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Small VGG-style convolutional network for ``(C, H, W)`` images.

    ``depth`` blocks of ``Conv2d(3x3, padding 1) -> ReLU -> MaxPool2d(2)`` with ``channels``,
    ``2*channels``, ``4*channels``, ... filters, then ``Flatten -> Linear(hidden) -> ReLU
    (-> Dropout) -> Linear(num_classes)``. A block pools only while both spatial sides are >= 2,
    so deep stacks on 8x8 inputs stay valid. There is deliberately no BatchNorm: it would
    need folding into the convolutions before static quantization, and dynamic int8 leaves
    it in float anyway, so leaving it out keeps every quantization scheme simple.

    Args:
        input_shape: Per-sample ``(C, H, W)``.
        num_classes: Number of output logits C.
        channels: Filters of the first block; each later block doubles them.
        depth: Number of convolutional blocks (>= 1).
        hidden: Units of the fully connected hidden layer.
        dropout: Dropout probability after the hidden ReLU; 0 adds no Dropout module.

    Returns:
        A module mapping ``[B, C, H, W]`` to logits ``[B, num_classes]``.

    Raises:
        ValueError: ``input_shape`` is not ``(C, H, W)`` or a parameter is out of range.
    """
    if len(input_shape) != 3:
        raise ValueError(
            f"cnn needs a (C, H, W) input_shape, got {tuple(input_shape)}; use arch 'mlp' for flat feature vectors"
        )
    _positive_int("num_classes", num_classes)
    _positive_int("channels", channels)
    _positive_int("depth", depth)
    _positive_int("hidden", hidden)
    dropout = _dropout(dropout)
    in_channels, height, width = input_shape
    layers: list[nn.Module] = []
    for block in range(depth):
        out_channels = channels * 2**block
        layers += [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU()]
        if height >= 2 and width >= 2:
            layers.append(nn.MaxPool2d(2))
            # MaxPool2d floors odd sides, exactly like integer division.
            height, width = height // 2, width // 2
        in_channels = out_channels
    layers += [nn.Flatten(), nn.Linear(in_channels * height * width, hidden), nn.ReLU()]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, num_classes))
    return nn.Sequential(*layers)


# CIFAR-style ResNet-(6n+2), defined in kd_lib.models.resnet.
MODELS.register("resnet")(resnet)
# A Hugging Face sequence classifier rebuilt from its saved configuration (kd_lib.models.huggingface).
MODELS.register(huggingface.ARCH)(huggingface.build)
# Text classifiers on token ids (kd_lib.models.text): transformer, bilstm, textcnn.
for _name in text_models.ARCHS:
    MODELS.register(_name)(getattr(text_models, _name))


def _resolve_builder(arch: str) -> ModelBuilder:
    if ":" not in arch:
        return MODELS.get(arch)
    module_name, _, attr = arch.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"model arch {arch!r}: a user model is written 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"model arch {arch!r}: cannot import module {module_name!r} ({err}); install it or put it on PYTHONPATH"
        ) from None
    builder = getattr(module, attr, None)
    if not callable(builder):
        raise ConfigError(f"model arch {arch!r}: module {module_name!r} has no function {attr!r}")
    return builder


def _accepted_params(builder: ModelBuilder) -> tuple[list[str], bool]:
    """Keyword parameters a builder accepts beyond (input_shape, num_classes), and whether it has **kwargs."""
    parameters = list(inspect.signature(builder).parameters.values())[2:]
    names = [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    return names, takes_any


def _as_int(name: str, value: Any) -> int:
    # Shapes read back from JSON or KFP metadata can arrive as floats (28.0); accept those.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"{name} must contain integers, got {value!r}")
    return int(value)


def build_model(
    arch: str,
    params: Mapping[str, Any] | None,
    input_shape: tuple[int, ...],
    num_classes: int,
) -> nn.Module:
    """Build a model by registry name or ``"package.module:function"``.

    Args:
        arch: A name in ``MODELS`` (``"mlp"``, ``"cnn"``, ``"resnet"``) or ``"package.module:function"``.
        params: Keyword arguments of the builder (``{"width": 32}``); None means none.
        input_shape: Per-sample shape, e.g. ``(1, 28, 28)`` or ``(64,)``.
        num_classes: Number of output logits C.

    Returns:
        A module mapping ``[B, *input_shape]`` float32 to ``[B, C]`` logits.

    Raises:
        UnknownNameError: ``arch`` is not a registered name.
        ConfigError: a user module cannot be imported, a parameter is unknown or invalid, or
            the input shape does not suit the architecture; the message names the arch, the
            parameter and the accepted parameters.
    """
    params = dict(params or {})
    builder = _resolve_builder(arch)
    accepted, takes_any = _accepted_params(builder)
    accepted_text = ", ".join(accepted) or "(none)"
    unknown = sorted(set(params) - set(accepted))
    if unknown and not takes_any:
        raise ConfigError(
            f"model {arch!r}: unknown parameter(s) {', '.join(unknown)}; accepted parameters: {accepted_text}"
        )
    shape = tuple(_as_int("input_shape", s) for s in input_shape)
    classes = _as_int("num_classes", num_classes)
    try:
        model = builder(shape, classes, **params)
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"model {arch!r} with params {params} and input_shape {shape}: {err}; accepted parameters: {accepted_text}"
        ) from err
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model {arch!r}: the builder returned {type(model).__name__}, not a torch.nn.Module")
    return model


def text_params(arch: str, vocab_size: int, pad_id: int) -> dict[str, int]:
    """What text data gives a model's builder: ``vocab_size`` and ``pad_id``, those of them the
    builder of ``arch`` accepts. The step that builds a model on text data merges them into the
    configured params (``kd_lib.steps.inputs.model_params``), and the spec records them.

    Raises:
        UnknownNameError, ConfigError: ``arch`` names no builder (as ``build_model``).
    """
    accepted, takes_any = _accepted_params(_resolve_builder(arch))
    given = {"vocab_size": int(vocab_size), "pad_id": int(pad_id)}
    return {name: value for name, value in given.items() if takes_any or name in accepted}


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters, ``sum(p.numel() for p in model.parameters())``.

    Dynamic-quantized Linear layers keep their weights in packed buffers, not parameters, so
    count the fp32 model before quantizing it.
    """
    return sum(p.numel() for p in model.parameters())


class Renormalized(nn.Module):
    """``model((x * std_data + mean_data - mean_model) / std_model)``.

    Feeds inputs normalized with this run's train-split statistics to a model trained on
    data normalized with other statistics (an imported teacher, the current champion):
    undo one normalization, apply the other. Statistics are scalars or per-channel lists
    (``kd_lib.data.dataset.normalization_stats``). ``model`` stays a child named ``model``.
    """

    # Registered buffers, declared so type checkers know them as tensors (not nn.Module attributes).
    scale: Tensor
    shift: Tensor

    def __init__(self, model: nn.Module, data_norm: dict[str, Any], model_norm: dict[str, Any]) -> None:
        super().__init__()
        self.model = model

        def stat(norm: dict[str, Any], key: str, default: float) -> Tensor:
            t = torch.as_tensor(norm.get(key, default), dtype=torch.float32)
            return t.reshape(-1, 1, 1) if t.ndim == 1 else t  # per channel: broadcast over [B, C, H, W]

        scale = stat(data_norm, "std", 1.0) / stat(model_norm, "std", 1.0)
        shift = (stat(data_norm, "mean", 0.0) - stat(model_norm, "mean", 0.0)) / stat(model_norm, "std", 1.0)
        # Buffers follow .to(device); not persistent: the wrapper is never saved, only its model.
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x * self.scale + self.shift)


def for_data(model: nn.Module, model_norm: dict[str, Any] | None, data_norm: dict[str, Any]) -> nn.Module:
    """``model`` itself when it expects this normalization, else wrapped in ``Renormalized``."""
    own = model_norm or {}
    same = all(own.get(k, d) == data_norm.get(k, d) for k, d in (("mean", 0.0), ("std", 1.0)))
    return model if same else Renormalized(model, data_norm, own)
