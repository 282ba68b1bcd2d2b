"""Distillation losses: the pure tensor math, and the named terms a config picks them by.

Two layers:

* Pure functions (``ce``, ``kd``, ``dkd``, ``hint_loss``, ``attention_transfer``, ``hidden_mse``,
  ``attention_kl``): tensors in,
  scalar out, formula and paper in the docstring, unit-tested against hand-computed values.
* One registered ``LossTerm`` per name in ``LOSSES`` wrapping a function with its parameters
  (and, for FitNets, the learned regressor); ``build_objective`` turns a config's
  ``distill.losses`` into their weighted sum.

How terms combine (``LossTerm``, ``LossInputs``, ``Objective``, feature capture, ``describe``,
``as_params``) lives in ``kd_lib.train.objective``; those names are re-exported here, so
``from kd_lib.train.losses import Objective`` keeps working.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lib.config import ConfigError, LossTermConfig
from kd_lib.models.transformer_layers import Encoder, find_encoder, is_self_attention, pad_id_of, uniform_layer_map
from kd_lib.plugins import Registry, UnknownNameError
from kd_lib.train.objective import (
    ATTENTION,
    HIDDEN,
    UNLABELED,
    LossInputs,
    LossTerm,
    Objective,
    as_params,
    capture_features,
    default_feature_layer,
    describe,
)

__all__ = [
    "LOSSES",
    "AttentionKLTerm",
    "AttentionTransferTerm",
    "CrossEntropyTerm",
    "DKDTerm",
    "FitNetsTerm",
    "HiddenMSETerm",
    "KDTerm",
    "LossInputs",
    "LossTerm",
    "Objective",
    "as_params",
    "attention_kl",
    "attention_map",
    "attention_transfer",
    "build_objective",
    "capture_features",
    "ce",
    "default_feature_layer",
    "describe",
    "dkd",
    "hidden_mse",
    "hint_loss",
    "kd",
]

# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def ce(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the student on the hard labels (the teacher plays no part).

    Samples labeled ``UNLABELED`` (-1: a transfer set's) are skipped: the mean runs over the
    labeled samples only, and a batch without any gives 0 (with a zero gradient, not NaN).

    Args:
        student_logits: ``[B, C]`` float.
        labels: ``[B]`` int64 class indices, or ``UNLABELED``.

    Returns:
        Scalar mean cross-entropy over the batch's labeled samples.
    """
    labeled = labels != UNLABELED
    if bool(labeled.all()):
        return F.cross_entropy(student_logits, labels)
    # sum / max(count, 1): 0 for an all-unlabeled batch, where cross_entropy's own mean is 0/0.
    summed = F.cross_entropy(student_logits[labeled], labels[labeled], reduction="sum")
    return summed / labeled.sum().clamp(min=1)


def _check_pair(student: Tensor, teacher: Tensor | None, what: str) -> Tensor:
    if teacher is None or teacher.shape != student.shape:
        got = None if teacher is None else tuple(teacher.shape)
        raise ValueError(f"{what} needs teacher logits of shape {tuple(student.shape)}, got {got}")
    return teacher


