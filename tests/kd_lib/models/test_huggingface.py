"""Hugging Face teachers: a tiny randomly initialized BERT saved with save_pretrained in tmp_path.

Nothing comes from a hub: the WordPiece tokenizer is trained here with the tokenizers library,
wrapped in a ``PreTrainedTokenizerFast`` and saved beside the model, as a user would save a
real teacher.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from kd_lib.adapters import storage
from kd_lib.compress import quantization
from kd_lib.config import ConfigError, PipelineConfig
from kd_lib.models import huggingface
from kd_lib.models.builders import build_model
from tests.kd_lib.conftest import S3

TEXTS = [
    "a great film with a good plot",
    "awful acting and a boring story",
    "good fun, great actors!",
    "bad, dull and far too long",
    "the best movie this year",
    "the worst script i have read",
]
LABELS = ("negative", "positive")


def tiny_tokenizer(texts: Sequence[str], vocab_size: int = 120) -> Tokenizer:
    """A BERT-style WordPiece tokenizer trained on ``texts``: [PAD] = 0, each text as [CLS] ... [SEP]."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(
        list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return tokenizer


def save_tiny_bert(
    directory: Path,
    texts: Sequence[str] = TEXTS,
    labels: Sequence[str] = LABELS,
    seed: int = 0,
    safe_serialization: bool = True,
    max_positions: int = 64,
    arch: str = "bert",
) -> Path:
    """Save a 2-layer, 32-wide BERT (``arch`` "distilbert": DistilBERT) classifier and its fast
    tokenizer into ``directory`` (save_pretrained)."""
    tokenizer = tiny_tokenizer(texts)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    names: dict[str, Any] = {"id2label": dict(enumerate(labels)), "label2id": {n: i for i, n in enumerate(labels)}}
    torch.manual_seed(seed)
    if arch == "distilbert":
        model: PreTrainedModel = DistilBertForSequenceClassification(
            DistilBertConfig(
                vocab_size=tokenizer.get_vocab_size(),
                dim=32,
                n_layers=2,
                n_heads=2,
                hidden_dim=64,
                max_position_embeddings=max_positions,
                **names,
            )
        )
    else:
        config = BertConfig(
            vocab_size=tokenizer.get_vocab_size(),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=max_positions,
            **names,  # num_labels follows id2label
        )
        model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    if not safe_serialization:  # the older pickle format (transformers 5 writes safetensors only)
        (directory / "model.safetensors").unlink()
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    fast.save_pretrained(directory)
    return directory


def _no_fetch(uri: str, dest: Path) -> Path:
    raise AssertionError(f"a local teacher must not be fetched ({uri})")


def _ids(directory: Path, texts: Sequence[str], length: int) -> torch.Tensor:
    tokenizer = Tokenizer.from_file(str(directory / huggingface.TOKENIZER_FILE))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=length)
    tokenizer.enable_truncation(length)
    return torch.tensor([e.ids for e in tokenizer.encode_batch(list(texts))], dtype=torch.int64)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def test_a_saved_teacher_loads_as_ids_to_logits_with_the_pad_mask(bert_dir: Path) -> None:
    model, params, tokenizer_file = huggingface.load_teacher(str(bert_dir), bert_dir, _no_fetch, LABELS, 0, 16)
    assert tokenizer_file == bert_dir / "tokenizer.json"
    assert params["pad_id"] == 0 and params["config"]["model_type"] == "bert"
    ids = _ids(bert_dir, TEXTS, 16)
    with torch.no_grad():
        logits = model(ids)
        # The model itself, given the mask explicitly, answers the same.
        reference = model.model(input_ids=ids, attention_mask=(ids != 0).long()).logits
        # More padding changes nothing: pad positions are masked out.
        longer = model(_ids(bert_dir, TEXTS, 24))
    assert logits.shape == (len(TEXTS), 2) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, reference)
    torch.testing.assert_close(longer, logits, atol=1e-5, rtol=1e-5)
    assert not model.training


