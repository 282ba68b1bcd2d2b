from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from kd_lib.evaluate.metrics import (
    accuracy,
    agreement,
    artifact_size_bytes,
    confusion_matrix,
    evaluate_model,
    latency_ms,
    macro_f1,
    mcnemar_p_value,
    paired_gain,
    predict,
)
from kd_lib.models.builders import mlp

# Four classes; class 3 never occurs in y or pred, so macro F1 averages classes 0-2 only.
Y = torch.tensor([0, 0, 0, 1, 1, 2])
PRED = torch.tensor([0, 0, 1, 1, 2, 2])


def test_accuracy() -> None:
    assert accuracy(PRED, Y) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="both be"):
        accuracy(PRED[:-1], Y)


def test_confusion_matrix_rows_are_true_classes() -> None:
    assert confusion_matrix(PRED, Y, 4) == [
        [2, 1, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 1, 0],
        [0, 0, 0, 0],
    ]
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 4)


def test_macro_f1_by_hand() -> None:
    # class 0: TP 2, FP 0, FN 1 -> P 1,   R 2/3 -> F1 0.8
    # class 1: TP 1, FP 1, FN 1 -> P 1/2, R 1/2 -> F1 0.5
    # class 2: TP 1, FP 1, FN 0 -> P 1/2, R 1   -> F1 2/3
    # class 3: absent from both -> excluded
    assert macro_f1(PRED, Y, 4) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_macro_f1_counts_a_class_with_zero_precision_and_recall_as_zero() -> None:
    # class 1 is predicted once but never correct: F1 0, included. class 0: P 1, R 1/2 -> 2/3.
    assert macro_f1(torch.tensor([1, 0]), torch.tensor([0, 0]), 3) == pytest.approx((2 / 3 + 0.0) / 2)
    assert macro_f1(Y, Y, 4) == pytest.approx(1.0)


def test_macro_f1_counts_a_true_class_never_predicted_as_zero() -> None:
    y, pred = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 0])
    # class 0: TP 1, FP 2, FN 0 -> 2/4; class 1: TP 1, FP 0, FN 1 -> 2/3; class 2: TP 0, FN 1 -> 0.
    assert macro_f1(pred, y, 3) == pytest.approx((0.5 + 2 / 3 + 0.0) / 3)
    assert confusion_matrix(pred, y, 3) == [[1, 0, 0], [1, 1, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match="outside"):
        macro_f1(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)


def test_predict_returns_int64_labels() -> None:
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3, 2))
        model.bias.zero_()
    pred = predict(model, torch.tensor([[5.0, 0.0], [0.0, 5.0], [-5.0, -5.0]]), batch_size=2)
    assert pred.dtype == torch.int64 and pred.tolist() == [0, 1, 2]


def test_latency_restores_threads_and_reports_percentiles() -> None:
    before = torch.get_num_threads()
    model = mlp((8,), 3, width=8, depth=1)
    timing = latency_ms(model, torch.randn(1, 8), batch_size=4, warmup=1, iters=5, threads=1)
    assert set(timing) == {"p50", "p95"}
    assert 0 < timing["p50"] <= timing["p95"]
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match=r"\[1, \*input_shape\]"):
        latency_ms(model, torch.randn(2, 8), batch_size=4, warmup=0, iters=1)


def test_artifact_size_counts_every_file(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 23)
    assert artifact_size_bytes(tmp_path) == 123
    (tmp_path / "spec.json").write_text("{}")
    assert artifact_size_bytes(tmp_path) == 125
    assert artifact_size_bytes(tmp_path, exclude=("spec.json",)) == 123
    with pytest.raises(FileNotFoundError, match="nope"):
        artifact_size_bytes(tmp_path / "nope")


