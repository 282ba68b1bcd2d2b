"""Distillation losses: the pure tensor math, and the named terms a config picks them by.

Two layers:

* Pure functions (``ce``, ``kd``, ``dkd``, ``hint_loss``, ``attention_transfer``): tensors in,
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

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lib.config import ConfigError, LossTermConfig
from kd_lib.plugins import Registry, UnknownNameError
from kd_lib.train.objective import (
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
    "AttentionTransferTerm",
    "CrossEntropyTerm",
    "DKDTerm",
    "FitNetsTerm",
    "KDTerm",
    "LossInputs",
    "LossTerm",
    "Objective",
    "as_params",
    "attention_map",
    "attention_transfer",
    "build_objective",
    "capture_features",
    "ce",
    "default_feature_layer",
    "describe",
    "dkd",
    "hint_loss",
    "kd",
]

# ---------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------


def ce(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of the student on the hard labels (the teacher plays no part).

    Args:
        student_logits: ``[B, C]`` float.
        labels: ``[B]`` int64 class indices.

    Returns:
        Scalar mean cross-entropy over the batch.
    """
    return F.cross_entropy(student_logits, labels)


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
