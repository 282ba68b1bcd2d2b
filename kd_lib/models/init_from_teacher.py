"""DistilBERT-style student initialization: a ``transformer`` student starts from its teacher's layers.

Sanh et al. (2019) initialize DistilBERT from BERT by taking one layer out of two: the student
starts where the teacher is, and distillation only has to close the gap left by the missing
layers. ``init_from_teacher`` copies, into a student of the same width:

* the embeddings (token, position and token-type tables: the student's first rows when its
  tables are shorter, e.g. a shorter ``max_length`` or a single token type; and the LayerNorm);
* transformer layer m of the student from teacher layer ``g(m) = m * N / M``
  (``kd_lib.models.transformer_layers.uniform_layer_map``): every other layer when the teacher
  is twice as deep (2, 4, ..., N), the same uniform map as the ``hidden_mse`` and
  ``attention_kl`` losses otherwise, so each student layer starts as the layer it is later
  aligned to;
* the pooler and the classification head, when their shapes match (same classes).

Works for kdflow's ``transformer`` and Hugging Face BERT teachers (``model_type`` bert: other
BERT-family models, RoBERTa for one, number their position embeddings differently), and for
DistilBERT teachers, whose layers hold BERT's weights under other names
(``kd_lib.models.transformer_layers.DISTILBERT``): DistilBERT has no token types, so the
student's token-type table starts at zero (its embeddings then sum as the teacher's), and its
head (a ReLU layer before the classifier, no pooler) is not BERT's, so neither is copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from kd_lib.config import ConfigError
from kd_lib.models.transformer_layers import BERT, Encoder, find_encoder, uniform_layer_map

# Widths that must be equal for a layer to be copied: (transformers config field, transformer param).
SAME_SHAPE = (("hidden_size", "hidden"), ("num_attention_heads", "heads"), ("intermediate_size", "intermediate"))
_OFF = "or set student.init_from_teacher: false"
# model_type of the teachers whose weights a BERT student can take (the student is kdflow's BERT).
TEACHER_TYPES = ("bert", "distilbert")
# A student's embedding tables a DistilBERT teacher has none of: zero, so they add nothing.
_NO_TOKEN_TYPES = frozenset({"token_type_embeddings.weight"})


def _encoder(model: nn.Module, role: str) -> Encoder:
    encoder = find_encoder(model)
    if encoder is None or encoder.config is None:
        raise ConfigError(
            f"student.init_from_teacher copies transformer layers, but the {role} ({type(model).__name__}) "
            "has no BERT-family encoder",
            f"use arch transformer for the student and a transformer or Hugging Face BERT teacher, {_OFF}",
        )
    return encoder


def _copy(
    dst: nn.Module,
    src: nn.Module,
    what: str,
    leading_rows: bool = False,
    rename: Callable[[str], str] | None = None,
    zeroed: frozenset[str] = frozenset(),
) -> None:
    """Copy ``src``'s state into ``dst`` tensor by tensor; ``leading_rows``: a shorter table takes
    the first rows; ``rename``: ``src``'s names as ``dst`` calls them; ``zeroed``: ``dst``'s
    tensors ``src`` has no counterpart of, set to zero."""
    source = {(rename(name) if rename else name): tensor for name, tensor in src.state_dict().items()}
    with torch.no_grad():
        for name, tensor in dst.state_dict().items():
            other = source.get(name)
            if other is None and name in zeroed:
                tensor.zero_()
                continue
            if other is None:
                raise ConfigError(
                    f"student.init_from_teacher: the teacher's {what} has no {name!r} "
                    f"(teacher {type(src).__name__}, student {type(dst).__name__})",
                    f"use a teacher of the BERT family, {_OFF}",
                )
            if other.shape == tensor.shape:
                tensor.copy_(other)
            elif leading_rows and other.shape[1:] == tensor.shape[1:] and other.shape[0] >= tensor.shape[0]:
                tensor.copy_(other[: tensor.shape[0]])
            else:
                raise ConfigError(
                    f"student.init_from_teacher: {what}.{name} is {tuple(tensor.shape)} in the student but "
                    f"{tuple(other.shape)} in the teacher",
                    f"give the student the teacher's vocabulary and at most its max_length, {_OFF}",
                )


def _head_path(encoder: Encoder) -> str:
    """The classification head beside the encoder's model: ``<parent of prefix>.classifier``."""
    parent = encoder.prefix.rpartition(".")[0]
    return f"{parent}.classifier" if parent else "classifier"


