"""How loss terms combine into what the student minimizes: the ``LossTerm`` interface, the
inputs a batch offers the terms, their weighted sum (``Objective``) and feature capture.

The named losses themselves (formulas and their registered terms) are in
``kd_lib.train.losses``; this module knows none of them, so any registered term plugs in.
``Objective`` is the weighted sum a config describes::

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
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kd_lib.config import LossTermConfig
from kd_lib.models.transformer_layers import attention_scores, hidden_output

# A feature name is a module path (its forward output, as it is), or a module path with one of
# these suffixes: "@hidden", the hidden states [B, L, D] of a transformer layer (the first
# element of a tuple output); "@attention", the pre-softmax self-attention scores [B, H, L, L]
# recomputed from a BERT self-attention module's input (kd_lib.models.transformer_layers).
HIDDEN, ATTENTION = "@hidden", "@attention"


# The label of an unlabeled sample (a transfer-set sample, ``distill.transfer_source``): terms
# that read labels skip it (``ce``), the teacher terms learn from it like from any other.
UNLABELED = -1


@dataclass
class LossInputs:
    """What one batch offers the loss terms.

    Attributes:
        student_logits: ``[B, C]``.
        labels: ``[B]`` int64; ``UNLABELED`` (-1) for samples without a label (a transfer set).
        teacher_logits: ``[B, C]`` or None when no term needs the teacher.
        student_features: Layer name -> student activations captured during the forward pass.
        teacher_features: Layer name -> teacher activations.
        inputs: The batch both models saw, ``[B, *input_shape]`` (text: ``[B, L]`` int64 ids,
            from which the transformer terms mask padding), or None.
    """

    student_logits: Tensor
    labels: Tensor
    teacher_logits: Tensor | None = None
    student_features: dict[str, Tensor] = field(default_factory=dict)
    teacher_features: dict[str, Tensor] = field(default_factory=dict)
    inputs: Tensor | None = None


class LossTerm(nn.Module):
    """Base of every registered loss: parameters in ``__init__``, one batch in ``forward``.

    Class attributes tell the training loop what to compute: ``needs_teacher`` (teacher
    logits), ``needs_features`` (intermediate feature maps of both models, hence a live teacher).
    Feature terms name their layers (``student_layer``, ``teacher_layer``); None means the
    model's default feature layer, resolved by ``Objective.bind``. A term reading several
    layers (the transformer terms) overrides ``resolve``, ``features`` and ``bind_features``.
    """

    needs_teacher: ClassVar[bool] = True
    needs_features: ClassVar[bool] = False
    student_layer: str | None = None
    teacher_layer: str | None = None

    def resolve(self, student: nn.Module, teacher: nn.Module) -> None:
        """Name the features this term reads, from the two models (before any forward pass).

        The default: ``student_layer`` / ``teacher_layer``, each model's default feature layer when None.
        """
        self.student_layer = self.student_layer or default_feature_layer(student)
        self.teacher_layer = self.teacher_layer or default_feature_layer(teacher)

    def features(self) -> tuple[set[str], set[str]]:
        """(student feature names, teacher feature names) this term reads; after ``resolve``."""
        return {self.student_layer}, {self.teacher_layer}  # type: ignore[arg-type]

    def bind_features(self, student: dict[str, Tensor], teacher: dict[str, Tensor]) -> None:
        """Create learnable parts from one probe batch's features; the default calls ``bind``."""
        s_layer, t_layer = self.student_layer, self.teacher_layer
        assert s_layer is not None and t_layer is not None  # set by resolve
        self.bind(tuple(student[s_layer].shape[1:]), tuple(teacher[t_layer].shape[1:]))

    def bind(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...]) -> None:
        """Create learnable parts from the per-sample feature shapes (FitNets' regressor)."""

    def forward(self, inputs: LossInputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def default_feature_layer(model: nn.Module) -> str:
    """Name of the module whose output is the model's last feature map: the one before its Flatten.

    A module that declares its own (a ``feature_layer`` string attribute naming a submodule,
    e.g. ``kd_lib.models.resnet.ResNet``: ``"layer3"``) is taken at its word. Searches nested
    containers too, so a model wrapped for quantization or input normalization
    (``QuantWrapper(model)`` -> ``"module.3"``) resolves the same layer.

    Raises:
        ValueError: the model has no ``nn.Flatten`` preceded by a sibling layer; name one in
            the term's ``student_layer`` / ``teacher_layer`` params instead.
    """
    for prefix, module in model.named_modules():
        declared = getattr(module, "feature_layer", None)
        if isinstance(declared, str):
            return f"{prefix}.{declared}" if prefix else declared
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
        return [(n, w, t) for n, w, t in zip(self.names, self.weights, self.terms, strict=True) if w > 0]  # type: ignore[misc]

    @property
    def needs_teacher(self) -> bool:
        return any(t.needs_teacher for _, _, t in self._active())

    @property
    def needs_features(self) -> bool:
        return any(t.needs_features for _, _, t in self._active())

    def feature_layers(self) -> tuple[set[str], set[str]]:
        """(student layer names, teacher layer names) the active terms read; call after ``bind``."""
        student: set[str] = set()
        teacher: set[str] = set()
        for _, _, term in self._active():
            if term.needs_features:
                s_names, t_names = term.features()
                student |= s_names
                teacher |= t_names
        return student, teacher

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
            term.resolve(student, teacher)  # type: ignore[arg-type]
        s_layers, t_layers = self.feature_layers()
        # A probe, not a training step: in eval mode, or a train-mode BatchNorm would fold this
        # sample into its running statistics (the teacher's are frozen; the student's are not
        # the probe's to move).
        with torch.no_grad(), eval_mode(student, teacher):  # type: ignore[arg-type]
            s_feats = capture_features(student, s_layers, sample)[1]
            t_feats = capture_features(teacher, t_layers, sample)[1]  # type: ignore[arg-type]
        for term in feature_terms:
            term.bind_features(s_feats, t_feats)
        self.to(sample.device)

    def forward(self, inputs: LossInputs) -> Tensor:
        """Weighted sum of the active terms on one batch: a scalar to backpropagate."""
        total: Tensor | None = None
        batch = len(inputs.labels)
        for name, weight, term in self._active():
            value = term(inputs)
            key = f"loss_{name}"
            self._sums[key] = self._sums.get(key, 0.0) + value.detach() * batch
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


@contextlib.contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put the models in eval mode inside the block and restore each submodule's own flag after.

    For forward passes that must not change a model: a train-mode BatchNorm updates its
    running statistics on every forward, ``torch.no_grad`` or not, and Dropout draws from the RNG.
    """
    flags = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def capture_features(model: nn.Module, layers: set[str], x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Run ``model(x)`` and return its output plus the features of the named submodules.

    A name is a module path (its output), or a path with the suffix ``@hidden`` (a transformer
    layer's hidden states) or ``@attention`` (a self-attention's scores, see ``ATTENTION``).
    Forward hooks are removed again, whatever happens.

    Raises:
        ValueError: a layer name is not a submodule of the model (lists the valid names).
    """
    modules = dict(model.named_modules())

    def path(name: str) -> str:
        return name.removesuffix(HIDDEN).removesuffix(ATTENTION)

    missing = sorted(n for n in layers if path(n) not in modules)
    if missing:
        valid = [n for n in modules if n]
        raise ValueError(f"no layer(s) {missing} in {type(model).__name__}; valid names: {valid}")
    captured: dict[str, Tensor] = {}

    def hook(name: str) -> Any:
        def store(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if name.endswith(HIDDEN):
                captured[name] = hidden_output(out)
            elif name.endswith(ATTENTION):
                hidden = args[0] if args else kwargs["hidden_states"]
                captured[name] = attention_scores(module, hidden)
            else:
                captured[name] = out

        return store

    handles = [modules[path(name)].register_forward_hook(hook(name), with_kwargs=True) for name in layers]
    try:
        out = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return out, captured


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
