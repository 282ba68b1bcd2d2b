from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lib.config import ConfigError, LossTermConfig
from kd_lib.train.losses import (
    LOSSES,
    LossInputs,
    attention_transfer,
    build_objective,
    capture_features,
    ce,
    default_feature_layer,
    describe,
    dkd,
    hint_loss,
    kd,
)

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
    for s_row, t_row in zip(STUDENT.tolist(), TEACHER.tolist(), strict=True):
        p_s, p_t = _softmax(s_row, t), _softmax(t_row, t)
        total += sum(pt * (math.log(pt) - math.log(ps)) for pt, ps in zip(p_t, p_s, strict=True))
    return total / len(STUDENT)


def test_registry_names_every_method() -> None:
    assert LOSSES.names() == ["at", "attention_kl", "ce", "dkd", "fitnets", "hidden_mse", "kd"]


def test_kd_at_t1_matches_explicit_numbers() -> None:
    # Sample 1: p_t = softmax(3,2,1) = (0.66524, 0.24473, 0.09003), p_s is its mirror, so
    #   KL = (0.66524 - 0.09003) * 2 = 1.15043 (the middle class cancels).
    # Sample 2: p_t = softmax(2,0,0) = (0.78699, 0.10650, 0.10650), p_s = uniform 1/3, so
    #   KL = log 3 + sum p_t log p_t = 1.09861 - 0.66555 = 0.43306.
    # Batch mean: (1.15043 + 0.43306) / 2 = 0.79175 (T^2 = 1 at T = 1).
    assert kd(STUDENT, TEACHER, temperature=1.0).item() == pytest.approx(0.79175, abs=1e-4)


@pytest.mark.parametrize("t", [1.0, 2.0, 4.0, 7.5])
def test_kd_is_t_squared_times_plain_kl(t: float) -> None:
    expected = t**2 * _kl_by_hand(t)
    assert kd(STUDENT, TEACHER, temperature=t).item() == pytest.approx(expected, rel=1e-5)


def test_kd_is_zero_when_student_equals_teacher_and_positive_otherwise() -> None:
    assert kd(TEACHER, TEACHER, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd(STUDENT, TEACHER, temperature=3.0).item() > 0.1


def test_ce_matches_hand_value() -> None:
    # Sample 1: -log softmax(1,2,3)[2] = log(e^-2 + e^-1 + 1) = 0.40761; sample 2: log 3 = 1.09861.
    assert ce(STUDENT, LABELS).item() == pytest.approx((0.40761 + 1.09861) / 2, abs=1e-4)


def test_dkd_matches_hand_computed_terms() -> None:
    # T = 1. Sample 1 (y = 2): b_t = (0.09003, 0.90997), b_s = (0.66524, 0.33476):
    #   TCKD = 0.09003 ln(0.09003/0.66524) + 0.90997 ln(0.90997/0.33476) = -0.18006 + 0.90997 = 0.72991;
    #   non-target classes {0, 1}: p_hat_t = softmax(3, 2) = (0.73106, 0.26894), p_hat_s its mirror:
    #   NCKD = (0.73106 - 0.26894) * ln(0.73106/0.26894) = 0.46212.
    # Sample 2 (y = 0): b_t = (0.78699, 0.21301), b_s = (1/3, 2/3):
    #   TCKD = 0.78699 * 0.85907 + 0.21301 * (-1.14094) = 0.43305; non-targets both uniform: NCKD = 0.
    # Means: TCKD 0.58148, NCKD 0.23106.
    assert dkd(STUDENT, TEACHER, LABELS, alpha=1.0, beta=0.0, temperature=1.0).item() == pytest.approx(
        0.58148, abs=1e-4
    )
    assert dkd(STUDENT, TEACHER, LABELS, alpha=0.0, beta=1.0, temperature=1.0).item() == pytest.approx(
        0.23106, abs=1e-4
    )
    assert dkd(STUDENT, TEACHER, LABELS, alpha=1.0, beta=8.0, temperature=1.0).item() == pytest.approx(
        0.58148 + 8 * 0.23106, abs=1e-3
    )
    # T^2 scaling, as in kd.
    t2 = dkd(STUDENT, TEACHER, LABELS, alpha=1.0, beta=1.0, temperature=2.0).item()
    assert t2 == pytest.approx(4 * dkd(STUDENT / 2, TEACHER / 2, LABELS, 1.0, 1.0, 1.0).item(), rel=1e-5)


def test_dkd_decomposes_kd_per_sample() -> None:
    # The paper's identity: KD = TCKD + (1 - p_t[y]) * NCKD, per sample.
    torch.manual_seed(0)
    s, t, y = torch.randn(1, 5), torch.randn(1, 5), torch.tensor([3])
    p_target = F.softmax(t, dim=-1)[0, 3].item()
    tckd = dkd(s, t, y, alpha=1.0, beta=0.0, temperature=1.0).item()
    nckd = dkd(s, t, y, alpha=0.0, beta=1.0, temperature=1.0).item()
    assert kd(s, t, temperature=1.0).item() == pytest.approx(tckd + (1 - p_target) * nckd, rel=1e-4)


def test_dkd_stays_finite_for_a_certain_teacher() -> None:
    certain = torch.tensor([[0.0, 0.0, 200.0]])
    loss = dkd(torch.zeros(1, 3, requires_grad=True), certain, torch.tensor([2]))
    assert torch.isfinite(loss)


def test_hint_loss_is_half_mean_squared_error() -> None:
    # diffs 1, 0, 0, -2 -> squares 1, 0, 0, 4 -> mean 1.25 -> half 0.625
    regressed = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.tensor([[0.0, 2.0], [3.0, 6.0]])
    assert hint_loss(regressed, teacher).item() == pytest.approx(0.625)
    with pytest.raises(ValueError, match="shapes differ"):
        hint_loss(regressed, teacher[:, :1])


def test_attention_transfer_matches_hand_value() -> None:
    # Student: one channel active at (0,0) -> Q_s = (1, 0, 0, 0). Teacher: two channels both
    # active at (0,1) -> mean_c A^2 = (0, 1, 0, 0) -> Q_t = (0, 1, 0, 0). Mean of (1, -1, 0, 0)^2 = 0.5.
    student = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    teacher = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]], [[0.0, 3.0], [0.0, 0.0]]]])
    assert attention_transfer(student, teacher).item() == pytest.approx(0.5)
    assert attention_transfer(teacher, teacher).item() == pytest.approx(0.0)