def _check_temperature(temperature: float) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Soft-target distillation loss of Hinton, Vinyals & Dean (2015).

    ``L = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over the batch.

    The gradient of the softened KL with respect to the student logits scales as ``1 / T^2``;
    multiplying by ``T^2`` keeps its magnitude comparable across temperatures and to the
    hard-label term it is mixed with (paper, section 2).

    Reference:
        G. Hinton, O. Vinyals, J. Dean. "Distilling the Knowledge in a Neural Network".
        NIPS Deep Learning Workshop, 2015. arXiv:1503.02531.

    Args:
        student_logits: ``[B, C]`` float ``z_s``.
        teacher_logits: ``[B, C]`` float ``z_t``, the teacher's logits for the same samples.
        temperature: Softmax temperature T > 0; larger T exposes more of the teacher's
            "dark knowledge" about which wrong classes are similar.

    Returns:
        Scalar loss.

    Raises:
        ValueError: T <= 0 or the logit shapes differ.
    """
    _check_temperature(temperature)
    teacher_logits = _check_pair(student_logits, teacher_logits, "kd")
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    # kl_div(input, target) computes KL(target || input); log_target avoids exp/log round trips.
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * temperature**2


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> Tensor:
    """Decoupled Knowledge Distillation (Zhao et al., 2022).

    Splits Hinton's KD into a target-class term and a non-target-class term and weights them
    separately, because in classical KD the non-target term (the "dark knowledge") is
    suppressed by the teacher's confidence on the target class::

        p = softmax(z / T)                       b = [p_y, 1 - p_y]  (binary: target vs rest)
        p_hat = softmax over the classes != y of z / T
        TCKD = KL(b_t || b_s)
        NCKD = KL(p_hat_t || p_hat_s)
        L = T^2 * (alpha * TCKD + beta * NCKD),  averaged over the batch

    The paper's defaults on CIFAR-100 are alpha = 1, beta = 8, T = 4.

    Reference:
        B. Zhao, Q. Cui, R. Song, Y. Qiu, J. Liang. "Decoupled Knowledge Distillation". CVPR 2022.
        arXiv:2203.08679.

    Args:
        student_logits: ``[B, C]`` float ``z_s``.
        teacher_logits: ``[B, C]`` float ``z_t``.
        labels: ``[B]`` int64 target classes ``y``.
        alpha: Weight of TCKD, >= 0.
        beta: Weight of NCKD, >= 0.
        temperature: Softmax temperature T > 0.

    Returns:
        Scalar loss.

    Raises:
        ValueError: T <= 0, a negative weight, fewer than 2 classes, or mismatched shapes.
    """
    _check_temperature(temperature)
    teacher_logits = _check_pair(student_logits, teacher_logits, "dkd")
    if alpha < 0 or beta < 0:
        raise ValueError(f"dkd weights must be >= 0, got alpha={alpha}, beta={beta}")
    if student_logits.shape[-1] < 2:
        raise ValueError("dkd needs at least 2 classes")
    target = F.one_hot(labels, student_logits.shape[-1]).bool()
    zs, zt = student_logits / temperature, teacher_logits / temperature
    ps, pt = F.softmax(zs, dim=-1), F.softmax(zt, dim=-1)

    def binary(p: Tensor) -> Tensor:  # [B, 2]: probability of the target class, of all the others
        p_target = (p * target).sum(dim=-1, keepdim=True)
        return torch.cat([p_target, 1.0 - p_target], dim=-1)

    eps = torch.finfo(ps.dtype).tiny  # keeps log(0) finite when the teacher is certain
    bs, bt = binary(ps), binary(pt)
    tckd = (bt * (torch.log(bt + eps) - torch.log(bs + eps))).sum(dim=-1).mean()
    # Removing the target logit (-inf) and renormalizing = softmax over the non-target classes.
    masked = torch.finfo(zs.dtype).min
    log_ps_hat = F.log_softmax(zs.masked_fill(target, masked), dim=-1)
    log_pt_hat = F.log_softmax(zt.masked_fill(target, masked), dim=-1)
    pt_hat = log_pt_hat.exp()
    nckd = (pt_hat * (log_pt_hat - log_ps_hat)).masked_fill(target, 0.0).sum(dim=-1).mean()
    return (alpha * tckd + beta * nckd) * temperature**2


def hint_loss(regressed_student: Tensor, teacher_features: Tensor) -> Tensor:
    """FitNets hint loss (Romero et al., 2015) on an already regressed student feature map.

    ``L = 1/2 * mean((r(v_s) - u_t)^2)``: the paper's ``1/2 ||u_h - r(v_g)||^2`` with the sum
    replaced by a mean over batch and elements, so the weight does not depend on the layer's
    size. The learned regressor ``r`` (``FitNetsTerm``) maps the student's guided layer to the
    teacher's hint layer's shape.

    Reference:
        A. Romero, N. Ballas, S. E. Kahou, A. Chassang, C. Gatta, Y. Bengio. "FitNets: Hints
        for Thin Deep Nets". ICLR 2015. arXiv:1412.6550.

    Args:
        regressed_student: ``[B, *S]`` the student's features after the regressor.
        teacher_features: ``[B, *S]`` the teacher's hint-layer features (no gradient needed).

    Returns:
        Scalar loss.
    """
    if regressed_student.shape != teacher_features.shape:
        raise ValueError(
            f"hint_loss shapes differ: student {tuple(regressed_student.shape)} "
            f"vs teacher {tuple(teacher_features.shape)}"
        )
    return 0.5 * (regressed_student - teacher_features).pow(2).mean()


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Spatial attention of a feature map: ``Q = normalize(mean_c |A_c|^p)``, flattened.

    Args:
        features: ``[B, C, H, W]`` activations.
        p: Exponent; 2 is the paper's choice.

    Returns:
        ``[B, H*W]`` rows of unit L2 norm.
    """
    if features.dim() != 4:
        raise ValueError(f"attention maps need [B, C, H, W] features, got shape {tuple(features.shape)}")
    return F.normalize(features.abs().pow(p).mean(dim=1).flatten(1), dim=1)


