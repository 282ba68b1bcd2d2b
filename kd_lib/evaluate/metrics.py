"""Held-out metrics of a model and of its serialized artifact: quality, size, latency.

Everything runs on CPU: the quantized student only runs there, and the deployment target the
gates reason about is a CPU server.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from kd_lib.artifacts import SPEC_FILE
from kd_lib.artifacts.model_dir import PROVENANCE_FILES
from kd_lib.config import PREDICT_BATCH_SIZE
from kd_lib.data.lazy import Samples
from kd_lib.train.inference import compute_logits


def predict(model: nn.Module, x: Samples, batch_size: int = PREDICT_BATCH_SIZE, pad_id: int | None = None) -> Tensor:
    """Predicted class of every sample (eval mode, no grad, CPU).

    Args:
        model: Maps ``[B, *input_shape]`` to ``[B, C]`` logits.
        x: ``[N, *input_shape]`` float32 (text: int64 token ids).
        batch_size: Samples per forward pass (``PREDICT_BATCH_SIZE``: register verifies with the same).
        pad_id: Text data's padding id: batches are trimmed to their longest row.

    Returns:
        ``[N]`` int64 argmax labels.
    """
    return compute_logits(model, x, batch_size=batch_size, device="cpu", pad_id=pad_id).argmax(dim=1)


def _check_pair(pred: Tensor, y: Tensor) -> None:
    if pred.shape != y.shape or pred.dim() != 1:
        raise ValueError(f"pred and y must both be [N]; got {tuple(pred.shape)} and {tuple(y.shape)}")
    if len(y) == 0:
        raise ValueError("cannot score an empty set (N = 0)")


def accuracy(pred: Tensor, y: Tensor) -> float:
    """Fraction of ``pred`` ([N] int64) equal to ``y`` ([N] int64), in [0, 1]."""
    _check_pair(pred, y)
    return (pred == y).double().mean().item()


def _check_labels(pred: Tensor, y: Tensor, num_classes: int) -> None:
    _check_pair(pred, y)
    for name, t in (("pred", pred), ("y", y)):
        if t.min() < 0 or t.max() >= num_classes:
            raise ValueError(
                f"{name} has labels outside [0, {num_classes}): min {t.min().item()}, max {t.max().item()}"
            )


def confusion_matrix(pred: Tensor, y: Tensor, num_classes: int) -> list[list[int]]:
    """Counts ``m[true][predicted]``: rows are true classes, columns predicted classes.

    Args:
        pred: ``[N]`` int64 predicted labels in ``[0, num_classes)``.
        y: ``[N]`` int64 true labels in ``[0, num_classes)``.
        num_classes: C.

    Returns:
        A C x C nested list of ints (JSON-able, as KFP and MLflow want it).
    """
    # lazy: sklearn.metrics takes ~2 s to import; the steps that import this module for
    # predict/latency alone (quantize, inputs) should not pay it.
    from sklearn import metrics as skm

    _check_labels(pred, y, num_classes)
    # labels= fixes the C x C shape, absent classes included (checked above: nothing falls outside).
    cm = skm.confusion_matrix(y.cpu().numpy(), pred.cpu().numpy(), labels=np.arange(num_classes))
    return cm.tolist()


def macro_f1(pred: Tensor, y: Tensor, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in ``y`` or ``pred``.

    Per class, ``F1 = 2 TP / (2 TP + FP + FN)``, which equals ``2 P R / (P + R)`` and is 0 when
    precision and recall are both 0. Classes absent from both ``y`` and ``pred`` have no
    defined F1 and are left out of the mean rather than counted as 0 or 1.

    Args:
        pred: ``[N]`` int64 predicted labels.
        y: ``[N]`` int64 true labels.
        num_classes: C.

    Returns:
        Macro F1 in [0, 1].
    """
    # lazy: sklearn.metrics takes ~2 s to import (see confusion_matrix).
    from sklearn import metrics as skm

    _check_labels(pred, y, num_classes)
    # labels=None: scikit-learn averages over the classes present in y or pred, as documented
    # above. zero_division only applies to a class with 2 TP + FP + FN = 0, which is then
    # absent from both and never averaged; precision or recall alone being undefined (a class
    # only in pred, or only in y) does not matter, as F1 is computed from the counts directly.
    return float(skm.f1_score(y.cpu().numpy(), pred.cpu().numpy(), average="macro", zero_division=0.0))


