"""CIFAR-style residual networks (He et al. 2016, section 4.2), the ResNets KD papers benchmark with.

``arch: resnet`` (registered in ``kd_lib.models.builders.MODELS``) with
``params: {depth: 20, width: 1}``. Depth is ``6n + 2``: a 3x3 stem convolution, three stages
of ``n`` BasicBlocks (two 3x3 convolutions each) with ``16w``, ``32w`` and ``64w`` channels,
the second and third stage halving the spatial size, then global average pooling and one
linear layer. ResNet-8/14/20/32/44/56/110 are depths
8/14/20/32/44/56/110. Every convolution is followed by BatchNorm; a block whose shape changes
adds a strided 1x1 convolution + BatchNorm projection of its input (option B), so inputs of
any channel count and any spatial size (8x8 digits, 28x28 MNIST, 32x32 CIFAR) work.

Parameter counts at ``width: 1`` and 10 classes: ResNet-8 78k, ResNet-20 272k, ResNet-56 856k.

The stages are named children, so feature losses name them by module path:
``stem``, ``layer1``, ``layer2``, ``layer3`` (``layer3.0.conv1`` inside), ``pool``, ``fc``.
The default feature layer of FitNets and attention transfer is ``layer3``, the last feature
map before pooling (``ResNet.feature_layer``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

# Depths listed in errors; any 6n + 2 >= 8 is accepted.
COMMON_DEPTHS = (8, 14, 20, 26, 32, 44, 56, 110)
BASE_CHANNELS = (16, 32, 64)


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``shortcut`` is the identity when the block keeps the shape, else a strided 1x1
    convolution + BatchNorm.

    Args:
        in_channels: Channels of the block's input ``[B, in_channels, H, W]``.
        out_channels: Channels of its output ``[B, out_channels, H / stride, W / stride]``.
        stride: 1, or 2 to halve the spatial size (rounding up).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """``stem -> layer1 -> layer2 -> layer3 -> pool -> fc``: ``[B, C, H, W]`` to ``[B, num_classes]``.

    Args:
        in_channels: Input channels C.
        num_classes: Number of output logits.
        blocks: BasicBlocks per stage (n of depth 6n + 2).
        channels: Channels of the three stages, e.g. ``(16, 32, 64)``.
    """

    # Module path of the last feature map ([B, channels[2], H/4, W/4]): kd_lib.train.objective's
    # default layer for feature losses (the model has no Flatten module to find it by).
    feature_layer = "layer3"

    def __init__(self, in_channels: int, num_classes: int, blocks: int, channels: tuple[int, int, int]) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c1, 3, padding=1, bias=False), nn.BatchNorm2d(c1), nn.ReLU())
        self.layer1 = self._stage(c1, c1, blocks, stride=1)
        self.layer2 = self._stage(c1, c2, blocks, stride=2)
        self.layer3 = self._stage(c2, c3, blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c3, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        first = BasicBlock(in_channels, out_channels, stride)
        return nn.Sequential(first, *(BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def _blocks_for(depth: Any) -> int:
    valid = ", ".join(map(str, COMMON_DEPTHS))
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"resnet depth {depth!r} is not 6n + 2 with n >= 1; valid depths: {valid}, ... (6n + 2)")
    return (depth - 2) // 6


def resnet(input_shape: tuple[int, ...], num_classes: int, depth: int = 20, width: float = 1) -> ResNet:
    """CIFAR-style ResNet of ``depth`` = 6n + 2 layers with ``width`` times 16/32/64 channels.

    Args:
        input_shape: Per-sample ``(C, H, W)``; any channel count and spatial size.
        num_classes: Number of output logits.
        depth: 8, 14, 20, 26, 32, 44, 56, 110, ... (6n + 2, n BasicBlocks per stage).
        width: Channel multiplier (> 0); each stage gets at least one channel.

    Returns:
        A ``ResNet`` mapping ``[B, C, H, W]`` float32 to ``[B, num_classes]`` logits.

    Raises:
        ValueError: ``input_shape`` is not ``(C, H, W)``, or depth, width or num_classes is
            out of range (``build_model`` reports it as a ConfigError).
    """
    if len(input_shape) != 3:
        raise ValueError(
            f"resnet needs a (C, H, W) input_shape, got {tuple(input_shape)}; use arch 'mlp' for flat feature vectors"
        )
    blocks = _blocks_for(depth)
    if isinstance(width, bool) or not isinstance(width, (int, float)) or width <= 0:
        raise ValueError(f"resnet width must be a number > 0 (a multiplier of 16/32/64 channels), got {width!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    c1, c2, c3 = (max(1, round(base * width)) for base in BASE_CHANNELS)
    return ResNet(int(input_shape[0]), num_classes, blocks, (c1, c2, c3))