def test_attention_transfer_pools_the_larger_map() -> None:
    # A 4x4 map whose 2x2 quadrant averages equal the 2x2 teacher map gives no loss.
    teacher = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    student = teacher.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert attention_transfer(student, teacher).item() == pytest.approx(0.0, abs=1e-7)


def _cnn(channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(channels * 16, 3)
    )


def test_default_feature_layer_is_the_input_of_flatten_also_when_wrapped() -> None:
    model = _cnn(4)
    assert default_feature_layer(model) == "2"
    wrapper = nn.Sequential()
    wrapper.add_module("inner", model)
    assert default_feature_layer(wrapper) == "inner.2"
    with pytest.raises(ValueError, match="student_layer"):
        default_feature_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_capture_features_returns_named_outputs_and_removes_hooks() -> None:
    model = _cnn(4)
    out, feats = capture_features(model, {"2"}, torch.randn(5, 1, 8, 8))
    assert out.shape == (5, 3) and feats["2"].shape == (5, 4, 4, 4)
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(ValueError, match="valid names"):
        capture_features(model, {"nope"}, torch.randn(1, 1, 8, 8))


def test_objective_is_the_weighted_sum_and_reports_each_term() -> None:
    objective = build_objective(
        [
            LossTermConfig(name="kd", weight=0.9, params={"temperature": 2.0}),
            LossTermConfig(name="ce", weight=0.1),
        ]
    )
    total = objective(LossInputs(STUDENT, LABELS, TEACHER)).item()
    assert total == pytest.approx(0.9 * kd(STUDENT, TEACHER, 2.0).item() + 0.1 * ce(STUDENT, LABELS).item(), rel=1e-6)
    means = objective.epoch_means()
    assert means["loss_kd"] == pytest.approx(kd(STUDENT, TEACHER, 2.0).item(), rel=1e-6)
    assert objective.epoch_means() == {}  # reset


def test_ce_only_objective_needs_no_teacher() -> None:
    objective = build_objective([LossTermConfig(name="ce")])
    assert not objective.needs_teacher and not objective.needs_features
    assert torch.equal(objective(LossInputs(STUDENT, LABELS)), F.cross_entropy(STUDENT, LABELS))