def attention_transfer(student_features: Tensor, teacher_features: Tensor, p: float = 2.0) -> Tensor:
    """Activation-based attention transfer (Zagoruyko & Komodakis, 2017).

    ``L = mean_b mean_j (Q_s[b, j] - Q_t[b, j])^2`` with ``Q = attention_map(A)``: the student
    learns *where* the teacher's layer is active, whatever the channel counts. When the two
    maps differ in spatial size, the larger one is average-pooled to the smaller one first.
    The paper weights it with beta / 2 = 500 against cross-entropy (per-element mean).

    Reference:
        S. Zagoruyko, N. Komodakis. "Paying More Attention to Attention: Improving the
        Performance of Convolutional Neural Networks via Attention Transfer". ICLR 2017.
        arXiv:1612.03928.

    Args:
        student_features: ``[B, Cs, Hs, Ws]``.
        teacher_features: ``[B, Ct, Ht, Wt]``.
        p: Exponent of the attention map.

    Returns:
        Scalar loss.
    """
    hs, ws = student_features.shape[-2:]
    ht, wt = teacher_features.shape[-2:]
    size = (min(hs, ht), min(ws, wt))
    if (hs, ws) != size:
        student_features = F.adaptive_avg_pool2d(student_features, size)
    if (ht, wt) != size:
        teacher_features = F.adaptive_avg_pool2d(teacher_features, size)
    return (attention_map(student_features, p) - attention_map(teacher_features, p)).pow(2).mean()


