"""Distillation losses: pure tensor math, and the registry a config names them from.

Two layers:

* Pure functions (``ce``, ``kd``, ``dkd``, ``hint_loss``, ``attention_transfer``): tensors in,
  scalar out, formula and paper in the docstring, unit-tested against hand-computed values.
* One ``LossTerm`` module per registered name wrapping a function with its parameters (and,
  for FitNets, the learned regressor). ``Objective`` is the weighted sum a config describes::

      distill:
        losses:
          - {name: kd, weight: 0.9, params: {temperature: 4}}
          - {name: ce, weight: 0.1}

The training loop builds ``LossInputs`` per batch (student logits, labels, and whatever the
terms need: teacher logits from the cache or a live teacher, intermediate feature maps) and
calls the objective; the terms never see the models or the data pipeline.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lib.config import ConfigError, LossTermConfig
from kd_lib.plugins import Registry, UnknownNameError

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
            f"hint_loss shapes differ: student {tuple(regressed_student.shape)} vs teacher {tuple(teacher_features.shape)}"
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
# Registered terms and the weighted objective
# ---------------------------------------------------------------------------------------------


@dataclass
class LossInputs:
    """What one batch offers the loss terms.

    Attributes:
        student_logits: ``[B, C]``.
        labels: ``[B]`` int64.
        teacher_logits: ``[B, C]`` or None when no term needs the teacher.
        student_features: Layer name -> student activations captured during the forward pass.
        teacher_features: Layer name -> teacher activations.
    """

    student_logits: Tensor
    labels: Tensor
    teacher_logits: Tensor | None = None
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)


class LossTerm(nn.Module):
    """Base of every registered loss: parameters in ``__init__``, one batch in ``forward``.

    Class attributes tell the training loop what to compute: ``needs_teacher`` (teacher
    logits), ``needs_features`` (intermediate feature maps of both models, hence a live teacher).
    Feature terms name their layers (``student_layer``, ``teacher_layer``); None means the
    model's default feature layer, resolved by ``Objective.bind``.
    """

    needs_teacher: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False
    student_layer: str | None = None
    teacher_layer: str | None = None

    def bind(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        """Create learnable parts from the per-sample feature shapes (FitNets' regressor)."""

    def forward(self, inputs: LossInputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


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
            inputs.teacher_logits,
            inputs.labels,  # type: ignore[arg-type]
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
                f"fitnets needs both layers to be [C, H, W] maps or both flat vectors; got {student_shape} and {teacher_shape}"
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


def default_feature_layer(model: nn.Module) -> str:
    """Name of the module whose output is the model's last feature map: the one before its Flatten.

    Searches nested containers too, so a model wrapped for quantization or input
    normalization (``QuantWrapper(model)`` -> ``"module.3"``) resolves the same layer.

    Raises:
        ValueError: the model has no ``nn.Flatten`` preceded by a sibling layer; name one in
            the term's ``student_layer`` / ``teacher_layer`` params instead.
    """
    for prefix, parent in model.named_modules():
        children = list(parent.named_children())
        for i, (_, child) in enumerate(children):
            if isinstance(child, nn.Flatten) and i > 0:
                return f"{prefix}.{children[i - 1][0]}" if prefix else children[i - 1][0]
    raise ValueError(
        f"{type(model).__name__} has no Flatten after a feature layer to default to; set the loss term's "
        "student_layer/teacher_layer params to module names from model.named_modules()"
    )


class Objective(nn.Module):
    """The weighted sum of loss terms a config describes.

    Holds the terms as submodules, so learnable parts (FitNets' regressor) are trained with
    the student (pass ``objective.parameters()`` to the optimizer) and checkpointed with it.

    Args:
        terms: ``(name, weight, term)`` triples; zero-weight terms are kept (they are logged)
            but not computed.
    """

    def __init__(self, terms: list[tuple[str, float, LossTerm]]) -> None:
        super().__init__()
        if not terms:
            raise ValueError("an objective needs at least one loss term")
        self.names = [name for name, _, _ in terms]
        self.weights = [float(w) for _, w, _ in terms]
        self.terms = nn.ModuleList([term for _, _, term in terms])
        # Per-term sums over the batches since the last ``epoch_means()``, kept as tensors: an
        # ``.item()`` per batch would synchronize a GPU every step.
        self._sums: dict[str, Tensor] = {}
        self._count = 0

    def _active(self) -> list[tuple[str, float, LossTerm]]:
        return [(n, w, t) for n, w, t in zip(self.names, self.weights, self.terms) if w > 0]  # type: ignore[misc]

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for _, _, t in self._active())

    @property
    def needs_features(self) -> bool:
        return any(t.needs_features for _, _, t in self._active())

    def feature_layers(self) -> tuple[set[str], set[str]]:
        """(student layer names, teacher layer names) the active terms read; call after ``bind``."""
        active = [t for _, _, t in self._active() if t.needs_features]
        return {t.student_layer for t in active}, {t.teacher_layer for t in active}  # type: ignore[misc]

    def bind(self, student: nn.Module, teacher: nn.Module | None, sample: Tensor) -> None:
        """Resolve default layer names and create learnable parts from one forward pass.

        Args:
            student: The student (its mode and weights are not changed).
            teacher: The teacher, required when a term needs it.
            sample: ``[b, *input_shape]`` a few training inputs, on the models' device.
        """
        if self.needs_teacher and teacher is None:
            raise ValueError(f"loss terms {self.names} need a teacher, but none was given")
        feature_terms = [t for _, _, t in self._active() if t.needs_features]
        if not feature_terms:
            return
        for term in feature_terms:
            term.student_layer = term.student_layer or default_feature_layer(student)
            term.teacher_layer = term.teacher_layer or default_feature_layer(teacher)  # type: ignore[arg-type]
        s_layers, t_layers = self.feature_layers()
        with torch.no_grad():
            s_feats = capture_features(student, s_layers, sample)[1]
            t_feats = capture_features(teacher, t_layers, sample)[1]  # type: ignore[arg-type]
        for term in feature_terms:
            term.bind(tuple(s_feats[term.student_layer].shape[1:]), tuple(t_feats[term.teacher_layer].shape[1:]))
        self.to(sample.device)

    def forward(self, inputs: LossInputs) -> Tensor:
        """Weighted sum of the active terms on one batch: a scalar to backpropagate."""
        total: Tensor | None = None
        batch = len(inputs.labels)
        for name, weight, term in self._active():
            value = term(inputs)
            key = f"loss_{name}"
            self._sums[key] = self._sums.get(key, 0.0) + value.detach() * batch  # type: ignore[operator]
            total = weight * value if total is None else total + weight * value
        self._count += batch
        return total  # type: ignore[return-value]

    def epoch_means(self) -> dict[str, float]:
        """Mean of each (unweighted) term per sample since the last call, e.g. ``{"loss_kd": 0.31}``; resets."""
        means = {k: float(v) / self._count for k, v in self._sums.items()} if self._count else {}
        self._sums, self._count = {}, 0
        return means

    def epoch_sums(self) -> tuple[dict[str, float], int]:
        """(sum of each term over the samples since the last call, number of samples); resets.

        What ranks of a multi-process run add up before dividing, instead of ``epoch_means``.
        """
        sums, count = {k: float(v) for k, v in self._sums.items()}, self._count
        self._sums, self._count = {}, 0
        return sums, count

    @contextlib.contextmanager
    def untracked(self) -> Iterator[None]:
        """Forward passes inside are left out of the epoch's sums (a zero-weighted stand-in batch)."""
        sums, count = dict(self._sums), self._count
        try:
            yield
        finally:
            self._sums, self._count = sums, count


def capture_features(model: nn.Module, layers: set[str], x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``model(x)`` and return its output plus the outputs of the named submodules.

    Forward hooks are removed again, whatever happens.

    Raises:
        ValueError: a layer name is not a submodule of the model (lists the valid names).
    """
    modules = dict(model.named_modules())
    missing = sorted(n for n in layers if n not in modules)
    if missing:
        valid = [n for n in modules if n]
        raise ValueError(f"no layer(s) {missing} in {type(model).__name__}; valid names: {valid}")
    captured: dict[str, Tensor] = {}
    handles = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out))
        for name in layers
    ]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, captured


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


def describe(terms: list[LossTermConfig]) -> str:
    """``"0.9*kd(temperature=4) + 0.1*ce"``: the objective in one line, for logs and reports."""
    parts = []
    for spec in terms:
        args = ",".join(f"{k}={v}" for k, v in sorted(spec.params.items()))
        parts.append(f"{spec.weight:g}*{spec.name}" + (f"({args})" if args else ""))
    return " + ".join(parts)


def as_params(terms: list[LossTermConfig]) -> dict[str, Any]:
    """Flat MLflow params of the objective, e.g. ``{"loss.0.kd.weight": 0.9, "loss.0.kd.temperature": 4}``."""
    out: dict[str, Any] = {"objective": describe(terms)}
    for i, spec in enumerate(terms):
        out[f"loss.{i}.{spec.name}.weight"] = spec.weight
        out |= {f"loss.{i}.{spec.name}.{k}": v for k, v in spec.params.items()}
    return out
