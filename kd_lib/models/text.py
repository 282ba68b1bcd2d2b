"""Text classifiers behind the ``model`` registry: token ids in, logits out.

Every builder here has the signature ``(input_shape=(max_length,), num_classes, *,
vocab_size, pad_id, **params)``. The step that builds a model injects ``vocab_size`` and
``pad_id`` from the dataset's ``meta.text`` (``kd_lib.steps.common.model_params``), and the
model's spec records them with the other parameters, so a saved model rebuilds from its spec.

A text model maps int64 ids ``[B, L]`` (any ``L <= max_length``: batches are trimmed to their
longest row, ``kd_lib.train.inference.trim_padding``) to ``[B, C]`` logits and builds its own
attention mask, ``ids != pad_id``: padding never changes a sample's logits. Feature layers are
named by module path as for any model (``encoder.layer.1`` of ``transformer``, ``lstm`` of
``bilstm``, ``convs.0`` of ``textcnn``).

- ``transformer``: a BERT-family encoder (``transformers.BertForSequenceClassification`` built
  from a ``BertConfig``, random weights: nothing is downloaded) classifying from ``[CLS]``.
- ``bilstm``: embedding, bidirectional LSTM, masked mean and max pooling, linear head.
- ``textcnn``: embedding, parallel 1-d convolutions of several widths, masked max pooling over
  time, linear head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from transformers import BertConfig

# The names kd_lib.models.builders registers these builders under (it imports this module:
# importing builders from here would be a cycle).
ARCHS = ("transformer", "bilstm", "textcnn")


def _at_least(name: str, value: Any, low: int) -> int:
    # bool is an int subclass; `hidden: true` in YAML is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _positive_int(name: str, value: Any) -> int:
    return _at_least(name, value, 1)


def _dropout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {value!r}")
    return float(value)


def _max_length(input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 1:
        raise ValueError(
            f"text models take token ids of shape (max_length,), got input_shape {tuple(input_shape)}; "
            "set data.text_column to prepare text data"
        )
    return _positive_int("max_length", input_shape[0])


def _vocabulary(vocab_size: Any, pad_id: Any) -> tuple[int, int]:
    vocab = _positive_int("vocab_size", vocab_size)
    pad = _at_least("pad_id", pad_id, 0)
    if pad >= vocab:
        raise ValueError(f"pad_id {pad} is outside the vocabulary of {vocab} ids")
    return vocab, pad


class BertClassifier(nn.Module):
    """``BertForSequenceClassification`` taking token ids alone: ``forward(ids) -> logits``.

    The attention mask is ``ids != pad_id``; token types are all 0 (one segment).

    Attributes:
        pad_id: The padding id the mask removes.
        bert: The wrapped ``BertForSequenceClassification`` (``bert.encoder.layer.N`` are its layers).
    """

    def __init__(self, config: BertConfig, pad_id: int) -> None:
        # lazy: transformers takes seconds to import; only a transformer model needs it.
        from transformers import BertForSequenceClassification

        super().__init__()
        self.pad_id = pad_id
        self.bert = BertForSequenceClassification(config)

    def forward(self, ids: Tensor) -> Tensor:
        """``[B, L]`` int64 ids -> ``[B, C]`` float32 logits."""
        mask = (ids != self.pad_id).long()
        return self.bert(input_ids=ids, attention_mask=mask).logits


def transformer(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    vocab_size: int,
    pad_id: int,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 2,
    intermediate: int = 128,
    dropout: float = 0.1,
) -> BertClassifier:
    """A small BERT encoder with a classification head on ``[CLS]``, randomly initialized.

    Args:
        input_shape: ``(max_length,)``: the position embeddings' size.
        num_classes: Number of output logits C.
        vocab_size: Rows of the token embedding (the tokenizer's vocabulary).
        pad_id: The padding id (masked out; its embedding row stays zero).
        layers: Encoder layers.
        hidden: Width of every layer; a multiple of ``heads``.
        heads: Attention heads per layer.
        intermediate: Width of each feed-forward block.
        dropout: Dropout of hidden states, attention weights and the head.

    Returns:
        A ``BertClassifier`` mapping ``[B, L]`` int64 ids (``L <= max_length``) to ``[B, C]`` logits.
    """
    max_length = _max_length(input_shape)
    vocab, pad = _vocabulary(vocab_size, pad_id)
    for name, value in (("num_classes", num_classes), ("layers", layers), ("hidden", hidden), ("heads", heads)):
        _positive_int(name, value)
    _positive_int("intermediate", intermediate)
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    rate = _dropout(dropout)
    # lazy: transformers takes seconds to import; only a transformer model needs it.
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        hidden_dropout_prob=rate,
        attention_probs_dropout_prob=rate,
        classifier_dropout=rate,
        max_position_embeddings=max_length,
        type_vocab_size=1,
        pad_token_id=pad,
    )
    config.num_labels = num_classes
    # Eager attention: plain MatMul/Softmax, which torch.onnx exports and ORT's dynamic int8 quantizes.
    config._attn_implementation = "eager"
    return BertClassifier(config, pad)


def _masked_max(values: Tensor, mask: Tensor) -> Tensor:
    """Max over time of ``values`` ``[B, L, D]`` where ``mask`` ``[B, L, 1]`` is 1."""
    return values.masked_fill(mask == 0, torch.finfo(values.dtype).min).max(dim=1).values


class BiLstmClassifier(nn.Module):
    """Embedding -> bidirectional LSTM -> [masked mean ; masked max] over time -> dropout -> linear.

    Padding sits at the end of each row (right-padded), so the forward direction never reads
    it before a real token; the backward direction starts on the padding, and an all-pad
    suffix would change its state: the sequence is packed with the true lengths so neither
    direction sees padding.
    """

    def __init__(
        self, vocab: int, pad: int, num_classes: int, embedding: int, hidden: int, layers: int, rate: float
    ) -> None:
        super().__init__()
        self.pad_id = pad
        self.embedding = nn.Embedding(vocab, embedding, padding_idx=pad)
        between = rate if layers > 1 else 0.0  # LSTM dropout acts between stacked layers only
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True, bidirectional=True, dropout=between)
        self.dropout = nn.Dropout(rate)
        self.head = nn.Linear(4 * hidden, num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        """``[B, L]`` int64 ids -> ``[B, C]`` float32 logits."""
        mask = (ids != self.pad_id).unsqueeze(-1).to(torch.float32)  # [B, L, 1]
        lengths = mask.sum(dim=1).squeeze(-1).clamp(min=1).to(torch.int64)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embedding(ids), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.lstm(packed)
        states, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        mean = (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        pooled = torch.cat([mean, _masked_max(states, mask)], dim=1)
        return self.head(self.dropout(pooled))


def bilstm(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    vocab_size: int,
    pad_id: int,
    embedding: int = 64,
    hidden: int = 64,
    layers: int = 1,
    dropout: float = 0.1,
) -> BiLstmClassifier:
    """A bidirectional LSTM over token embeddings, pooled by masked mean and max.

    Args:
        input_shape: ``(max_length,)``.
        num_classes: Number of output logits C.
        vocab_size: Rows of the token embedding.
        pad_id: The padding id (masked out of the LSTM and the pooling).
        embedding: Embedding width.
        hidden: LSTM units per direction.
        layers: Stacked LSTM layers.
        dropout: Dropout between LSTM layers and before the head.

    Returns:
        A ``BiLstmClassifier`` mapping ``[B, L]`` int64 ids to ``[B, C]`` logits. Not exportable
        to ONNX (packed sequences): use the torch schemes (``dynamic_int8``) for it.
    """
    _max_length(input_shape)
    vocab, pad = _vocabulary(vocab_size, pad_id)
    for name, value in (("num_classes", num_classes), ("embedding", embedding), ("hidden", hidden)):
        _positive_int(name, value)
    _positive_int("layers", layers)
    return BiLstmClassifier(vocab, pad, num_classes, embedding, hidden, layers, _dropout(dropout))


class TextCnnClassifier(nn.Module):
    """Embedding -> parallel Conv1d of several widths -> ReLU -> masked max over time -> linear.

    Rows shorter than the widest kernel are fine: the convolutions pad ``width // 2`` on both
    sides and keep the length (odd widths), and the padding positions are masked out of the max.
    """

    def __init__(
        self, vocab: int, pad: int, num_classes: int, embedding: int, widths: Sequence[int], channels: int, rate: float
    ) -> None:
        super().__init__()
        self.pad_id = pad
        self.embedding = nn.Embedding(vocab, embedding, padding_idx=pad)
        self.convs = nn.ModuleList(nn.Conv1d(embedding, channels, w, padding=w // 2) for w in widths)
        self.dropout = nn.Dropout(rate)
        self.head = nn.Linear(channels * len(widths), num_classes)

    def forward(self, ids: Tensor) -> Tensor:
        """``[B, L]`` int64 ids -> ``[B, C]`` float32 logits."""
        mask = (ids != self.pad_id).unsqueeze(-1).to(torch.float32)  # [B, L, 1]
        x = (self.embedding(ids) * mask).transpose(1, 2)  # [B, E, L]
        pooled = [_masked_max(torch.relu(conv(x)).transpose(1, 2), mask) for conv in self.convs]
        return self.head(self.dropout(torch.cat(pooled, dim=1)))


def textcnn(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    vocab_size: int,
    pad_id: int,
    embedding: int = 64,
    kernel_sizes: Sequence[int] = (3, 5),
    channels: int = 64,
    dropout: float = 0.1,
) -> TextCnnClassifier:
    """Kim-style CNN for sentence classification: convolutions of several widths over embeddings.

    Args:
        input_shape: ``(max_length,)``.
        num_classes: Number of output logits C.
        vocab_size: Rows of the token embedding.
        pad_id: The padding id (zeroed before the convolutions, masked out of the pooling).
        embedding: Embedding width.
        kernel_sizes: Odd convolution widths, one branch each.
        channels: Filters per branch.
        dropout: Dropout before the head.

    Returns:
        A ``TextCnnClassifier`` mapping ``[B, L]`` int64 ids to ``[B, C]`` logits.
    """
    _max_length(input_shape)
    vocab, pad = _vocabulary(vocab_size, pad_id)
    for name, value in (("num_classes", num_classes), ("embedding", embedding), ("channels", channels)):
        _positive_int(name, value)
    widths = [_positive_int("kernel_sizes", w) for w in kernel_sizes]
    if not widths or any(w % 2 == 0 for w in widths):
        raise ValueError(f"kernel_sizes must be a non-empty list of odd widths, got {list(kernel_sizes)}")
    return TextCnnClassifier(vocab, pad, num_classes, embedding, widths, channels, _dropout(dropout))