def test_saved_in_a_kdflow_model_dir_it_rebuilds_from_its_spec(bert_dir: Path, tmp_path: Path) -> None:
    model, params, _ = huggingface.load_teacher(str(bert_dir), bert_dir, _no_fetch, LABELS, 0)
    spec = {"arch": "huggingface", "params": params, "input_shape": [16], "num_classes": 2, "quantization": "none"}
    quantization.save_model(model, spec, tmp_path / "teacher")
    written = json.loads((tmp_path / "teacher" / "spec.json").read_text())
    assert written["params"]["config"]["hidden_size"] == 32
    loaded, _ = quantization.load_model(tmp_path / "teacher")
    ids = _ids(bert_dir, TEXTS, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids))
    # The builder alone gives the architecture with other (random) weights.
    torch.manual_seed(1)
    fresh = build_model("huggingface", params, (16,), 2)
    with torch.no_grad():
        assert not torch.allclose(fresh(ids), model(ids))


def test_the_builder_refuses_a_spec_that_does_not_fit() -> None:
    with pytest.raises(ConfigError, match="model_type"):
        build_model("huggingface", {"pad_id": 0}, (16,), 2)
    config = {"model_type": "bert", "num_labels": 3, "hidden_size": 8, "num_attention_heads": 2}
    with pytest.raises(ConfigError, match="num_labels 3 but num_classes is 2"):
        build_model("huggingface", {"config": config, "pad_id": 0}, (16,), 2)
    with pytest.raises(ConfigError, match=r"token ids \[max_length\]"):
        build_model("huggingface", {"config": config, "pad_id": 0}, (1, 4, 4), 3)