def hidden_mse(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """TinyBERT hidden-state distillation (Jiao et al., 2020) for one student/teacher layer pair.

    ``L = MSE(H_s W_h, H_t)`` over the real tokens: with ``D`` the teacher's width and ``P`` the
    set of unpadded positions (``mask`` true),
    ``L = 1 / (|P| * D) * sum_{(b, i) in P} sum_d (H_s W_h - H_t)[b, i, d]^2``. The caller
    applies the learned projection ``W_h`` (``HiddenMSETerm``: student width -> teacher width,
    identity when the widths are equal) before calling this.

    Reference:
        X. Jiao, Y. Yin, L. Shang, X. Jiang, X. Chen, L. Li, F. Wang, Q. Liu. "TinyBERT:
        Distilling BERT for Natural Language Understanding". Findings of EMNLP 2020,
        arXiv:1909.10351 (equation 9, hidden-states based distillation).

    Args:
        student_hidden: ``[B, L, D]`` the student's (projected) hidden states.
        teacher_hidden: ``[B, L, D]`` the teacher's hidden states of the mapped layer.
        mask: ``[B, L]`` bool, true at real tokens (``ids != pad_id``); None counts every position.

    Returns:
        Scalar loss.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"hidden_mse shapes differ: student {tuple(student_hidden.shape)} vs teacher {tuple(teacher_hidden.shape)}"
        )
    per_position = (student_hidden - teacher_hidden).pow(2).mean(dim=-1)  # [B, L]
    if mask is None:
        return per_position.mean()
    weights = mask.to(per_position.dtype)
    return (per_position * weights).sum() / weights.sum().clamp(min=1.0)


def masked_log_softmax(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """``log_softmax`` over the last axis (keys) of ``[B, H, L, L]`` scores, padded keys excluded.

    A padded key gets the lowest finite score, hence probability 0 (to float precision) and no NaN.
    """
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def attention_kl(student_log_probs: Tensor, teacher_log_probs: Tensor, mask: Tensor | None = None) -> Tensor:
    """MiniLM self-attention distribution transfer (Wang et al., 2020) for one layer pair.

    For each head ``a`` and query position ``t`` the attention of the query over the keys is a
    distribution ``A[a, t, :]``; the loss is the teacher-to-student KL per query, averaged over
    heads, then over the real (unpadded) query positions of the whole batch::

        L = 1 / (A_h |x|) * sum_a sum_t KL(A_t[a, t] || A_s[a, t]),
        KL(p || q) = sum_k p_k (log p_k - log q_k)   over the real keys k

    When teacher and student have different numbers of heads, there is no head-to-head pairing:
    each side's distributions are first averaged over its heads, ``Abar[t] = 1/H sum_a A[a, t]``
    (a mean of distributions is a distribution), and ``L = 1/|x| sum_t KL(Abar_t[t] || Abar_s[t])``.
    With equal head counts the paper's per-head form is used (by convexity of KL it is at least
    the head-averaged one).

    Reference:
        W. Wang, F. Wei, L. Dong, H. Bao, N. Yang, M. Zhou. "MiniLM: Deep Self-Attention
        Distillation for Task-Agnostic Compression of Pre-Trained Transformers". NeurIPS 2020,
        arXiv:2002.10957 (equation 4, self-attention distribution transfer).

    Args:
        student_log_probs: ``[B, Hs, L, L]`` log attention probabilities (query, key), e.g.
            ``masked_log_softmax`` of the scores.
        teacher_log_probs: ``[B, Ht, L, L]``.
        mask: ``[B, L]`` bool, true at real tokens; padded keys and queries are left out. None
            counts every position.

    Returns:
        Scalar loss.
    """
    s_shape, t_shape = student_log_probs.shape, teacher_log_probs.shape
    if student_log_probs.dim() != 4 or s_shape[0] != t_shape[0] or s_shape[2:] != t_shape[2:]:
        raise ValueError(f"attention_kl needs [B, H, L, L] maps of one batch and length; got {s_shape} and {t_shape}")
    if s_shape[1] != t_shape[1]:
        student_log_probs = torch.logsumexp(student_log_probs, dim=1, keepdim=True) - math.log(s_shape[1])
        teacher_log_probs = torch.logsumexp(teacher_log_probs, dim=1, keepdim=True) - math.log(t_shape[1])
    pointwise = teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)  # [B, H, L, L]
    if mask is None:
        return pointwise.sum(dim=-1).mean()
    keys = mask[:, None, None, :]
    per_query = torch.where(keys, pointwise, torch.zeros_like(pointwise)).sum(dim=-1).mean(dim=1)  # [B, L]
    weights = mask.to(per_query.dtype)
    return (per_query * weights).sum() / weights.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------
# Registered terms
# ---------------------------------------------------------------------------------------------


# kd_lib.plugins.PROVIDERS names this registry by module path (config lists its names that way).
LOSSES: Registry[type[LossTerm]] = Registry("loss")


@LOSSES.register("ce")
class CrossEntropyTerm(LossTerm):
    """``ce``: cross-entropy on the hard labels (no teacher)."""

    needs_teacher = False

    def forward(self, inputs: LossInputs) -> Tensor:
        return ce(inputs.student_logits, inputs.labels)


@LOSSES.register("kd")
class KDTerm(LossTerm):
    """``kd``: Hinton soft-target KL (``kd``). Params: ``temperature`` (default 4)."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        _check_temperature(float(temperature))
        self.temperature = float(temperature)

    def forward(self, inputs: LossInputs) -> Tensor:
        return kd(inputs.student_logits, inputs.teacher_logits, self.temperature)  # type: ignore[arg-type]


@LOSSES.register("dkd")
class DKDTerm(LossTerm):
    """``dkd``: Decoupled KD (``dkd``). Params: ``alpha`` (1), ``beta`` (8), ``temperature`` (4)."""

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        _check_temperature(float(temperature))
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta, self.temperature = float(alpha), float(beta), float(temperature)

    def forward(self, inputs: LossInputs) -> Tensor:
        return dkd(
            inputs.student_logits,
            inputs.teacher_logits,  # type: ignore[arg-type]
            inputs.labels,
            alpha=self.alpha,
            beta=self.beta,
            temperature=self.temperature,
        )