def test_fitnets_trains_its_regressor_and_at_binds_on_cnn_pairs() -> None:
    student, teacher = _cnn(2), _cnn(6)
    objective = build_objective([LossTermConfig(name="fitnets"), LossTermConfig(name="at", weight=100.0)])
    x = torch.randn(4, 1, 8, 8)
    objective.bind(student, teacher, x)
    assert objective.feature_layers() == ({"2"}, {"2"})
    regressor = objective.terms[0].regressor
    assert isinstance(regressor, nn.Conv2d) and (regressor.in_channels, regressor.out_channels) == (2, 6)
    logits, s_feats = capture_features(student, {"2"}, x)
    with torch.no_grad():
        t_logits, t_feats = capture_features(teacher, {"2"}, x)
    loss = objective(LossInputs(logits, torch.zeros(4, dtype=torch.long), t_logits, s_feats, t_feats))
    loss.backward()
    assert regressor.weight.grad is not None and regressor.weight.grad.abs().sum() > 0
    first = student[0]
    assert isinstance(first, nn.Conv2d) and first.weight.grad is not None and first.weight.grad.abs().sum() > 0


def test_at_refuses_flat_features() -> None:
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))
    objective = build_objective([LossTermConfig(name="at")])
    with pytest.raises(ValueError, match="CNN"):
        objective.bind(mlp, mlp, torch.randn(2, 4))


@pytest.mark.parametrize(
    ("terms", "match"),
    [
        ([{"name": "hinton"}], r"distill.losses\[0\].name: unknown loss 'hinton'"),
        (
            [{"name": "ce"}, {"name": "kd", "params": {"temp": 4}}],
            r"distill.losses\[1\].params: \['temp'\] not accepted",
        ),
        ([{"name": "kd", "params": {"temperature": -1}}], r"distill.losses\[0\].params: temperature must be > 0"),
        ([{"name": "dkd", "params": {"beta": -2}}], r"distill.losses\[0\].params"),
    ],
)
def test_bad_terms_name_their_entry(terms: list[dict], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        build_objective([LossTermConfig(**t) for t in terms])


def test_describe() -> None:
    terms = [LossTermConfig(name="kd", weight=0.9, params={"temperature": 4}), LossTermConfig(name="ce", weight=0.1)]
    assert describe(terms) == "0.9*kd(temperature=4) + 0.1*ce"


def test_gradient_reaches_the_student_logits() -> None:
    student = STUDENT.clone().requires_grad_(True)
    kd(student, TEACHER, 4.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_fitnets_compares_maps_of_different_resolution_after_pooling() -> None:
    student = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 8 * 8, 3))  # 8x8 maps
    teacher = _cnn(6)  # 4x4 maps
    objective = build_objective([LossTermConfig(name="fitnets")])
    x = torch.randn(3, 1, 8, 8)
    objective.bind(student, teacher, x)
    logits, s_feats = capture_features(student, {"0"}, x)
    with torch.no_grad():
        t_logits, t_feats = capture_features(teacher, {"2"}, x)
    regressor = objective.terms[0].regressor
    assert isinstance(regressor, nn.Conv2d)
    pooled = F.adaptive_avg_pool2d(regressor(s_feats["0"]), (4, 4))
    expected = hint_loss(pooled, t_feats["2"])
    assert objective(
        LossInputs(logits, torch.zeros(3, dtype=torch.long), t_logits, s_feats, t_feats)
    ).item() == pytest.approx(expected.item())


def test_objective_names_are_re_exported_from_losses() -> None:
    """The combining machinery lives in kd_lib.train.objective; ``from kd_lib.train.losses import X``
    keeps working for it, and objective knows no named loss (it imports nothing from losses)."""
    import ast
    import inspect

    from kd_lib.train import losses, objective

    for name in ("LossInputs", "LossTerm", "Objective", "capture_features", "default_feature_layer", "describe"):
        assert getattr(losses, name) is getattr(objective, name)
    assert losses.as_params is objective.as_params
    imported = {
        node.module for node in ast.walk(ast.parse(inspect.getsource(objective))) if isinstance(node, ast.ImportFrom)
    }
    assert "kd_lib.train.losses" not in imported
