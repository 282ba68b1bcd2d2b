"""kd_lib.data.augment: each transform against what it must do to a known image, reproducibility
from the generator, and the per-step choice with its error naming the field."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kd_lib.config import AugmentConfig, ConfigError, parse_config
from kd_lib.data.augment import augment_for, gaussian_noise, make_augment, mixup, random_crop, random_hflip


def _images(b: int = 64, c: int = 2, h: int = 5, w: int = 6) -> torch.Tensor:
    # Every pixel distinct and non-zero, so a shift can be told apart from zero padding.
    return torch.arange(1, b * c * h * w + 1, dtype=torch.float32).reshape(b, c, h, w)


def _shifted(img: torch.Tensor, dy: int, dx: int, padding: int) -> torch.Tensor:
    """``img`` [C, H, W] zero-padded by ``padding`` and cropped at offset (padding+dy, padding+dx)."""
    _, h, w = img.shape
    padded = F.pad(img, (padding,) * 4)
    return padded[:, padding + dy : padding + dy + h, padding + dx : padding + dx + w]


def test_random_crop_shifts_each_image_by_at_most_the_padding_and_fills_with_zeros() -> None:
    x, padding = _images(), 2
    out = random_crop(x, padding, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    shifts = []
    for img, got in zip(x, out, strict=True):
        matches = [
            (dy, dx)
            for dy in range(-padding, padding + 1)
            for dx in range(-padding, padding + 1)
            if torch.equal(got, _shifted(img, dy, dx, padding))
        ]
        assert len(matches) == 1, "every output is exactly one shift of its own input, channels together"
        shifts.append(matches[0])
    # Offsets are drawn per sample: 64 images at 25 possible shifts do not all share one.
    assert len(set(shifts)) > 5


def test_augmentation_is_reproducible_from_the_generator_and_advances_it() -> None:
    x = _images()
    augment = make_augment(
        AugmentConfig(random_crop_padding=1, horizontal_flip=True, noise_std=0.1), tuple(x.shape[1:])
    )
    assert augment is not None
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    first = augment(x, g1)
    assert torch.equal(first, augment(x, g2))
    # The same generator goes on to new draws (the next epoch differs), as a resumed run expects.
    assert not torch.equal(first, augment(x, g1))


def test_random_hflip_mirrors_about_half_of_the_images() -> None:
    x = _images(b=200)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = [bool(torch.equal(o, i.flip(-1))) for o, i in zip(out, x, strict=True)]
    kept = [bool(torch.equal(o, i)) for o, i in zip(out, x, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True)), "each image is either mirrored or left as it was"
    assert 70 < sum(flipped) < 130


def test_gaussian_noise_has_the_configured_spread_and_keeps_dtype() -> None:
    x = torch.zeros(100, 1, 20, 20)
    out = gaussian_noise(x, 0.3, torch.Generator().manual_seed(0))
    assert out.dtype == x.dtype and out.shape == x.shape
    assert abs(out.std().item() - 0.3) < 0.01 and abs(out.mean().item()) < 0.01


def test_make_augment_is_none_when_everything_is_off_and_refuses_image_transforms_on_flat_inputs() -> None:
    assert make_augment(AugmentConfig(), (1, 8, 8)) is None
    # Noise needs no image shape.
    assert make_augment(AugmentConfig(noise_std=0.1), (64,)) is not None
    with pytest.raises(
        ValueError, match=r"distill.train.augment.horizontal_flip needs image inputs .*\[64\]: turn it off"
    ):
        make_augment(AugmentConfig(horizontal_flip=True), (64,), "distill.train.augment")


def test_augment_for_uses_the_steps_own_augment_and_names_it_in_errors() -> None:
    cfg = parse_config(
        {"data": {"augment": {"noise_std": 0.1}}, "teacher": {"train": {"augment": {"random_crop_padding": 1}}}}
    )
    x = _images(b=8, c=1)
    teacher = augment_for(cfg, "teacher", (1, 5, 6))
    student = augment_for(cfg, "distill", (1, 5, 6))
    assert teacher is not None and student is not None
    # The teacher's crop keeps the pixel values (a shift); the student's data.augment noise does not.
    assert set(teacher(x, torch.Generator().manual_seed(0)).unique().tolist()) <= set(x.unique().tolist()) | {0.0}
    assert not torch.equal(student(x, torch.Generator().manual_seed(0)), x)
    with pytest.raises(ValueError, match="teacher.train.augment.random_crop_padding needs image inputs"):
        augment_for(cfg, "teacher", (30,))
    assert augment_for(cfg, "distill", (30,)) is not None


def test_mixup_mixes_each_sample_with_one_other_of_the_batch() -> None:
    # Sample i is 10 * e_i: a mixed sample shows which two it came from and with what weights.
    x = (10 * torch.eye(8)).reshape(8, 1, 2, 4)
    out = mixup(x, 0.4, torch.Generator().manual_seed(3)).reshape(8, 8)
    assert torch.allclose(out.sum(dim=1), torch.full((8,), 10.0))  # convex: weights sum to 1
    partners = set()
    for i, row in enumerate(out):
        used = set(row.nonzero().flatten().tolist())
        assert i in used or row[i] == 0  # lam can be ~0: then the row is all its partner
        assert len(used) <= 2 and (row >= 0).all()
        partners |= used - {i}
    assert len(partners) >= 4  # a permutation: different samples are mixed with different partners
    again = mixup(x, 0.4, torch.Generator().manual_seed(3)).reshape(8, 8)
    assert torch.equal(out, again)  # the generator alone decides
    assert not torch.equal(out, mixup(x, 0.4, torch.Generator().manual_seed(4)).reshape(8, 8))


def test_mixup_is_distillation_from_the_teacher_alone() -> None:
    kd_only = [{"name": "kd", "weight": 1.0, "params": {"temperature": 1.0}}]
    ok = parse_config({"distill": {"losses": kd_only, "train": {"augment": {"mixup_alpha": 1.0}}}})
    assert ok.augment_of("distill")[0].mixup_alpha == 1.0 and ok.augment_of("teacher")[0].mixup_alpha == 0
    assert ok.config_hash() != parse_config({"distill": {"losses": kd_only}}).config_hash()
    with pytest.raises(ConfigError, match=r"data.augment.mixup_alpha applies to distillation .*distill.train.augment"):
        parse_config({"data": {"augment": {"mixup_alpha": 1.0}}, "distill": {"losses": kd_only}})
    with pytest.raises(
        ConfigError, match=r"distill.train.augment.mixup_alpha: a mixed sample has no single label.*\['ce'\]"
    ):
        parse_config({"distill": {"train": {"augment": {"mixup_alpha": 1.0}}}})  # the default losses have ce
    # Off, the baseline's augmentation: the other transforms stay.
    both = parse_config(
        {"distill": {"losses": kd_only, "train": {"augment": {"mixup_alpha": 1.0, "random_crop_padding": 1}}}}
    )
    without = augment_for(both, "distill", (1, 4, 4), mixup=False)
    assert without is not None
    x = _images(b=6, c=1, h=4, w=4)
    assert torch.equal(
        without(x, torch.Generator().manual_seed(0)), random_crop(x, 1, torch.Generator().manual_seed(0))
    )
