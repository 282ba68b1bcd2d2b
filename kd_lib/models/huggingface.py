"""Hugging Face sequence classifiers as kdflow teachers (``teacher.source: huggingface``).

A teacher directory is what ``save_pretrained`` writes: ``config.json`` and ``model.safetensors``
of an ``AutoModelForSequenceClassification``, plus the ``tokenizer.json`` of a fast tokenizer
(``tokenizer.save_pretrained``), on a local disk or under an ``s3://`` prefix. kdflow loads it
with ``use_safetensors=True``, ``local_files_only=True`` and ``trust_remote_code=False``:
nothing is downloaded from a hub, no pickle is read and no code from the directory runs.

The loaded model is wrapped in ``SequenceClassifier``: int64 token ids ``[B, L]`` in, logits
``[B, C]`` out, the attention mask built as ``ids != pad_id``, the same contract as kdflow's
text students. Saved in a kdflow model directory it is an ordinary model: spec ``arch:
huggingface`` with the model's configuration and ``pad_id`` as ``params``, and its weights in
``weights.bin``; ``build`` (the ``huggingface`` entry of the model registry) rebuilds the
architecture from that configuration before the weights are loaded, so every later step,
quantization backend and the registry load it like any other kdflow model.

transformers costs seconds at import; it is imported only by the functions that build or load
a model, so looking up a teacher's tokenizer (``teacher_tokenizer``) stays cheap.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from kd_lib.config import ConfigError
from kd_lib.errors import KdflowError

ARCH = "huggingface"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# The files of a save_pretrained directory kdflow reads (tokenizer_config.json and the like are not needed).
_NEEDED = (CONFIG_FILE, TOKENIZER_FILE)
_SAVE_HOWTO = (
    "save it locally first, where a hub is reachable: "
    "AutoModelForSequenceClassification.from_pretrained(NAME).save_pretrained(DIR, safe_serialization=True) and "
    "AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR); then set teacher.uri to DIR (or an s3:// copy of it)"
)

Fetch = Callable[[str, Path], Path]


class HuggingFaceError(KdflowError, ValueError):
    """A Hugging Face teacher directory cannot be loaded, or does not fit the data."""

    default_fix = "fix the teacher directory (teacher.uri) or the data; see the message"


class SequenceClassifier(nn.Module):
    """A transformers sequence classifier as a kdflow text model: ids in, logits out.

    Args:
        model: An ``AutoModelForSequenceClassification`` model (any architecture).
        pad_id: The padding token's id; positions holding it are masked out.
    """

    def __init__(self, model: nn.Module, pad_id: int) -> None:
        super().__init__()
        self.model = model
        self.pad_id = int(pad_id)

    def forward(self, ids: Tensor) -> Tensor:
        """Logits of right-padded token ids.

        Args:
            ids: ``[B, L]`` token ids (int64; other dtypes are cast), padded with ``pad_id``.

        Returns:
            ``[B, C]`` float logits.
        """
        ids = ids.long()
        mask = (ids != self.pad_id).long()
        return self.model(input_ids=ids, attention_mask=mask).logits


def _transformers() -> Any:
    # lazy: transformers takes seconds to import; only building or loading a model needs it
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def check_uri(uri: str) -> None:
    """Refuse a ``teacher.uri`` that is a URL of another scheme (``hf://``, ``https://``).

    Raises:
        ConfigError: the scheme is not ``s3`` (a local path has none).
    """
    scheme = urlparse(uri).scheme
    if scheme and scheme != "s3" and len(scheme) > 1:  # one letter: a Windows drive
        raise ConfigError(
            f"teacher.uri {uri!r}: kdflow downloads nothing from a hub or URL ({scheme}://); {_SAVE_HOWTO}"
        )


def local_dir(uri: str, dest_dir: str | Path, fetch: Fetch) -> Path:
    """The teacher directory on local disk: ``uri`` itself, or an ``s3://`` prefix downloaded by ``fetch``.

    Args:
        uri: ``teacher.uri``: a local directory or ``s3://bucket/prefix``.
        dest_dir: Where an ``s3://`` prefix is downloaded to.
        fetch: ``(uri, dest_dir) -> local path`` (``kd_lib.adapters.storage.fetch``).

    Raises:
        ConfigError: ``uri`` is neither an existing directory nor ``s3://`` (e.g. a hub name such
            as ``bert-base-uncased``), or is a file.
    """
    check_uri(uri)
    if uri.startswith("s3://"):
        return Path(fetch(uri.rstrip("/") + "/", Path(dest_dir)))
    path = Path(uri)
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(
            f"teacher.uri {uri!r} is a file; source huggingface needs the directory save_pretrained wrote"
        )
    raise ConfigError(
        f"teacher.uri {uri!r} is not a local directory or an s3:// prefix; kdflow downloads nothing from a hub "
        f"(a name like 'bert-base-uncased' is not looked up); {_SAVE_HOWTO}"
    )


def teacher_tokenizer(source: str, uri: str | None, dest_dir: str | Path, fetch: Fetch) -> Path | None:
    """The ``tokenizer.json`` of a Hugging Face teacher, for ``data.tokenizer: auto``.

    Reads only that one file (an ``s3://`` teacher is not downloaded whole); imports no transformers.

    Args:
        source: ``teacher.source``; only ``huggingface`` teachers carry a tokenizer here.
        uri: ``teacher.uri``: a local directory or ``s3://`` prefix.
        dest_dir: Where a remote file is downloaded to.
        fetch: ``(uri, dest_dir) -> local path`` (``kd_lib.adapters.storage.fetch``).

    Returns:
        The local path of ``tokenizer.json``, or None when the teacher is not a Hugging Face one.

    Raises:
        ConfigError: the URI is not a directory or ``s3://`` prefix, or holds no ``tokenizer.json``.
    """
    if source != "huggingface" or not uri:
        return None
    if uri.startswith("s3://"):
        check_uri(uri)
        return Path(fetch(f"{uri.rstrip('/')}/{TOKENIZER_FILE}", Path(dest_dir)))
    path = local_dir(uri, dest_dir, fetch) / TOKENIZER_FILE
    if not path.is_file():
        raise ConfigError(
            f"teacher.uri {uri!r} has no {TOKENIZER_FILE}; save the teacher's fast tokenizer into it "
            "(AutoTokenizer.from_pretrained(...).save_pretrained(DIR)), or set data.tokenizer to a tokenizer.json"
        )
    return path


def _check_layout(directory: Path, uri: str, needed: Sequence[str] = _NEEDED) -> None:
    """Refuse a directory without config, tokenizer or safetensors weights, naming what is missing."""
    names = {p.name for p in directory.iterdir()}
    if not any(name in names for name in SAFETENSORS_FILES):
        if any(name in names for name in PICKLE_WEIGHT_FILES):
            raise HuggingFaceError(
                f"teacher.uri {uri!r} holds only pickle weights (pytorch_model.bin); kdflow reads safetensors only",
                "re-save it with model.save_pretrained(DIR, safe_serialization=True), which writes model.safetensors",
            )
        raise HuggingFaceError(
            f"teacher.uri {uri!r} holds no model.safetensors (found: {', '.join(sorted(names)) or 'nothing'})",
            _SAVE_HOWTO,
        )
    missing = [name for name in needed if name not in names]
    if missing:
        raise HuggingFaceError(
            f"teacher.uri {uri!r} lacks {', '.join(missing)}; a teacher directory holds config.json, "
            "model.safetensors and the fast tokenizer's tokenizer.json",
            _SAVE_HOWTO,
        )


def _is_default_label(name: str, index: int) -> bool:
    return name == f"LABEL_{index}"


def _is_name(name: str) -> bool:
    """A class name, not a number written as text (data without class names has "0", "1", ...)."""
    try:
        float(name)
    except ValueError:
        return True
    return False


def check_labels(config: Any, class_names: Sequence[str], uri: str) -> None:
    """Check that the model's labels are the data's classes, in the same order.

    ``num_labels`` must equal the number of classes. When both sides have real names (the
    model's ``id2label`` is not the default ``LABEL_0``, ...; the data's classes are not
    numbers), every id must name the same class (compared case-insensitively).

    Raises:
        HuggingFaceError: a mismatch, naming both sides.
    """
    count = int(config.num_labels)
    if count != len(class_names):
        raise HuggingFaceError(
            f"teacher.uri {uri!r}: the model has num_labels {count} but the data has {len(class_names)} classes "
            f"({', '.join(map(str, class_names))})",
            "use a teacher fine-tuned for these classes, or re-save it with num_labels set and teacher.fine_tune: true",
        )
    labels = [str(config.id2label.get(i, f"LABEL_{i}")) for i in range(count)]
    if all(_is_default_label(name, i) for i, name in enumerate(labels)):
        return
    data = [str(name) for name in class_names]
    if not all(_is_name(name) for name in data):
        return
    wrong = [i for i in range(count) if labels[i].casefold() != data[i].casefold()]
    if wrong:
        pairs = ", ".join(f"id {i}: model {labels[i]!r} vs data {data[i]!r}" for i in wrong[:10])
        raise HuggingFaceError(
            f"teacher.uri {uri!r}: the model's id2label does not match the data's classes ({pairs})",
            "map the data's labels to the model's names, or re-save the model with id2label in the data's class "
            "order (the data's classes are sorted)",
        )


def load_pretrained(
    directory: str | Path, uri: str | None = None, with_tokenizer: bool = True
) -> tuple[nn.Module, Any]:
    """Load the ``AutoModelForSequenceClassification`` in a local ``save_pretrained`` directory.

    Args:
        directory: The local directory.
        uri: The ``teacher.uri`` it came from, for messages (default: the directory).
        with_tokenizer: The directory must hold ``tokenizer.json`` too (not so for the model
            directory of an MLflow ``transformers`` model, which keeps its tokenizer apart).

    Returns:
        ``(model, config)``: the model in eval mode on CPU (float32) and its ``PretrainedConfig``.

    Raises:
        HuggingFaceError: the directory lacks a file, holds only pickle weights, needs remote
            code, or transformers cannot load it.
    """
    directory = Path(directory)
    uri = uri or str(directory)
    _check_layout(directory, uri, _NEEDED if with_tokenizer else (CONFIG_FILE,))
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True, trust_remote_code=False)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            directory,
            config=config,
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=False,
            dtype=torch.float32,
        )
    except (OSError, ValueError, KeyError) as err:
        remote = "trust_remote_code" in str(err) or "auto_map" in str(err)
        raise HuggingFaceError(
            f"teacher.uri {uri!r}: transformers cannot load it as AutoModelForSequenceClassification "
            f"({type(err).__name__}: {' '.join(str(err).split())[:400]})",
            "kdflow never runs code from a model directory (trust_remote_code); use an architecture transformers ships"
            if remote
            else _SAVE_HOWTO,
        ) from None
    return model.eval(), config


def same_vocabulary(a: str | Path, b: str | Path) -> bool:
    """Whether two ``tokenizer.json`` files map the same tokens to the same ids (added tokens included)."""
    # lazy: tokenizers is only needed when a teacher is checked against the data
    from tokenizers import Tokenizer

    first, second = Tokenizer.from_file(str(a)), Tokenizer.from_file(str(b))
    return bool(first.get_vocab(with_added_tokens=True) == second.get_vocab(with_added_tokens=True))


def spec_params(config: Any, pad_id: int) -> dict[str, Any]:
    """The spec ``params`` that rebuild the architecture: the model's configuration as JSON, and ``pad_id``."""
    return {"config": json.loads(config.to_json_string(use_diff=False)), "pad_id": int(pad_id)}


def load_teacher(
    uri: str,
    dest_dir: str | Path,
    fetch: Fetch,
    class_names: Sequence[str],
    pad_id: int,
    max_length: int | None = None,
) -> tuple[SequenceClassifier, dict[str, Any], Path]:
    """Load a Hugging Face teacher for this data: the wrapped model, its spec ``params`` and its tokenizer.

    Args:
        uri: ``teacher.uri``: a local ``save_pretrained`` directory or an ``s3://`` prefix of one.
        dest_dir: Where an ``s3://`` prefix is downloaded to.
        fetch: ``(uri, dest_dir) -> local path`` (``kd_lib.adapters.storage.fetch``).
        class_names: The data's classes in class-id order (``DatasetMeta.class_names``, or
            ``"0"``, ``"1"``, ... when the labels are ids).
        pad_id: The padding id of the data's token ids (``kd_lib.data.text.pad_id``).
        max_length: Tokens per sample of the data; checked against ``max_position_embeddings``.

    Returns:
        ``(model, params, tokenizer_file)``: ``SequenceClassifier`` in eval mode mapping ids
        ``[B, L]`` to ``[B, C]`` logits, the spec ``params`` (``spec_params``) and the local
        ``tokenizer.json``.

    Raises:
        ConfigError: ``uri`` is a hub name or not a directory.
        HuggingFaceError: the directory cannot be loaded (pickle weights only, remote code,
            missing file), its labels do not fit the data, or ``max_length`` is too long.
    """
    directory = local_dir(uri, dest_dir, fetch)
    model, params = for_data(directory, directory / TOKENIZER_FILE, uri, class_names, pad_id, max_length)
    return model, params, directory / TOKENIZER_FILE


def for_data(
    directory: Path,
    tokenizer_file: Path,
    uri: str,
    class_names: Sequence[str],
    pad_id: int,
    max_length: int | None = None,
) -> tuple[SequenceClassifier, dict[str, Any]]:
    """``load_teacher`` on local files: the model directory and its ``tokenizer.json`` (which may
    lie elsewhere, as in an MLflow ``transformers`` model), checked against the data.

    Returns:
        ``(model, params)``, as ``load_teacher``.

    Raises:
        HuggingFaceError: as ``load_teacher``, or ``tokenizer_file`` is missing.
    """
    beside = tokenizer_file.parent == directory  # checked with the directory's other files
    if not beside and not tokenizer_file.is_file():
        raise HuggingFaceError(
            f"{uri}: no fast tokenizer's tokenizer.json ({tokenizer_file.name} missing)",
            "save the teacher with a fast tokenizer (AutoTokenizer.from_pretrained(..., use_fast=True))",
        )
    model, config = load_pretrained(directory, uri, with_tokenizer=beside)
    check_labels(config, class_names, uri)
    limit = getattr(config, "max_position_embeddings", None)
    if max_length is not None and limit is not None and max_length > int(limit):
        raise HuggingFaceError(
            f"data.max_length {max_length} is longer than the teacher's max_position_embeddings {limit} ({uri})",
            f"set data.max_length to at most {limit}",
        )
    return SequenceClassifier(model, pad_id).eval(), spec_params(config, pad_id)


def build(
    input_shape: tuple[int, ...], num_classes: int, config: Mapping[str, Any] | None = None, pad_id: int = 0
) -> SequenceClassifier:
    """The ``huggingface`` model builder: the architecture a spec's ``params`` describe, randomly initialized.

    ``kd_lib.compress.quantization.load_model`` loads the saved weights into it; nothing is read
    from disk or a hub here.

    Args:
        input_shape: ``(max_length,)``: token ids per sample.
        num_classes: Number of logits C; must equal the configuration's ``num_labels``.
        config: The model's configuration (``PretrainedConfig.to_dict()``, with ``model_type``).
        pad_id: The padding token's id.

    Returns:
        ``SequenceClassifier`` mapping ids ``[B, max_length]`` to logits ``[B, C]``.

    Raises:
        ValueError: no configuration, an unknown ``model_type``, or a class count or input
            shape that does not fit it.
    """
    if not config or "model_type" not in config:
        raise ValueError("params.config must be a transformers configuration with model_type (spec_params)")
    if len(input_shape) != 1:
        raise ValueError(f"a text model takes token ids [max_length], not input_shape {tuple(input_shape)}")
    transformers = _transformers()
    values = dict(config)
    model_type = values.pop("model_type")
    try:
        hf_config = transformers.AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError) as err:
        raise ValueError(f"config of model_type {model_type!r}: {err}") from None
    if int(hf_config.num_labels) != num_classes:
        raise ValueError(f"config has num_labels {hf_config.num_labels} but num_classes is {num_classes}")
    model = transformers.AutoModelForSequenceClassification.from_config(hf_config, trust_remote_code=False)
    return SequenceClassifier(model, pad_id).eval()