@LOSSES.register("fitnets")
class FitNetsTerm(LossTerm):
    """``fitnets``: hint loss through a learned regressor (``hint_loss``).

    Params: ``student_layer`` / ``teacher_layer`` (module names as in ``named_modules()``;
    default: each model's last feature map, the input of its ``Flatten``). The regressor is a
    1x1 convolution for ``[C, H, W]`` features and a linear layer for flat ones; it is trained
    with the student and discarded afterwards. Maps of different resolution are compared after
    average-pooling the larger one to the smaller one's size.
    """

    needs_features = True

    def __init__(self, student_layer: str | None = None, teacher_layer: str | None = None) -> None:
        super().__init__()
        self.student_layer, self.teacher_layer = student_layer, teacher_layer
        self.regressor: nn.Module | None = None

    def bind(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        if len(student_shape) == 3 and len(teacher_shape) == 3:
            self.regressor = nn.Conv2d(student_shape[0], teacher_shape[0], kernel_size=1)
        elif len(student_shape) == 1 and len(teacher_shape) == 1:
            self.regressor = nn.Linear(student_shape[0], teacher_shape[0])
        else:
            raise ValueError(
                "fitnets needs both layers to be [C, H, W] maps or both flat vectors; "
                f"got {student_shape} and {teacher_shape}"
            )

    def forward(self, inputs: LossInputs) -> Tensor:
        if self.regressor is None:
            raise RuntimeError("FitNetsTerm.bind must run before the first batch (Objective.bind does it)")
        student = self.regressor(inputs.student_features[self.student_layer])  # type: ignore[index]
        teacher = inputs.teacher_features[self.teacher_layer]  # type: ignore[index]
        if student.dim() == 4 and student.shape[-2:] != teacher.shape[-2:]:
            # Maps of different resolution: average-pool the larger to the smaller (as `at` does).
            size = (min(student.shape[-2], teacher.shape[-2]), min(student.shape[-1], teacher.shape[-1]))
            student, teacher = F.adaptive_avg_pool2d(student, size), F.adaptive_avg_pool2d(teacher, size)
        return hint_loss(student, teacher)


@LOSSES.register("at")
class AttentionTransferTerm(LossTerm):
    """``at``: attention transfer (``attention_transfer``) for CNN pairs.

    Params: ``p`` (2), ``student_layer`` / ``teacher_layer`` (default: last feature maps).
    """

    needs_features = True

    def __init__(self, p: float = 2.0, student_layer: str | None = None, teacher_layer: str | None = None) -> None:
        super().__init__()
        self.p = float(p)
        self.student_layer, self.teacher_layer = student_layer, teacher_layer

    def bind(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        if len(student_shape) != 3 or len(teacher_shape) != 3:
            raise ValueError(
                f"at needs [C, H, W] feature maps (a CNN student and teacher); got {student_shape} and {teacher_shape}"
            )

    def forward(self, inputs: LossInputs) -> Tensor:
        return attention_transfer(
            inputs.student_features[self.student_layer],  # type: ignore[index]
            inputs.teacher_features[self.teacher_layer],  # type: ignore[index]
            self.p,
        )


LayerRef = int | str

_TRANSFORMER_FIX = (
    "use arch transformer for the student (and a transformer or Hugging Face BERT-family teacher), "
    "or remove the term from distill.losses (fitnets reads one layer of any architecture)"
)


def _layer_pairs(name: str, layers: Any) -> list[tuple[LayerRef, LayerRef]] | None:
    """Check a ``layers`` param: None, or ``[[student, teacher], ...]`` of layer numbers or module paths."""
    if layers is None:
        return None
    if not isinstance(layers, (list, tuple)) or not layers:
        raise ValueError(f"{name}: layers must be a non-empty list of [student, teacher] pairs, got {layers!r}")
    pairs: list[tuple[LayerRef, LayerRef]] = []
    for pair in layers:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{name}: each entry of layers is a [student, teacher] pair, got {pair!r}")
        for ref in pair:
            if isinstance(ref, bool) or not isinstance(ref, (int, str)) or (isinstance(ref, int) and ref < 0):
                raise ValueError(
                    f"{name}: a layer is a number >= 0 (0: embeddings, m: the m-th transformer layer) "
                    f"or a module path, got {ref!r}"
                )
        pairs.append((pair[0], pair[1]))
    return pairs


def _encoders(name: str, student: nn.Module, teacher: nn.Module) -> tuple[Encoder, Encoder]:
    """Both models' transformer encoders, or a ConfigError naming the term and the fix."""
    found = []
    for role, model in (("student", student), ("teacher", teacher)):
        encoder = find_encoder(model)
        if encoder is None:
            raise ConfigError(
                f"loss {name!r} distills transformer layers, but the {role} ({type(model).__name__}) "
                "has no BERT-family encoder (encoder.layer.N with attention.self, or DistilBERT's "
                "transformer.layer.N with attention)",
                _TRANSFORMER_FIX,
            )
        found.append(encoder)
    return found[0], found[1]


def _resolve_pairs(
    name: str,
    pairs: list[tuple[LayerRef, LayerRef]] | None,
    encoders: tuple[Encoder, Encoder],
    path_of: str,
) -> list[tuple[str, str]]:
    """Module paths of each (student, teacher) pair: numbers through the encoders, paths as given.

    ``path_of``: ``"layer_path"`` (hidden states) or ``"attention_path"`` (self-attention).
    """
    student, teacher = encoders
    chosen = pairs if pairs is not None else uniform_layer_map(student.depth, teacher.depth)
    resolved = []
    for s_ref, t_ref in chosen:
        paths = []
        for role, ref, encoder in (("student", s_ref, student), ("teacher", t_ref, teacher)):
            if isinstance(ref, str):
                paths.append(ref)
                continue
            try:
                paths.append(getattr(encoder, path_of)(ref))
            except ValueError as err:
                raise ConfigError(f"loss {name!r}: params.layers {[s_ref, t_ref]}: {role} {err}") from None
        resolved.append((paths[0], paths[1]))
    return resolved


def _token_mask(inputs: LossInputs, pad_id: int | None) -> Tensor | None:
    """``[B, L]`` true at real tokens (``ids != pad_id``), or None (no ids or no padding id)."""
    ids = inputs.inputs
    if ids is None or pad_id is None or ids.dim() != 2 or ids.dtype.is_floating_point:
        return None
    return ids != pad_id


class _LayerPairsTerm(LossTerm):
    """A term over (student, teacher) transformer layer pairs: the ``layers`` param (default the
    uniform map), their module paths resolved through both models' encoders, and the student's
    padding id for the token mask. Subclasses name the term, the ``Encoder`` method that gives
    a layer's module path (``path_of``) and the feature suffix they read (``suffix``)."""

    needs_features = True
    term_name: ClassVar[str]
    path_of: ClassVar[str]
    suffix: ClassVar[str]

    def __init__(self, layers: list[list[LayerRef]] | None = None) -> None:
        super().__init__()
        self.pairs_param = _layer_pairs(self.term_name, layers)
        self.pairs: list[tuple[str, str]] = []
        self.pad_id: int | None = None

    def resolve(self, student: nn.Module, teacher: nn.Module) -> None:
        encoders = _encoders(self.term_name, student, teacher)
        paths = _resolve_pairs(self.term_name, self.pairs_param, encoders, self.path_of)
        self.check_paths(paths, student, teacher)
        self.pairs = [(s + self.suffix, t + self.suffix) for s, t in paths]
        self.pad_id = pad_id_of(student)

    def check_paths(self, paths: list[tuple[str, str]], student: nn.Module, teacher: nn.Module) -> None:
        """Refuse resolved module paths the term cannot read (default: any will do)."""

    def features(self) -> tuple[set[str], set[str]]:
        return {s for s, _ in self.pairs}, {t for _, t in self.pairs}


@LOSSES.register("hidden_mse")
class HiddenMSETerm(_LayerPairsTerm):
    """``hidden_mse``: TinyBERT hidden-state distillation (``hidden_mse``) over a layer mapping.

    Params: ``layers``, ``[[student, teacher], ...]`` pairs of layer numbers (0: the embedding
    layer's output, m: the m-th transformer layer, 1-based) or module paths; default TinyBERT's
    uniform map ``m -> m * N / M`` over the M student layers
    (``kd_lib.models.transformer_layers.uniform_layer_map``). The loss is the mean of
    ``hidden_mse`` over the pairs, padding masked out. When the widths differ, one learned
    ``W_h`` (a bias-free linear map, student width -> teacher width) is shared by every pair, as
    in the paper; with equal widths there is none (identity). Both models must be BERT-family
    transformers (kdflow's ``transformer`` or a Hugging Face teacher).
    """

    term_name, path_of, suffix = "hidden_mse", "layer_path", HIDDEN

    def __init__(self, layers: list[list[LayerRef]] | None = None) -> None:
        super().__init__(layers)
        self.projection: nn.Linear | None = None

    def bind_features(self, student: dict[str, Tensor], teacher: dict[str, Tensor]) -> None:
        widths = {(student[s].shape[-1], teacher[t].shape[-1]) for s, t in self.pairs}
        if len(widths) != 1:
            raise ConfigError(
                f"loss 'hidden_mse': the mapped layers have several (student, teacher) widths {sorted(widths)}; "
                "one W_h needs one width per side",
                "map layers of one width on each side (params.layers)",
            )
        s_width, t_width = widths.pop()
        self.projection = nn.Linear(s_width, t_width, bias=False) if s_width != t_width else None

    def forward(self, inputs: LossInputs) -> Tensor:
        mask = _token_mask(inputs, self.pad_id)
        values = []
        for s, t in self.pairs:
            student = inputs.student_features[s]
            if self.projection is not None:
                student = self.projection(student)
            values.append(hidden_mse(student, inputs.teacher_features[t], mask))
        return torch.stack(values).mean()


@LOSSES.register("attention_kl")
class AttentionKLTerm(_LayerPairsTerm):
    """``attention_kl``: MiniLM self-attention distribution transfer (``attention_kl``) over a layer mapping.

    Params: ``layers``, ``[[student, teacher], ...]`` transformer layer numbers (1-based) or
    module paths of self-attention modules (``...attention.self``; DistilBERT's ``...attention``);
    default the uniform map ``m -> m * N / M``. Each layer's attention probabilities are recomputed from the
    self-attention's input with its own query/key projections (``softmax(Q K^T / sqrt(d))``
    over the real keys: no attention dropout, any attention implementation); the loss is the
    mean of ``attention_kl`` over the pairs. Different head counts compare head-averaged
    distributions (see ``attention_kl``). Nothing is learned.
    """

    term_name, path_of, suffix = "attention_kl", "attention_path", ATTENTION

    def check_paths(self, paths: list[tuple[str, str]], student: nn.Module, teacher: nn.Module) -> None:
        for (s_path, t_path), pair in zip(paths, self.pairs_param or [], strict=False):
            for role, model, path in (("student", student, s_path), ("teacher", teacher, t_path)):
                module = dict(model.named_modules()).get(path)
                if module is not None and not is_self_attention(module):
                    raise ConfigError(
                        f"loss 'attention_kl': params.layers {list(pair)}: the {role}'s {path!r} is a "
                        f"{type(module).__name__}, not a self-attention (query and key projections)",
                        "name a layer by number, or a module path ending in attention.self (DistilBERT: attention)",
                    )

    def bind_features(self, student: dict[str, Tensor], teacher: dict[str, Tensor]) -> None:
        """Nothing to learn; the probe has already checked that every module is a self-attention."""

    def forward(self, inputs: LossInputs) -> Tensor:
        mask = _token_mask(inputs, self.pad_id)
        values = [
            attention_kl(
                masked_log_softmax(inputs.student_features[s], mask),
                masked_log_softmax(inputs.teacher_features[t], mask),
                mask,
            )
            for s, t in self.pairs
        ]
        return torch.stack(values).mean()


def build_objective(terms: list[LossTermConfig], where: str = "distill.losses") -> Objective:
    """Build the objective from config, naming the entry that is wrong.

    Raises:
        ConfigError: an unknown loss name, or params the loss does not accept or rejects.
    """
    built: list[tuple[str, float, LossTerm]] = []
    for i, spec in enumerate(terms):
        try:
            cls = LOSSES.get(spec.name)
        except UnknownNameError as err:
            raise ConfigError(f"{where}[{i}].name: {err}") from None
        accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        unknown = sorted(set(spec.params) - set(accepted))
        if unknown:
            raise ConfigError(
                f"{where}[{i}].params: {unknown} not accepted by loss {spec.name!r}; accepted: {accepted or 'none'}"
            )
        try:
            built.append((spec.name, spec.weight, cls(**spec.params)))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}[{i}].params: {err}") from None
    return Objective(built)