def test_evaluate_model_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mlp((8,), 3, width=8, depth=1).eval()
    x, y = torch.randn(20, 8), torch.randint(0, 3, (20,))
    (tmp_path / "weights.bin").write_bytes(b"z" * 50)
    metrics = evaluate_model(model, x, y, 3, tmp_path, num_params=123, batch_sizes=(1, 4), warmup=1, iters=3)
    expected = {"accuracy", "macro_f1", "size_bytes", "weights_bytes", "num_params", "predictions", "confusion_matrix"}
    expected |= {f"latency_b{bs}_{p}_ms" for bs in (1, 4) for p in ("p50", "p95")}
    assert set(metrics) == expected
    assert metrics["size_bytes"] == metrics["weights_bytes"] == 50 and metrics["num_params"] == 123
    assert metrics["predictions"] == predict(model, x).tolist()
    assert metrics["accuracy"] == accuracy(predict(model, x), y)
    assert sum(map(sum, metrics["confusion_matrix"])) == 20


def test_agreement_counts_who_was_right_where_two_models_differ() -> None:
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    teacher = torch.tensor([0, 1, 2, 1, 1, 2])  # wrong on samples 3 and 5
    # Differs on 1 and 4 (teacher right), 3 (student right), 5 (both wrong).
    student = torch.tensor([0, 2, 2, 2, 0, 1])
    out = agreement(teacher, student, y, 3)
    assert out["agreement"] == pytest.approx(2 / 6)
    assert (out["n_disagree"], out["reference_right"], out["other_right"], out["both_wrong"]) == (4, 2, 1, 1)
    # pairs[teacher_pred][student_pred] over the 4 disagreeing samples only.
    assert out["pairs"] == [[0, 0, 0], [1, 0, 2], [0, 1, 0]]
    same = agreement(teacher, teacher, y, 3)
    assert same["agreement"] == 1.0 and same["n_disagree"] == 0 and same["pairs"] == [[0] * 3] * 3
    with pytest.raises(ValueError, match="both be"):
        agreement(teacher, student[:-1], y, 3)


def test_mcnemar_exact_p_values_match_hand_computed_binomial_tails() -> None:
    # n = 6 discordant samples split 5/1: 2 * (C(6,0) + C(6,1)) / 2^6 = 2 * 7 / 64.
    assert mcnemar_p_value(5, 1) == pytest.approx(14 / 64)
    assert mcnemar_p_value(1, 5) == pytest.approx(14 / 64)  # two-sided: symmetric
    # 10 against 0: 2 / 2^10, significant; an even split is as likely as can be (capped at 1).
    assert mcnemar_p_value(10, 0) == pytest.approx(2 / 1024)
    assert mcnemar_p_value(3, 3) == 1.0 and mcnemar_p_value(0, 0) == 1.0
    # n = 9 split 7/2: 2 * (C(9,0) + C(9,1) + C(9,2)) / 2^9 = 2 * 46 / 512.
    assert mcnemar_p_value(7, 2) == pytest.approx(92 / 512)
    # n = 9 split 4/5: the tail up to 4 is exactly half of the mass, so p = 1.
    assert mcnemar_p_value(4, 5) == pytest.approx(1.0)
    # n = 1: one discordant sample cannot tell anything (2 * 1/2).
    assert mcnemar_p_value(1, 0) == pytest.approx(1.0)
    # Large counts stay exact and finite (a 10,000-sample test split).
    assert 0.0 < mcnemar_p_value(600, 480) < 0.001
    with pytest.raises(ValueError, match="counts must be >= 0"):
        mcnemar_p_value(-1, 2)


def test_paired_gain_counts_only_the_samples_where_exactly_one_model_is_right() -> None:
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    kd = torch.tensor([0, 1, 2, 0, 1, 0, 1, 2])  # right on 0-4
    base = torch.tensor([0, 1, 0, 1, 2, 2, 2, 2])  # right on 0, 1, 5
    out = paired_gain(kd, base, y)
    # Only KD right on 2, 3, 4; only the baseline on 5; both wrong on 6 and 7.
    assert (out["kd_only_right"], out["baseline_only_right"], out["n"]) == (3, 1, 8)
    assert out["gain_points"] == pytest.approx(100 * (accuracy(kd, y) - accuracy(base, y)))
    assert out["p_value"] == pytest.approx(2 * (1 + 4) / 16) and out["significant"] is False
    same = paired_gain(kd, kd, y)
    assert same["gain_points"] == 0.0 and same["p_value"] == 1.0
    with pytest.raises(ValueError, match="both be"):
        paired_gain(kd[:-1], base, y)