@pytest.mark.parametrize("uri", ["bert-base-uncased", "distilbert/distilbert-base-uncased-finetuned-sst-2-english"])
def test_a_hub_name_is_refused_saying_nothing_is_downloaded(
    uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no directory of that name here
    with pytest.raises(ConfigError) as err:
        huggingface.load_teacher(uri, tmp_path, _no_fetch, LABELS, 0)
    message = str(err.value)
    assert repr(uri) in message and "downloads nothing from a hub" in message
    assert "save_pretrained(DIR, safe_serialization=True)" in message


def test_a_url_is_refused_by_the_config() -> None:
    with pytest.raises(ValueError, match="downloads nothing from a hub"):
        PipelineConfig.model_validate({"teacher": {"source": "huggingface", "uri": "hf://bert-base-uncased"}})
    with pytest.raises(ValueError, match="needs uri"):
        PipelineConfig.model_validate({"teacher": {"source": "huggingface"}})
    with pytest.raises(ValueError, match="fine_tune applies to source 'huggingface'"):
        PipelineConfig.model_validate({"teacher": {"fine_tune": True}})
    with pytest.raises(ValueError, match="classifies text: set data.text_column"):
        PipelineConfig.model_validate({"teacher": {"source": "huggingface", "uri": "/models/bert"}})


def test_pickle_weights_only_are_refused(tmp_path: Path) -> None:
    directory = save_tiny_bert(tmp_path / "bin-only", safe_serialization=False)
    assert (directory / "pytorch_model.bin").is_file() and not (directory / "model.safetensors").exists()
    with pytest.raises(huggingface.HuggingFaceError) as err:
        huggingface.load_teacher(str(directory), tmp_path, _no_fetch, LABELS, 0)
    assert "pytorch_model.bin" in err.value.cause and "safetensors only" in err.value.cause
    assert "safe_serialization=True" in err.value.fix


def test_a_directory_without_its_tokenizer_is_refused(bert_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "no-tokenizer"
    copy.mkdir()
    for name in ("config.json", "model.safetensors"):
        (copy / name).write_bytes((bert_dir / name).read_bytes())
    with pytest.raises(huggingface.HuggingFaceError, match=r"lacks tokenizer\.json"):
        huggingface.load_teacher(str(copy), tmp_path, _no_fetch, LABELS, 0)
    with pytest.raises(ConfigError, match=r"has no tokenizer\.json"):
        huggingface.teacher_tokenizer("huggingface", str(copy), tmp_path, _no_fetch)


def test_labels_must_be_the_data_classes(bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(huggingface.HuggingFaceError, match=r"num_labels 2 but the data has 3 classes \(a, b, c\)"):
        huggingface.load_teacher(str(bert_dir), tmp_path, _no_fetch, ["a", "b", "c"], 0)
    with pytest.raises(huggingface.HuggingFaceError) as err:
        huggingface.load_teacher(str(bert_dir), tmp_path, _no_fetch, ["positive", "negative"], 0)
    assert "id 0: model 'negative' vs data 'positive'" in err.value.cause
    assert "id 1: model 'positive' vs data 'negative'" in err.value.cause
    # Case does not matter; ids as labels ("0", "1") say nothing about names.
    for names in (["NEGATIVE", "Positive"], ["0", "1"]):
        huggingface.load_teacher(str(bert_dir), tmp_path, _no_fetch, names, 0)


def test_max_length_must_fit_the_position_embeddings(bert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(huggingface.HuggingFaceError, match="data.max_length 65 is longer than the teacher's"):
        huggingface.load_teacher(str(bert_dir), tmp_path, _no_fetch, LABELS, 0, max_length=65)


def test_code_in_the_directory_never_runs(bert_dir: Path, tmp_path: Path) -> None:
    """A config asking for remote code (auto_map) loads the library's own class; the file is not imported."""
    directory = tmp_path / "with-code"
    directory.mkdir()
    for item in bert_dir.iterdir():
        (directory / item.name).write_bytes(item.read_bytes())
    marker = tmp_path / "code-ran"
    (directory / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (directory / "config.json").write_text(json.dumps(config))
    try:
        model, _, _ = huggingface.load_teacher(str(directory), tmp_path, _no_fetch, LABELS, 0)
        assert type(model.model).__name__ == "BertForSequenceClassification"
    except huggingface.HuggingFaceError as err:
        assert "trust_remote_code" in err.fix
    assert not marker.exists()


def test_teacher_tokenizer_for_data_tokenizer_auto(bert_dir: Path, tmp_path: Path) -> None:
    assert huggingface.teacher_tokenizer("huggingface", str(bert_dir), tmp_path, _no_fetch) == bert_dir / (
        "tokenizer.json"
    )
    for source in ("train", "mlflow", "checkpoint"):
        assert huggingface.teacher_tokenizer(source, None, tmp_path, _no_fetch) is None
    assert huggingface.same_vocabulary(bert_dir / "tokenizer.json", bert_dir / "tokenizer.json")
    other = tmp_path / "other.json"
    tiny_tokenizer(["entirely different words here"], vocab_size=40).save(str(other))
    assert not huggingface.same_vocabulary(bert_dir / "tokenizer.json", other)


def test_an_s3_teacher_is_fetched(bert_dir: Path, s3: S3, tmp_path: Path) -> None:
    for item in bert_dir.iterdir():
        storage.put(item, s3.uri(f"teachers/bert/{item.name}"))

    def fetch(uri: str, dest: Path) -> Path:
        return storage.fetch(uri, dest)

    uri = s3.uri("teachers/bert")
    tokenizer = huggingface.teacher_tokenizer("huggingface", uri, tmp_path / "tok", fetch)
    assert tokenizer is not None and tokenizer.read_bytes() == (bert_dir / "tokenizer.json").read_bytes()
    assert [p.name for p in (tmp_path / "tok").iterdir()] == ["tokenizer.json"]  # the file alone
    model, _, _ = huggingface.load_teacher(uri, tmp_path / "model", fetch, LABELS, 0)
    local, _, _ = huggingface.load_teacher(str(bert_dir), tmp_path, _no_fetch, LABELS, 0)
    ids = _ids(bert_dir, TEXTS, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(ids), local(ids))
