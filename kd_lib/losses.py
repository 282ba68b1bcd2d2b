"""Distillation losses behind a registry: pure tensor math, no state.

Every registered loss has the signature
``(student_logits [B, C], teacher_logits [B, C] | None, labels [B] int64, **params) -> scalar``
so a config can name one (``{name: kd, params: {temperature: 4}}``).
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

from kd_lib.registry import Registry

LossFn = Callable[..., Tensor]

LOSSES: Registry[LossFn] = Registry("loss")


@LOSSES.register("ce")
def ce(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, **_: object) -> Tensor:
    """Cross-entropy of the student on the hard labels; the teacher is ignored.

    Args:
        student_logits: ``[B, C]`` float.
        teacher_logits: Ignored (may be None); present so every loss shares one signature.
        labels: ``[B]`` int64 class indices.
        **_: Ignored, so that a shared params block (e.g. ``temperature``) can be passed.

    Returns:
        Scalar mean cross-entropy over the batch.
    """
    return F.cross_entropy(student_logits, labels)


@LOSSES.register("kd")
def kd(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 4.0) -> Tensor:
    """Soft-target distillation loss of Hinton, Vinyals & Dean (2015).

    ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The gradient of the softened KL with respect to the student logits scales as ``1 / T^2``;
    multiplying by ``T^2`` keeps its magnitude comparable across temperatures and to the
    hard-label term it is mixed with (paper, section 2).

    Reference:
        G. Hinton, O. Vinyals, J. Dean. "Distilling the Knowledge in a Neural Network".
        NIPS Deep Learning Workshop, 2015. arXiv:1503.02531.

    Args:
        student_logits: ``[B, C]`` float.
        teacher_logits: ``[B, C]`` float, the teacher's logits for the same samples.
        labels: ``[B]`` int64; unused, kept for the shared signature.
        temperature: Softmax temperature T > 0; larger T exposes more of the teacher's
            "dark knowledge" about which wrong classes are similar.

    Returns:
        Scalar loss.

    Raises:
        ValueError: T <= 0 or the logit shapes differ.
    """
    del labels  # the soft targets come from the teacher only
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_logits is None or teacher_logits.shape != student_logits.shape:
        got = None if teacher_logits is None else tuple(teacher_logits.shape)
        raise ValueError(f"kd needs teacher logits of shape {tuple(student_logits.shape)}, got {got}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    # kl_div(input, target) computes KL(target || input); log_target avoids exp/log round trips.
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def hinton_loss(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    temperature: float,
    alpha: float,
) -> Tensor:
    """Hinton knowledge-distillation objective: soft teacher targets mixed with hard labels.

    ``loss = alpha * T^2 * KL(softmax(z_t / T) || softmax(z_s / T)) + (1 - alpha) * CE(z_s, y)``

    ``alpha = 0`` is plain supervised training of the student (the no-KD baseline) and does
    not touch the teacher logits, which may then be None. ``alpha = 1`` uses the teacher only.

    Reference:
        G. Hinton, O. Vinyals, J. Dean. "Distilling the Knowledge in a Neural Network". 2015.
        arXiv:1503.02531.

    Args:
        student_logits: ``[B, C]`` float, ``z_s``.
        teacher_logits: ``[B, C]`` float ``z_t``, or None when ``alpha == 0``.
        labels: ``[B]`` int64 hard labels ``y``.
        temperature: Softmax temperature T > 0.
        alpha: Weight of the distillation term, in [0, 1].

    Returns:
        Scalar loss.

    Raises:
        ValueError: alpha outside [0, 1], or alpha > 0 without teacher logits.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return ce(student_logits, None, labels)
    if teacher_logits is None:
        raise ValueError(f"alpha={alpha} > 0 needs teacher logits; pass them or set alpha=0 for the no-KD baseline")
    soft = kd(student_logits, teacher_logits, labels, temperature=temperature)
    if alpha == 1.0:
        # Skip CE entirely: 0 * CE would still propagate a NaN/inf from a bad label batch.
        return soft
    return alpha * soft + (1.0 - alpha) * ce(student_logits, None, labels)
