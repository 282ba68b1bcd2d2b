from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kd_lib.losses import LOSSES, ce, hinton_loss, kd

# Two samples, three classes, explicit numbers so the expected values can be checked by hand.
STUDENT = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
TEACHER = torch.tensor([[3.0, 2.0, 1.0], [2.0, 0.0, 0.0]])
LABELS = torch.tensor([2, 0])


def _softmax(row: list[float], t: float) -> list[float]:
    exps = [math.exp(v / t) for v in row]
    return [e / sum(exps) for e in exps]


def _kl_by_hand(t: float) -> float:
    """Mean over the batch of sum_c p_teacher * (log p_teacher - log p_student), plain Python."""
    total = 0.0
    for s_row, t_row in zip(STUDENT.tolist(), TEACHER.tolist()):
        p_s, p_t = _softmax(s_row, t), _softmax(t_row, t)
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s))
    return total / len(STUDENT)


def test_registry_has_ce_and_kd() -> None:
    assert LOSSES.get("ce") is ce and LOSSES.get("kd") is kd


def test_kd_at_t1_matches_explicit_numbers() -> None:
    # Sample 1: p_t = softmax(3,2,1) = (0.66524, 0.24473, 0.09003), p_s is its mirror, so
    #   KL = (0.66524 - 0.09003) * 2 = 1.15043 (the middle class cancels).
    # Sample 2: p_t = softmax(2,0,0) = (0.78699, 0.10650, 0.10650), p_s = uniform 1/3, so
    #   KL = log 3 + sum p_t log p_t = 1.09861 - 0.66555 = 0.43306.
    # Batch mean: (1.15043 + 0.43306) / 2 = 0.79175 (T^2 = 1 at T = 1).
    assert kd(STUDENT, TEACHER, LABELS, temperature=1.0).item() == pytest.approx(0.79175, abs=1e-4)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 7.5])
def test_kd_is_t_squared_times_plain_kl(t: float) -> None:
    expected = t**2 * _kl_by_hand(t)
    assert kd(STUDENT, TEACHER, LABELS, temperature=t).item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_zero_when_student_equals_teacher_and_positive_otherwise() -> None:
    assert kd(TEACHER, TEACHER, LABELS, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd(STUDENT, TEACHER, LABELS, temperature=3.0).item() > 0.1


def test_ce_matches_hand_value() -> None:
    # Sample 1: -log softmax(1,2,3)[2] = log(e^-2 + e^-1 + 1) = 0.40761; sample 2: log 3 = 1.09861.
    assert ce(STUDENT, None, LABELS).item() == pytest.approx((0.40761 + 1.09861) / 2, abs=1e-4)


def test_alpha_zero_is_cross_entropy_and_needs_no_teacher() -> None:
    loss = hinton_loss(STUDENT, None, LABELS, temperature=4.0, alpha=0.0)
    assert torch.equal(loss, F.cross_entropy(STUDENT, LABELS))


def test_alpha_one_is_kd() -> None:
    loss = hinton_loss(STUDENT, TEACHER, LABELS, temperature=4.0, alpha=1.0)
    assert torch.equal(loss, kd(STUDENT, TEACHER, LABELS, temperature=4.0))


def test_alpha_mixes_linearly() -> None:
    mixed = hinton_loss(STUDENT, TEACHER, LABELS, temperature=2.0, alpha=0.3).item()
    expected = 0.3 * kd(STUDENT, TEACHER, LABELS, 2.0).item() + 0.7 * ce(STUDENT, None, LABELS).item()
    assert mixed == pytest.approx(expected, rel=1e-6)


def test_gradient_flows_to_student_only() -> None:
    student = STUDENT.clone().requires_grad_(True)
    hinton_loss(student, TEACHER, LABELS, temperature=4.0, alpha=0.5).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("teacher", "temperature", "alpha", "match"),
    [
        (None, 4.0, 0.5, "needs teacher logits"),
        (TEACHER, 4.0, 1.5, "alpha"),
        (TEACHER, 0.0, 0.5, "temperature"),
        (TEACHER[:, :2], 4.0, 0.5, "shape"),
    ],
)
def test_invalid_inputs_are_rejected(
    teacher: torch.Tensor | None, temperature: float, alpha: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        hinton_loss(STUDENT, teacher, LABELS, temperature=temperature, alpha=alpha)
