"""Text data: reading .csv/.parquet/.jsonl, bad input, the tokenizer, encoding, fingerprints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer

from kd_lib.artifacts.dataset_dir import load_splits, read_meta, save_splits, tokenizer_path
from kd_lib.config import DataConfig, PipelineConfig
from kd_lib.data import text as text_lib
from kd_lib.data.dataset import DataError, prepare, stratified_split

WORDS = {
    "pos": ["great", "lovely", "superb", "fun", "bright"],
    "neg": ["awful", "dull", "bad", "grim", "boring"],
}


def _rows(n_per_class: int = 20) -> list[dict[str, str]]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_per_class):
        for label, words in WORDS.items():
            picked = " ".join(rng.choice(words, size=3 + i % 4))
            rows.append({"text": f"The film was {picked} indeed", "label": label})
    return rows


def _write(rows: list[dict[str, Any]], path: Path) -> Path:
    df = pd.DataFrame(rows)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        df.to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(source: Path | str, **extra: object) -> DataConfig:
    return DataConfig(source=str(source), text_column="text", max_length=16, vocab_size=200, **extra)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_each_format_gives_the_same_token_ids_and_fingerprint(tmp_path: Path, suffix: str) -> None:
    reference = prepare(_cfg(_write(_rows(), tmp_path / "ref.csv")))
    splits = prepare(_cfg(_write(_rows(), tmp_path / f"data{suffix}")))
    assert splits.meta.fingerprint == reference.meta.fingerprint
    assert splits.meta.input_shape == [16] and splits.meta.normalization == {}
    assert splits.meta.class_names == ["neg", "pos"]
    assert splits.meta.text is not None and splits.meta.text.tokenizer_origin == "trained"
    assert splits.meta.text.pad_id == 0 and splits.meta.text.max_length == 16
    for name in ("train", "val", "test"):
        assert splits.x[name].dtype == np.int64 and splits.x[name].shape[1] == 16
        np.testing.assert_array_equal(splits.x[name], reference.x[name])
        np.testing.assert_array_equal(splits.y[name], reference.y[name])
    assert sum(splits.meta.sizes.values()) == 40


def test_builtin_sample_and_dataset_directory_round_trip(tmp_path: Path) -> None:
    splits = prepare(DataConfig(source="movie_toy", text_column="text", max_length=32))
    assert splits.meta.num_classes == 3 and sum(splits.meta.sizes.values()) == 900
    save_splits(splits, tmp_path / "ds")
    again = load_splits(tmp_path / "ds")
    assert again.meta == splits.meta
    np.testing.assert_array_equal(again.x["val"], splits.x["val"])
    tok = text_lib.load_tokenizer(tokenizer_path(tmp_path / "ds"))  # type: ignore[arg-type]
    np.testing.assert_array_equal(text_lib.encode(tok, ["great film"], 32), text_lib.encode(tok, ["great film"], 32))
    # A dataset that is not text keeps writing meta.json without a text key.
    digits = prepare(DataConfig())
    save_splits(digits, tmp_path / "digits")
    assert "text" not in json.loads((tmp_path / "digits" / "meta.json").read_text())
    assert read_meta(tmp_path / "digits").text is None and tokenizer_path(tmp_path / "digits") is None


def test_tokenizer_is_trained_on_the_train_split_only(tmp_path: Path) -> None:
    rows = _rows()
    y = np.array([0 if r["label"] == "neg" else 1 for r in rows])
    train, val, test = stratified_split(y, 0.15, 0.15, 0)  # the split prepare makes (same seed)
    rows[int(train[0])]["text"] = "The film was quokka quokka"
    rows[int(val[0])]["text"] = "The film was zyzzyva zyzzyva"
    rows[int(test[0])]["text"] = "The film was axolotl axolotl"
    splits = prepare(_cfg(_write(rows, tmp_path / "d.csv")))
    assert splits.tokenizer is not None
    tokenizer = Tokenizer.from_str(splits.tokenizer)
    vocabulary = tokenizer.get_vocab()
    assert "quokka" in vocabulary
    assert "zyzzyva" not in vocabulary and "axolotl" not in vocabulary
    # The held-out words are encoded from the train split's pieces, not as words of their own.
    row = splits.x["val"][int(np.flatnonzero(val == val[0])[0])]
    assert vocabulary.get("zyzzyva") not in row.tolist()


def test_training_is_deterministic_and_specials_come_first() -> None:
    texts = [r["text"] for r in _rows()]
    a, b = text_lib.train_tokenizer(texts, 100), text_lib.train_tokenizer(texts, 100)
    assert a.to_str() == b.to_str()
    assert [a.token_to_id(t) for t in text_lib.SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert text_lib.pad_id(a) == 0


def test_encode_pads_right_and_truncates_keeping_sep() -> None:
    tokenizer = text_lib.train_tokenizer(["a b c d e f g h", "a b"], 50)
    ids = text_lib.encode(tokenizer, ["a b", "a b c d e f g h"], 6)
    cls, sep = tokenizer.token_to_id(text_lib.CLS), tokenizer.token_to_id(text_lib.SEP)
    assert ids.dtype == np.int64 and ids.shape == (2, 6)
    assert ids[0].tolist() == [cls, tokenizer.token_to_id("a"), tokenizer.token_to_id("b"), sep, 0, 0]
    assert ids[1, 0] == cls and ids[1, -1] == sep and (ids[1] != 0).all()
    # The caller's tokenizer is left without padding or truncation.
    assert tokenizer.padding is None and tokenizer.truncation is None


def test_tokenizer_from_a_file_and_its_errors(tmp_path: Path) -> None:
    data = _write(_rows(), tmp_path / "d.csv")
    tokenizer = text_lib.train_tokenizer(["the film was great", "dull"], 60)
    tokenizer.save(str(tmp_path / "tok.json"))
    splits = prepare(_cfg(data, tokenizer=str(tmp_path / "tok.json")))
    assert splits.meta.text is not None and splits.meta.text.tokenizer_origin == "file"
    assert splits.meta.text.vocab_size == tokenizer.get_vocab_size()
    with pytest.raises(DataError, match="no such tokenizer file"):
        prepare(_cfg(data, tokenizer=str(tmp_path / "missing.json")))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a tokenizers tokenizer.json"):
        prepare(_cfg(data, tokenizer=str(tmp_path / "bad.json")))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda rows: rows[5].update(text="   "), r"text column 'text', data row 5: empty text"),
        (lambda rows: rows[3].update(text=42), r"data row 3: not a string \(42\)"),
        (lambda rows: [r.pop("label") for r in rows], r"no label column 'label'; the file has columns \['text'\]"),
        (lambda rows: [r.update(body=r.pop("text")) for r in rows], r"no text column 'text'.*\['label', 'body'\]"),
        (lambda rows: rows[4].update(label=None), r"label column 'label' is empty in 1 row"),
    ],
)
def test_bad_input_names_file_row_and_column(tmp_path: Path, mutate, message: str) -> None:  # noqa: ANN001
    rows = _rows()
    mutate(rows)
    path = _write(rows, tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match=message) as err:
        prepare(_cfg(path))
    assert str(path) in str(err.value)


def test_an_empty_class_and_a_tiny_class_are_errors(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [{"text": "good", "label": 0}] * 10 + [{"text": "bad", "label": 2}] * 10
    with pytest.raises(DataError, match=r"class\(es\) \[1\] have no samples"):
        prepare(_cfg(_write(rows, tmp_path / "gap.csv")))
    tiny = [{"text": "good", "label": "a"}] * 10 + [{"text": "bad", "label": "b"}] * 2
    with pytest.raises(DataError, match="class 1 has 2 sample"):
        prepare(_cfg(_write(tiny, tmp_path / "tiny.csv")))
    with pytest.raises(DataError, match="no such file"):
        prepare(_cfg(tmp_path / "absent.csv"))
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        prepare(_cfg(tmp_path / "empty.csv"))


def test_test_source_keeps_class_names_and_changes_the_fingerprint(tmp_path: Path) -> None:
    train = _write(_rows(), tmp_path / "train.csv")
    test = _write(_rows(5)[::-1], tmp_path / "test.jsonl")  # text files of any of the formats mix
    splits = prepare(_cfg(train, test_source=str(test)))
    assert splits.meta.sizes["test"] == 10 and splits.meta.test_source == str(test)
    assert splits.meta.fingerprint != prepare(_cfg(train)).meta.fingerprint


def test_fingerprint_follows_texts_and_labels() -> None:
    y = np.array([0, 1], dtype=np.int64)
    base = text_lib.text_fingerprint(["a b", "c"], y)
    assert base == text_lib.text_fingerprint(["a b", "c"], y.copy())
    assert base != text_lib.text_fingerprint(["a", "b c"], y)  # same characters, other boundaries
    assert base != text_lib.text_fingerprint(["a b", "c"], y[::-1].copy())
    assert base != text_lib.text_fingerprint(["a b", "ç"], y)


def test_config_text_fields_keep_old_hashes_and_reject_misfits() -> None:
    base = PipelineConfig()
    same = PipelineConfig.model_validate({"data": {"max_length": 128, "vocab_size": 8000, "tokenizer": "auto"}})
    assert same.config_hash() == base.config_hash()
    text = PipelineConfig.model_validate({"data": {"source": "movie_toy", "text_column": "text"}})
    assert text.config_hash() != base.config_hash()
    longer = PipelineConfig.model_validate({"data": {"source": "movie_toy", "text_column": "text", "max_length": 64}})
    assert longer.config_hash() != text.config_hash()
    with pytest.raises(ValidationError, match="set data.text_column"):
        DataConfig(source="x.jsonl")
    with pytest.raises(ValidationError, match="needs a .csv, .parquet or .jsonl"):
        DataConfig(source="digits", text_column="text")
    with pytest.raises(ValidationError, match="image_shape do"):
        DataConfig(source="x.csv", text_column="text", image_shape=[1, 2, 2])
    with pytest.raises(ValidationError, match="tokenizer applies to text data"):
        DataConfig(source="x.csv", tokenizer="train")
    with pytest.raises(ValidationError, match="only local paths and s3"):
        DataConfig(source="x.csv", text_column="text", tokenizer="https://hub/tok.json")