def latency_ms(
    model: nn.Module,
    example: Tensor,
    batch_size: int,
    warmup: int,
    iters: int,
    threads: int = 1,
) -> dict[str, float]:
    """Wall-clock latency of one forward pass on CPU, in milliseconds.

    The thread count is pinned while timing (and restored afterwards) because latency varies
    with it more than between models; one thread mimics a CPU-limited serving container.

    Args:
        model: Maps ``[B, *input_shape]`` to ``[B, C]``.
        example: ``[1, *input_shape]`` one sample; repeated to ``batch_size`` rows.
        batch_size: Rows per timed forward pass.
        warmup: Untimed passes first (allocator, packed-weight caches).
        iters: Timed passes.
        threads: ``torch.set_num_threads`` while timing.

    Returns:
        ``{"p50": median_ms, "p95": p95_ms}`` over the timed passes.
    """
    if example.dim() < 1 or example.shape[0] != 1:
        raise ValueError(f"example must be [1, *input_shape], got {tuple(example.shape)}")
    if batch_size < 1 or iters < 1 or warmup < 0 or threads < 1:
        raise ValueError(
            "need batch_size >= 1, iters >= 1, warmup >= 0, threads >= 1; "
            f"got {batch_size}, {iters}, {warmup}, {threads}"
        )
    batch = example.cpu().expand(batch_size, *example.shape[1:]).contiguous()
    previous_threads, was_training = torch.get_num_threads(), model.training
    torch.set_num_threads(threads)
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(batch)
            for _ in range(iters):
                start = time.perf_counter()
                model(batch)
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous_threads)
        model.train(was_training)
    p50, p95 = np.percentile(times, [50, 95])
    return {"p50": float(p50), "p95": float(p95)}