def _same_shapes(a: nn.Module | None, b: nn.Module | None) -> bool:
    if a is None or b is None:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> dict[str, Any]:
    """Initialize a transformer student from its teacher's weights, in place (DistilBERT).

    Reference:
        V. Sanh, L. Debut, J. Chaumond, T. Wolf. "DistilBERT, a distilled version of BERT:
        smaller, faster, cheaper and lighter". NeurIPS EMC^2 Workshop 2019, arXiv:1910.01108
        (section 3, student initialization).

    Args:
        student: A ``transformer`` student (``kd_lib.models.text.BertClassifier``).
        teacher: A ``transformer``, or a Hugging Face BERT or DistilBERT teacher; read only.

    Returns:
        What was copied: ``layer_map`` (``[[student, teacher], ...]``, 1-based), ``pooler`` and
        ``classifier`` (bool each).

    Raises:
        ConfigError: either model has no BERT encoder, hidden size, heads or
            intermediate size differ (naming the field and the value to set), or a table does
            not fit (a larger student vocabulary or max_length).
    """
    s_enc, t_enc = _encoder(student, "student"), _encoder(teacher, "teacher")
    for role, encoder, allowed in (("student", s_enc, ("bert",)), ("teacher", t_enc, TEACHER_TYPES)):
        # Other BERT-family models lay out their tables differently (RoBERTa's positions start
        # after the padding id): copying their rows into a BERT would misplace them.
        kind = getattr(encoder.config, "model_type", None)
        if kind not in allowed:
            raise ConfigError(
                f"student.init_from_teacher copies BERT weights, but the {role} is a {kind!r} model",
                f"use a BERT or DistilBERT teacher (model_type bert or distilbert, or arch transformer), {_OFF}",
            )
    for field, param in SAME_SHAPE:
        mine = getattr(s_enc.config, field)
        theirs = getattr(t_enc.config, t_enc.layout.intermediate if field == "intermediate_size" else field)
        if mine != theirs:
            raise ConfigError(
                f"student.init_from_teacher copies the teacher's layers, which needs the same {field}: "
                f"the student has {mine}, the teacher {theirs}",
                f"set student.model.params.{param}: {theirs}, {_OFF}",
            )
    s_modules, t_modules = dict(student.named_modules()), dict(teacher.named_modules())
    bert_teacher = t_enc.layout == BERT
    _copy(
        s_modules[s_enc.layer_path(0)],
        t_modules[t_enc.layer_path(0)],
        "embeddings",
        leading_rows=True,
        zeroed=frozenset() if bert_teacher else _NO_TOKEN_TYPES,
    )
    layer_map = uniform_layer_map(s_enc.depth, t_enc.depth)
    for m, g in layer_map:
        student_layer, teacher_layer = s_modules[s_enc.layer_path(m)], t_modules[t_enc.layer_path(g)]
        _copy(student_layer, teacher_layer, f"layer {g}", rename=t_enc.layout.bert_name)
    copied = {"layer_map": [list(pair) for pair in layer_map]}
    for part, s_path, t_path in (
        ("pooler", s_enc.sibling("pooler"), t_enc.sibling("pooler")),
        ("classifier", _head_path(s_enc), _head_path(t_enc)),
    ):
        dst, src = s_modules.get(s_path), t_modules.get(t_path)
        match = bert_teacher and _same_shapes(dst, src)
        if match:
            _copy(dst, src, part)  # type: ignore[arg-type]
        copied[part] = match  # type: ignore[assignment]
    return copied
