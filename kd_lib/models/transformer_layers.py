"""The layers of a BERT-family encoder inside a kdflow text model, found by module path.

Both kdflow's own ``transformer`` (``kd_lib.models.text.BertClassifier``: layers at
``bert.bert.encoder.layer.N``) and a Hugging Face teacher (``kd_lib.models.huggingface``'s
``SequenceClassifier`` around e.g. ``BertForSequenceClassification``: ``model.bert.encoder.layer.N``)
hold one ``nn.ModuleList`` whose path ends in ``encoder.layer``, with the embeddings beside the
encoder (``...embeddings``) and each layer's self-attention at ``attention.self`` (``query`` and
``key`` projections, ``num_attention_heads``). What reads or writes those layers (the
``hidden_mse`` and ``attention_kl`` losses, ``init_from_teacher``) finds them here.

Layers are numbered as in TinyBERT: 0 is the embedding layer's output, ``m`` (1-based) the
output of the m-th transformer layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from torch import Tensor, nn

_LAYER_LIST = "encoder.layer"


@dataclass(frozen=True)
class Encoder:
    """Where a model's encoder lives.

    Attributes:
        prefix: Path of the module holding ``embeddings`` and ``encoder`` (``"bert.bert"``), "" at the root.
        depth: Number of transformer layers N.
        config: The transformers configuration of the encoder (``hidden_size``, ...), or None.
    """

    prefix: str
    depth: int
    config: Any

    def _path(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def layer_path(self, index: int) -> str:
        """Module path of layer ``index`` (0: the embeddings; m >= 1: the m-th transformer layer)."""
        if not 0 <= index <= self.depth:
            raise ValueError(f"layer {index} is out of range: this encoder has layers 0 (embeddings) to {self.depth}")
        return self._path("embeddings") if index == 0 else self._path(f"{_LAYER_LIST}.{index - 1}")

    def attention_path(self, index: int) -> str:
        """Module path of the self-attention of transformer layer ``index`` (1-based)."""
        if not 1 <= index <= self.depth:
            raise ValueError(f"attention layer {index} is out of range: this encoder has layers 1 to {self.depth}")
        return self._path(f"{_LAYER_LIST}.{index - 1}.attention.self")

    def sibling(self, name: str) -> str:
        """Path of a module beside the encoder (``"pooler"``, ``"embeddings"``)."""
        return self._path(name)


def find_encoder(model: nn.Module) -> Encoder | None:
    """The one BERT-family encoder inside ``model``, or None when it has none (an LSTM, a CNN).

    Raises:
        ValueError: the model holds more than one ``encoder.layer`` list.
    """
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and (name == _LAYER_LIST or name.endswith("." + _LAYER_LIST))
        and len(module) > 0
        and all(is_self_attention(getattr(getattr(layer, "attention", None), "self", None)) for layer in module)
    ]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{type(model).__name__} holds several encoders ({', '.join(n for n, _ in found)})")
    name, layers = found[0]
    prefix = name[: -len(_LAYER_LIST)].rstrip(".")
    owner = model.get_submodule(prefix) if prefix else model
    return Encoder(prefix=prefix, depth=len(layers), config=getattr(owner, "config", None))


def is_self_attention(module: Any) -> bool:
    """A BERT-style self-attention: ``query`` and ``key`` linear projections and a head count."""
    return (
        isinstance(module, nn.Module)
        and isinstance(getattr(module, "query", None), nn.Linear)
        and isinstance(getattr(module, "key", None), nn.Linear)
        and isinstance(getattr(module, "num_attention_heads", None), int)
    )


def uniform_layer_map(student_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    """TinyBERT's uniform mapping ``g(m) = m * N / M``: student layer m -> teacher layer g(m).

    For M student and N teacher layers (1-based); ``m * N // M`` when N is not a multiple of M,
    and at least 1 (a student deeper than its teacher maps several layers to one). The last
    student layer always maps to the last teacher layer.

    Returns:
        ``[(1, g(1)), ..., (M, g(M))]``.
    """
    if student_depth < 1 or teacher_depth < 1:
        raise ValueError(f"layer maps need encoders of >= 1 layer, got {student_depth} and {teacher_depth}")
    return [(m, max(1, m * teacher_depth // student_depth)) for m in range(1, student_depth + 1)]


def pad_id_of(model: nn.Module) -> int | None:
    """The padding id a text model masks (its or a submodule's ``pad_id`` attribute), or None."""
    for module in model.modules():
        value = getattr(module, "pad_id", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def hidden_output(output: Any) -> Tensor:
    """A layer's hidden states ``[B, L, D]`` from its forward output (a tensor, or a tuple led by one)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, Tensor) or output.dim() != 3:
        got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"expected hidden states [B, L, D] from the layer, got {got}")
    return output


def attention_scores(module: nn.Module, hidden: Tensor) -> Tensor:
    """The pre-softmax self-attention scores ``Q K^T / sqrt(d_head)`` of a BERT self-attention.

    Recomputed from the module's input with its own ``query``/``key`` projections, whatever
    attention implementation the model runs (sdpa returns no probabilities; eager returns them
    after attention dropout). No mask is applied: the caller masks padded keys.

    Args:
        module: A self-attention (``is_self_attention``).
        hidden: ``[B, L, D]`` the module's input hidden states.

    Returns:
        ``[B, H, L, L]`` scores (query position, key position).
    """
    heads = cast(int, module.num_attention_heads)
    batch, length, _ = hidden.shape
    query = module.query(hidden).view(batch, length, heads, -1).transpose(1, 2)  # type: ignore[operator]
    key = module.key(hidden).view(batch, length, heads, -1).transpose(1, 2)  # type: ignore[operator]
    scale = getattr(module, "scaling", query.shape[-1] ** -0.5)
    return (query @ key.transpose(-1, -2)) * float(scale)
