"""Training with a transfer set: unlabeled samples (label ``UNLABELED``) that the label terms skip
and the teacher terms learn from, cached teacher logits looked up for them like for train."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from kd_lib.config import LossTermConfig, TrainConfig
from kd_lib.config.train import LABELED_TEACHER_LOSSES
from kd_lib.models.builders import mlp
from kd_lib.train.inference import compute_logits
from kd_lib.train.loop import distill, kd_finetune
from kd_lib.train.losses import LOSSES, LossInputs, build_objective, ce
from kd_lib.train.objective import UNLABELED
from tests.helpers import TableTeacher

Data = tuple[Tensor, Tensor, Tensor, Tensor]

STUDENT = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
# -log softmax([1, 2, 3])[2] = log(1 + e^-1 + e^-2); -log softmax([0, 0, 0])[0] = log 3.
CE_ROW0 = math.log(1 + math.exp(-1) + math.exp(-2))
CE_ROW1 = math.log(3)


def test_ce_averages_over_the_labeled_samples_only() -> None:
    assert CE_ROW0 == pytest.approx(0.407606, abs=1e-6)
    assert ce(STUDENT, torch.tensor([2, 0])).item() == pytest.approx((CE_ROW0 + CE_ROW1) / 2, abs=1e-6)
    assert ce(STUDENT, torch.tensor([2, UNLABELED])).item() == pytest.approx(CE_ROW0, abs=1e-6)
    assert ce(STUDENT, torch.tensor([UNLABELED, 0])).item() == pytest.approx(CE_ROW1, abs=1e-6)
    # The unlabeled row gets no gradient; the labeled one the usual softmax - one_hot.
    logits = STUDENT.clone().requires_grad_(True)
    ce(logits, torch.tensor([2, UNLABELED])).backward()
    assert logits.grad is not None
    expected = torch.softmax(STUDENT[0], 0) - torch.tensor([0.0, 0.0, 1.0])
    torch.testing.assert_close(logits.grad[0], expected)
    assert torch.equal(logits.grad[1], torch.zeros(3))


def test_ce_of_a_batch_without_labels_is_zero_not_nan() -> None:
    logits = STUDENT.clone().requires_grad_(True)
    value = ce(logits, torch.full((2,), UNLABELED))
    assert value.item() == 0.0
    value.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros(2, 3))


def test_the_config_knows_which_teacher_losses_need_labels() -> None:
    """LABELED_TEACHER_LOSSES (refused with a transfer set) are exactly the registered logit terms
    that fail on unlabeled samples; every other one gives a finite value there."""
    teacher = torch.tensor([[3.0, 2.0, 1.0], [2.0, 0.0, 0.0]])
    labeled = LossInputs(STUDENT, torch.tensor([2, 0]), teacher)
    unlabeled = LossInputs(STUDENT, torch.full((2,), UNLABELED), teacher)
    needs_labels = set()
    for name in LOSSES.names():
        term = LOSSES.get(name)()
        if term.needs_features:
            continue  # intermediate layers: they read no labels
        try:
            term(labeled)
        except (KeyError, RuntimeError, ValueError, TypeError):
            continue  # needs more than logits and labels
        try:
            ok = bool(torch.isfinite(term(unlabeled)))
        except (RuntimeError, ValueError, IndexError):
            ok = False
        if not ok:
            needs_labels.add(name)
    assert needs_labels == set(LABELED_TEACHER_LOSSES)


def _student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return mlp((8,), 3, width=16, depth=1)


def _objective():  # kd learns from the teacher everywhere, ce from the few labels
    return build_objective(
        [LossTermConfig(name="kd", weight=1.0, params={"temperature": 2.0}), LossTermConfig(name="ce", weight=0.1)]
    )


def test_the_student_follows_the_teacher_on_the_transfer_samples(blobs: Data, fast_cfg: TrainConfig) -> None:
    x_train, y_train, x_val, y_val = blobs
    x_labeled, y_labeled, x_transfer = x_train[:30], y_train[:30], x_train[30:]
    # On the transfer samples the teacher says class c+1 for blob c: a student that learns from
    # them ends up predicting that shift; one that never sees them keeps the labeled classes.
    shifted = (y_train[30:] + 1) % 3
    teacher_logits = nn.functional.one_hot(torch.cat([y_labeled, shifted]), 3).float() * 10
    teacher = TableTeacher(torch.cat([x_labeled, x_transfer]), teacher_logits)
    seen: list[dict] = []
    result = distill(
        _student(), teacher, _objective(), x_labeled, y_labeled, x_val, y_val, fast_cfg,
        on_epoch=seen.append, x_transfer=x_transfer,
    )  # fmt: skip
    predicted = compute_logits(result.model, x_val).argmax(1)
    assert (predicted == (y_val + 1) % 3).float().mean().item() > 0.85
    # One cached pass over train + transfer (a TableTeacher fails on a row it does not know).
    assert teacher.calls == 1
    # Batches of transfer samples alone give ce 0, never NaN.
    assert all(math.isfinite(row["train_loss"]) and math.isfinite(row["loss_ce"]) for row in seen)

    alone = TableTeacher(x_labeled, teacher_logits[:30])
    without = distill(_student(), alone, _objective(), x_labeled, y_labeled, x_val, y_val, fast_cfg).model
    assert (compute_logits(without, x_val).argmax(1) == (y_val + 1) % 3).float().mean().item() < 0.2


def test_a_transfer_set_needs_a_teacher_term_and_samples_like_train(blobs: Data, fast_cfg: TrainConfig) -> None:
    x_train, y_train, x_val, y_val = blobs
    ce_only = build_objective([LossTermConfig(name="ce")])
    with pytest.raises(ValueError, match=r"objective \(ce\) does not use the teacher"):
        distill(_student(), None, ce_only, x_train, y_train, x_val, y_val, fast_cfg, x_transfer=x_train[:4])
    teacher = TableTeacher(x_train, torch.zeros(len(x_train), 3))
    with pytest.raises(ValueError, match=r"transfer samples are torch.float32 \[4\] but training samples"):
        distill(_student(), teacher, _objective(), x_train, y_train, x_val, y_val, fast_cfg, x_transfer=x_train[:, :4])


def test_quantization_aware_fine_tuning_learns_the_transfer_samples_too(blobs: Data, fast_cfg: TrainConfig) -> None:
    """kd_finetune (qat_int8's fine-tuning) takes the transfer set as distill does: the teacher's
    shifted answers on the transfer samples move the student only when they are given."""
    x_train, y_train, x_val, y_val = blobs
    x_labeled, y_labeled, x_transfer = x_train[:30], y_train[:30], x_train[30:]
    logits = nn.functional.one_hot(torch.cat([y_labeled, (y_train[30:] + 1) % 3]), 3).float() * 10
    shifted: dict[str, float] = {}
    for name, transfer in (("with", x_transfer), ("without", None)):
        teacher = TableTeacher(torch.cat([x_labeled, x_transfer]), logits)
        student = _student()
        history = kd_finetune(student, teacher, _objective(), x_labeled, y_labeled, fast_cfg, x_transfer=transfer)
        assert len(history) == fast_cfg.epochs and all(math.isfinite(row["loss_ce"]) for row in history)
        predicted = compute_logits(student, x_val).argmax(1)
        shifted[name] = (predicted == (y_val + 1) % 3).float().mean().item()
    assert shifted["with"] > 0.85 and shifted["without"] < 0.2, shifted
    with pytest.raises(ValueError, match=r"objective \(ce\) does not use the teacher"):
        kd_finetune(_student(), None, build_objective([LossTermConfig(name="ce")]), x_labeled, y_labeled, fast_cfg,
                    x_transfer=x_transfer)  # fmt: skip
