"""Random augmentation of training batches: pure tensor functions driven by an explicit generator.

Only training batches are augmented (never validation or test), and every random draw comes
from the ``torch.Generator`` the training loop passes in, so a run is reproducible from its
seed and a resumed run (the generator state is checkpointed) continues the same sequence.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kd_lib.config import AugmentConfig, PipelineConfig

# (batch [B, *input_shape] on any device, CPU generator) -> augmented batch, same shape and device
Augment = Callable[[Tensor, torch.Generator], Tensor]


def random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Zero-pad each image by ``padding`` pixels per side, then crop back at a random offset.

    Args:
        x: ``[B, C, H, W]``.
        padding: Pixels of padding per side (>= 1); offsets are uniform in ``[0, 2 * padding]``.
        generator: Source of the per-sample offsets.

    Returns:
        ``[B, C, H, W]``; each sample shifted by up to ``padding`` pixels in each direction.
    """
    b, _, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B, 1, 1, W]
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror each image left-right with probability 1/2. ``x``: ``[B, C, H, W]``."""
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def gaussian_noise(x: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """Add ``N(0, std^2)`` noise to every element. ``x``: any shape."""
    return x + std * torch.randn(x.shape, generator=generator).to(x.device, x.dtype)


def mixup(x: Tensor, alpha: float, generator: torch.Generator) -> Tensor:
    """Mix each sample with another sample of the batch: ``lam * x[i] + (1 - lam) * x[j]``.

    ``j`` is a random permutation of the batch and ``lam ~ Beta(alpha, alpha)``, one per sample.
    torch's Beta sampler takes no generator, so the draws come from numpy's, seeded from ``generator``:
    the same generator state gives the same batch.

    Args:
        x: ``[B, ...]`` float.
        alpha: Beta's concentration (> 0): 1 draws ``lam`` uniformly; small values keep most
            samples close to one of the two.
        generator: Source of the permutation and of the seed of the ``lam`` draws.

    Returns:
        ``[B, ...]``, same dtype and device.
    """
    partner = torch.randperm(len(x), generator=generator).to(x.device)
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    lam = np.random.default_rng(seed).beta(alpha, alpha, size=len(x))
    lam_t = torch.from_numpy(lam).to(x.device, x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return lam_t * x + (1 - lam_t) * x[partner]


def make_augment(cfg: AugmentConfig, input_shape: tuple[int, ...], where: str = "data.augment") -> Augment | None:
    """The configured augmentation as one function, or None when every transform is off.
    ``where`` is the config field ``cfg`` came from, named in errors.

    Raises:
        ValueError: crop or flip was requested for inputs that are not ``[C, H, W]`` images
            (the message names the field to turn off).
    """
    if not cfg.enabled:
        return None
    is_image = len(input_shape) == 3
    for name, on in (
        (f"{where}.random_crop_padding", cfg.random_crop_padding > 0),
        (f"{where}.horizontal_flip", cfg.horizontal_flip),
    ):
        if on and not is_image:
            raise ValueError(
                f"{name} needs image inputs [C, H, W]; these samples have shape {list(input_shape)}: turn it off"
            )

    def augment(x: Tensor, generator: torch.Generator) -> Tensor:
        if cfg.random_crop_padding > 0:
            x = random_crop(x, cfg.random_crop_padding, generator)
        if cfg.horizontal_flip:
            x = random_hflip(x, generator)
        if cfg.noise_std > 0:
            x = gaussian_noise(x, cfg.noise_std, generator)
        if cfg.mixup_alpha > 0:
            x = mixup(x, cfg.mixup_alpha, generator)
        return x

    return augment


def augment_for(
    cfg: PipelineConfig, step: Literal["teacher", "distill"], input_shape: tuple[int, ...], mixup: bool = True
) -> Augment | None:
    """The augmentation training ``step`` applies (``<step>.train.augment`` when set, else
    ``data.augment``); errors name the field it came from. ``mixup=False`` leaves mixup out (the
    no-teacher baseline: a mixed sample has no label). Raises ValueError as ``make_augment``."""
    augment_cfg, where = cfg.augment_of(step)
    if not mixup:
        augment_cfg = augment_cfg.model_copy(update={"mixup_alpha": 0.0})
    return make_augment(augment_cfg, input_shape, where)
