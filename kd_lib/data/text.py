"""Text samples as token ids: the tokenizer (trained, loaded) and encoding to padded arrays.

A tokenizer is a Hugging Face ``tokenizers`` JSON file, ``tokenizer.json``: the prepared
dataset directory holds the one its ids were made with (``kd_lib.artifacts.dataset_dir``),
and so does every model directory of a text model (``kd_lib.artifacts.model_dir``), so a
served model turns raw strings into the same ids. A trained tokenizer is BERT-style WordPiece
(lower-casing normalizer, whitespace-and-punctuation pre-tokenizer, ``[PAD]`` = 0, ``[UNK]``,
``[CLS]``, ``[SEP]``; each text becomes ``[CLS] ... [SEP]``), built offline from the train
split's texts only: its vocabulary is every character seen there (alone and as a ``##``
continuation, so a word made of known characters is never ``[UNK]``) plus the most frequent
words, ties broken alphabetically. It is built here rather than by ``tokenizers``'
``WordPieceTrainer`` because that trainer breaks ties between equally frequent merges
differently from run to run (measured: three runs on the same texts, three vocabularies),
and the same data must give the same ids.

Encoded splits are int64 ``[N, max_length]``, right-padded with the tokenizer's pad id
(``pad_id``); texts longer than ``max_length`` tokens are truncated (keeping ``[SEP]``). A
training or inference batch is trimmed to its longest row (``kd_lib.train.inference.trim_padding``).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from kd_lib.data.errors import DataError

PAD, UNK, CLS, SEP = "[PAD]", "[UNK]", "[CLS]", "[SEP]"
# In this order, so a trained tokenizer has [PAD] = 0.
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP)
# Pad tokens of other tokenizer families, tried when a tokenizer.json declares no padding.
_PAD_NAMES = (PAD, "<pad>", "<PAD>")


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Build a BERT-style WordPiece tokenizer from ``texts`` (the train split's, never val/test).

    Offline and deterministic: the same texts give the same ``tokenizer.json``. The vocabulary
    is the special tokens (``[PAD]`` = 0, ``[UNK]`` = 1, ``[CLS]`` = 2, ``[SEP]`` = 3), every
    character of the normalized texts alone and as ``##`` continuation, then the most frequent
    words (count, then alphabetical order) up to ``vocab_size``.

    Args:
        texts: The training texts.
        vocab_size: Largest vocabulary; a small corpus gives fewer, and the characters are
            always kept (an alphabet larger than ``vocab_size`` exceeds it).

    Returns:
        The tokenizer, wrapping each text as ``[CLS] ... [SEP]``.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    pieces = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in chars)]
    known = set(pieces)
    ranked = sorted((w for w in counts if w not in known), key=lambda w: (-counts[w], w))
    words = ranked[: max(0, vocab_size - len(pieces))]
    vocab = {token: i for i, token in enumerate(pieces + words)}
    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    cls_id, sep_id = vocab[CLS], vocab[SEP]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", special_tokens=[(CLS, cls_id), (SEP, sep_id)]
    )
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read a ``tokenizer.json``.

    Raises:
        DataError: the file is missing or not a tokenizers JSON file (named).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: no such tokenizer file",
            "point data.tokenizer at a tokenizers tokenizer.json, or set it to 'train'",
        )
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a plain Exception for a malformed file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{path}: not a tokenizers tokenizer.json ({first})",
            "save the tokenizer with tokenizer.save(path) (or a transformers fast tokenizer's save_pretrained), "
            "or set data.tokenizer to 'train'",
        ) from None


def pad_id(tokenizer: Tokenizer) -> int:
    """The id ``encode`` pads with: the tokenizer's padding id, else the id of ``[PAD]`` / ``<pad>``.

    Raises:
        DataError: the tokenizer has neither.
    """
    padding = tokenizer.padding
    if padding is not None:
        return int(padding["pad_id"])
    for name in _PAD_NAMES:
        found = tokenizer.token_to_id(name)
        if found is not None:
            return int(found)
    raise DataError(
        f"the tokenizer has no pad token (none of {list(_PAD_NAMES)} in its vocabulary)",
        "use a tokenizer with a pad token, or set data.tokenizer to 'train'",
    )


def encode(tokenizer: Tokenizer, texts: Sequence[str], max_length: int) -> np.ndarray:
    """Token ids of ``texts``, right-padded with ``pad_id(tokenizer)`` and truncated to ``max_length``.

    ``tokenizer`` itself is left as it was (its own padding and truncation settings are not used).

    Args:
        tokenizer: From ``train_tokenizer`` or ``load_tokenizer``.
        texts: N strings.
        max_length: Tokens per row, special tokens included.

    Returns:
        int64 ``[N, max_length]``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    pad = pad_id(tokenizer)
    # A copy with exactly these settings: truncation keeps the special tokens ([SEP] last).
    local = Tokenizer.from_str(tokenizer.to_str())
    local.no_padding()
    local.enable_truncation(max_length)
    out = np.full((len(texts), max_length), pad, dtype=np.int64)
    for row, encoding in enumerate(local.encode_batch(list(texts))):
        ids = encoding.ids[:max_length]
        out[row, : len(ids)] = ids
    return out


def vocabulary_size(tokenizer: Tokenizer) -> int:
    """Number of ids the tokenizer can produce (added tokens included): a model's embedding rows."""
    return int(tokenizer.get_vocab_size(with_added_tokens=True))


def text_fingerprint(texts: Sequence[str], y: np.ndarray) -> str:
    """sha256 over every text's UTF-8 bytes (each length-prefixed) and the labels' dtype, shape and bytes."""
    h = hashlib.sha256()
    for text in texts:
        raw = text.encode("utf-8")
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
    labels = np.ascontiguousarray(y)
    h.update(f"{labels.dtype.str}{labels.shape}".encode())
    h.update(labels.tobytes())
    return h.hexdigest()