def artifact_size_bytes(directory: str | Path, exclude: Sequence[str] = ()) -> int:
    """Total bytes of the files under ``directory`` (the serialized model as it ships).

    Args:
        directory: A saved model directory.
        exclude: File names left out of the sum; ``("spec.json",)`` gives the weights alone.

    Returns:
        Bytes. With nothing excluded this is ``size_bytes``, what the gate's size checks use:
        the weights file (or ``model.onnx``) plus ``spec.json``, whose few hundred bytes of
        provenance (validation numbers, calibration) are counted too, so a ratio to an fp32
        artifact is slightly pessimistic for the smaller model. ``selection.json`` (the quantize
        step's measurements of every candidate) is a record of how the model was chosen, not
        part of it, and is never counted.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory; expected a saved model directory")
    skip = {*exclude, *PROVENANCE_FILES}
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name not in skip)


def evaluate_model(
    model: nn.Module,
    x_test: Tensor,
    y_test: Tensor,
    num_classes: int,
    artifact_dir: str | Path,
    num_params: int,
    batch_sizes: Sequence[int] = (1, 64),
    warmup: int = 5,
    iters: int = 30,
    threads: int = 1,
) -> dict[str, Any]:
    """All test metrics of one model, as a flat JSON-able dict.

    Args:
        model: Maps ``[B, *input_shape]`` to ``[B, C]``; run on CPU.
        x_test: ``[N, *input_shape]`` float32.
        y_test: ``[N]`` int64.
        num_classes: C.
        artifact_dir: The model's saved directory; its byte size is reported.
        num_params: Parameter count, passed in because a dynamic-quantized model hides its
            weights from ``parameters()``; count the fp32 model.
        batch_sizes: Batch sizes to time.
        warmup: Untimed passes per batch size.
        iters: Timed passes per batch size.
        threads: CPU threads while timing.

    Returns:
        ``accuracy``, ``macro_f1``, ``size_bytes`` (every file of the artifact, what gates use),
        ``weights_bytes`` (the same without ``spec.json``), ``num_params``, ``latency_b{bs}_p50_ms`` and
        ``latency_b{bs}_p95_ms`` per batch size, ``predictions`` (list of N ints) and
        ``confusion_matrix`` (C x C, rows true).
    """
    pred = predict(model, x_test)
    metrics: dict[str, Any] = {
        "accuracy": accuracy(pred, y_test),
        "macro_f1": macro_f1(pred, y_test, num_classes),
        "size_bytes": artifact_size_bytes(artifact_dir),
        "weights_bytes": artifact_size_bytes(artifact_dir, exclude=(SPEC_FILE,)),
        "num_params": int(num_params),
    }
    for bs in batch_sizes:
        timing = latency_ms(model, x_test[:1], batch_size=bs, warmup=warmup, iters=iters, threads=threads)
        metrics[f"latency_b{bs}_p50_ms"] = timing["p50"]
        metrics[f"latency_b{bs}_p95_ms"] = timing["p95"]
    metrics["predictions"] = pred.tolist()
    metrics["confusion_matrix"] = confusion_matrix(pred, y_test, num_classes)
    return metrics


def _only_right(first: Tensor, second: Tensor, y: Tensor) -> tuple[int, int]:
    """The samples only ``first`` predicts correctly, and those only ``second`` does (the
    discordant pairs: where the two disagree and one of them is right)."""
    first_right, second_right = first == y, second == y
    return int((first_right & ~second_right).sum()), int((second_right & ~first_right).sum())


def agreement(reference: Tensor, other: Tensor, y: Tensor, num_classes: int) -> dict[str, Any]:
    """Where two models' predictions differ, and which of them was right there.

    Used to show where the student departs from its teacher: a student can match the
    teacher's accuracy while making different mistakes.

    Args:
        reference: ``[N]`` int64 predictions of the reference model (the teacher).
        other: ``[N]`` int64 predictions of the compared model (a student).
        y: ``[N]`` int64 true labels.
        num_classes: C.

    Returns:
        ``agreement`` (fraction of samples with equal predictions), ``n_disagree``,
        ``other_right`` (disagreements the other model got right), ``reference_right``,
        ``both_wrong``, and ``pairs``: C x C counts ``m[reference_pred][other_pred]`` over the
        disagreeing samples only (zero diagonal).
    """
    _check_pair(reference, y)
    _check_pair(other, y)
    differ = reference != other
    reference_right, other_right = _only_right(reference, other, y)
    pairs = [[0] * num_classes for _ in range(num_classes)]
    if differ.any():
        # confusion_matrix counts m[second][first]: here m[reference][other].
        pairs = confusion_matrix(other[differ], reference[differ], num_classes)
    return {
        "agreement": 1.0 - differ.double().mean().item(),
        "n_disagree": int(differ.sum()),
        "other_right": other_right,
        "reference_right": reference_right,
        "both_wrong": int((differ & (reference != y) & (other != y)).sum()),
        "pairs": pairs,
    }


def mcnemar_p_value(b: int, c: int) -> float:
    """Exact two-sided McNemar test for two classifiers scored on the same samples.

    ``b`` and ``c`` count the samples where only the first, or only the second, model is right
    (the samples both get right or both get wrong say nothing about which is better). Under
    the null hypothesis of equal accuracy each of the ``n = b + c`` discordant samples is a fair
    coin, so ``p = min(1, 2 * P[Binomial(n, 1/2) <= min(b, c)])``
    (McNemar 1947; the exact binomial form as in Edwards 1948 / Dietterich 1998).

    Args:
        b: Samples only the first model classifies correctly (>= 0).
        c: Samples only the second model classifies correctly (>= 0).

    Returns:
        The two-sided p-value in (0, 1]; 1.0 when the models never disagree in correctness.
    """
    # lazy: scipy.stats takes ~1 s to import; only evaluate's comparison with a no-KD baseline uses it.
    from scipy.stats import binomtest

    if b < 0 or c < 0:
        raise ValueError(f"counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0  # binomtest needs n >= 1; no discordant sample is no evidence at all
    # With p = 1/2 the distribution is symmetric, so scipy's two-sided p (every outcome no more
    # likely than the observed one) is the doubled tail above, capped at 1.
    return float(binomtest(min(b, c), n, 0.5, alternative="two-sided").pvalue)


def paired_gain(with_kd: Tensor, without: Tensor, y: Tensor) -> dict[str, Any]:
    """What the teacher bought, measured on the same test samples: the accuracy difference of
    the student trained with KD over the same student trained without it, and whether the
    test split can tell the two apart (exact McNemar test on the samples where exactly one of
    them is right).

    Args:
        with_kd: ``[N]`` int64 predictions of the distilled student.
        without: ``[N]`` int64 predictions of the no-KD baseline.
        y: ``[N]`` int64 true labels.

    Returns:
        ``gain_points`` (100 x accuracy difference), ``n`` (test samples), ``kd_only_right``,
        ``baseline_only_right``, ``p_value`` (two-sided) and ``significant`` (p < 0.05).
    """
    _check_pair(with_kd, y)
    _check_pair(without, y)
    b, c = _only_right(with_kd, without, y)
    p = mcnemar_p_value(b, c)
    return {
        "gain_points": 100.0 * (b - c) / len(y),
        "n": len(y),
        "kd_only_right": b,
        "baseline_only_right": c,
        "p_value": p,
        "significant": p < 0.05,
    }
