"""The layers of a BERT-family encoder inside a kdflow text model, found by module path.

Two layouts (``LAYOUTS``) are known:

* BERT's, which kdflow's own ``transformer`` (``kd_lib.models.text.BertClassifier``: layers at
  ``bert.bert.encoder.layer.N``) and Hugging Face BERT, RoBERTa, ELECTRA... teachers
  (``kd_lib.models.huggingface``'s ``SequenceClassifier``: ``model.bert.encoder.layer.N``) share:
  one ``nn.ModuleList`` whose path ends in ``encoder.layer``, each layer's self-attention at
  ``attention.self`` (``query`` and ``key`` projections, ``num_attention_heads``);
* DistilBERT's (``model.distilbert.transformer.layer.N``, self-attention at ``attention``:
  ``q_lin``, ``k_lin``, ``n_heads``).

In both, the embeddings sit beside the layer list's parent (``...embeddings``). What reads or
writes those layers (the ``hidden_mse`` and ``attention_kl`` losses, ``init_from_teacher``)
finds them here.

Layers are numbered as in TinyBERT: 0 is the embedding layer's output, ``m`` (1-based) the
output of the m-th transformer layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from torch import Tensor, nn


@dataclass(frozen=True)
class Layout:
    """How one family of encoders names its parts.

    Attributes:
        name: The family (``"bert"``, ``"distilbert"``).
        layers: Path suffix of the ``nn.ModuleList`` of transformer layers.
        attention: Path of a layer's self-attention, inside the layer.
        query: The self-attention's query projection (an ``nn.Linear``).
        key: Its key projection.
        heads: Its attribute holding the number of heads.
        as_bert: ``(own, BERT's)`` prefixes of a layer's parameter names, where they differ:
            what a BERT layer's weights are called here (``init_from_teacher`` copies by them).
        intermediate: Its configuration's field for the feed-forward width.
    """

    name: str
    layers: str
    attention: str
    query: str
    key: str
    heads: str
    as_bert: tuple[tuple[str, str], ...] = ()
    intermediate: str = "intermediate_size"

    def bert_name(self, name: str) -> str:
        """A layer parameter's name as a BERT layer calls it (``attention.q_lin.weight`` ->
        ``attention.self.query.weight``)."""
        for own, bert in self.as_bert:
            if name.startswith(own + "."):
                return bert + name[len(own) :]
        return name


BERT = Layout("bert", "encoder.layer", "attention.self", "query", "key", "num_attention_heads")
DISTILBERT = Layout(
    "distilbert",
    "transformer.layer",
    "attention",
    "q_lin",
    "k_lin",
    "n_heads",
    as_bert=(
        ("attention.q_lin", "attention.self.query"),
        ("attention.k_lin", "attention.self.key"),
        ("attention.v_lin", "attention.self.value"),
        ("attention.out_lin", "attention.output.dense"),
        ("sa_layer_norm", "attention.output.LayerNorm"),
        ("ffn.lin1", "intermediate.dense"),
        ("ffn.lin2", "output.dense"),
        ("output_layer_norm", "output.LayerNorm"),
    ),
    intermediate="hidden_dim",
)
LAYOUTS = (BERT, DISTILBERT)


@dataclass(frozen=True)
class Encoder:
    """Where a model's encoder lives.

    Attributes:
        prefix: Path of the module holding ``embeddings`` and the layer list's parent
            (``"bert.bert"``), "" at the root.
        depth: Number of transformer layers N.
        config: The transformers configuration of the encoder (``hidden_size``, ...), or None.
        layout: How its parts are named.
    """

    prefix: str
    depth: int
    config: Any
    layout: Layout = BERT

    def _path(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def layer_path(self, index: int) -> str:
        """Module path of layer ``index`` (0: the embeddings; m >= 1: the m-th transformer layer)."""
        if not 0 <= index <= self.depth:
            raise ValueError(f"layer {index} is out of range: this encoder has layers 0 (embeddings) to {self.depth}")
        return self._path("embeddings") if index == 0 else self._path(f"{self.layout.layers}.{index - 1}")

    def attention_path(self, index: int) -> str:
        """Module path of the self-attention of transformer layer ``index`` (1-based)."""
        if not 1 <= index <= self.depth:
            raise ValueError(f"attention layer {index} is out of range: this encoder has layers 1 to {self.depth}")
        return self._path(f"{self.layout.layers}.{index - 1}.{self.layout.attention}")

    def sibling(self, name: str) -> str:
        """Path of a module beside the encoder (``"pooler"``, ``"embeddings"``)."""
        return self._path(name)


def _is_layer_list(name: str, module: nn.Module, layout: Layout) -> bool:
    return (
        isinstance(module, nn.ModuleList)
        and (name == layout.layers or name.endswith("." + layout.layers))
        and len(module) > 0
        and all(_layout_of(_submodule(layer, layout.attention)) == layout for layer in module)
    )


def _submodule(module: nn.Module, path: str) -> nn.Module | None:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def find_encoder(model: nn.Module) -> Encoder | None:
    """The one BERT-family encoder inside ``model``, or None when it has none (an LSTM, a CNN).

    Raises:
        ValueError: the model holds more than one transformer layer list.
    """
    found = [
        (name, len(module), layout)
        for name, module in model.named_modules()
        for layout in LAYOUTS
        if _is_layer_list(name, module, layout)
    ]
    if not found:
        return None
    if len(found) > 1:
        raise ValueError(f"{type(model).__name__} holds several encoders ({', '.join(n for n, _, _ in found)})")
    name, depth, layout = found[0]
    prefix = name[: -len(layout.layers)].rstrip(".")
    owner = model.get_submodule(prefix) if prefix else model
    return Encoder(prefix=prefix, depth=depth, config=getattr(owner, "config", None), layout=layout)


def _layout_of(module: Any) -> Layout | None:
    """The layout whose self-attention ``module`` is (query and key linear projections and a head count)."""
    if not isinstance(module, nn.Module):
        return None
    for layout in LAYOUTS:
        if (
            isinstance(getattr(module, layout.query, None), nn.Linear)
            and isinstance(getattr(module, layout.key, None), nn.Linear)
            and isinstance(getattr(module, layout.heads, None), int)
        ):
            return layout
    return None


def is_self_attention(module: Any) -> bool:
    """A BERT-style self-attention of a known layout: query and key linear projections and a head count."""
    return _layout_of(module) is not None


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
    """The pre-softmax self-attention scores ``Q K^T / sqrt(d_head)`` of a BERT-family self-attention.

    Recomputed from the module's input with its own query and key projections, whatever
    attention implementation the model runs (sdpa returns no probabilities; eager returns them
    after attention dropout). No mask is applied: the caller masks padded keys.

    Args:
        module: A self-attention (``is_self_attention``).
        hidden: ``[B, L, D]`` the module's input hidden states.

    Returns:
        ``[B, H, L, L]`` scores (query position, key position).
    """
    layout = _layout_of(module)
    if layout is None:
        raise ValueError(f"{type(module).__name__} is not a self-attention of a known layout")
    heads = cast(int, getattr(module, layout.heads))
    batch, length, _ = hidden.shape
    query = getattr(module, layout.query)(hidden).view(batch, length, heads, -1).transpose(1, 2)
    key = getattr(module, layout.key)(hidden).view(batch, length, heads, -1).transpose(1, 2)
    scale = getattr(module, "scaling", query.shape[-1] ** -0.5)
    return (query @ key.transpose(-1, -2)) * float(scale)
