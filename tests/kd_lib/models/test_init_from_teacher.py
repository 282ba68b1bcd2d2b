"""DistilBERT-style initialization of a transformer student from its teacher's layers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from kd_lib.config import ConfigError
from kd_lib.models import huggingface
from kd_lib.models.init_from_teacher import init_from_teacher
from kd_lib.models.text import bilstm, transformer
from tests.helpers import tiny_bert

VOCAB, PAD, CLASSES = 30, 0, 3


def _bert(layers: int, hidden: int = 16, heads: int = 2, intermediate: int = 32, length: int = 12, seed: int = 0):
    return tiny_bert(
        layers, hidden, heads, intermediate, length=length, vocab_size=VOCAB, num_classes=CLASSES, seed=seed
    )


def _equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_every_other_layer_embeddings_pooler_and_head_from_a_kdflow_teacher() -> None:
    teacher, student = _bert(4, seed=1), _bert(2, length=8, seed=2)
    t_layers, s_layers = teacher.bert.bert.encoder.layer, student.bert.bert.encoder.layer
    assert not _equal(s_layers[0], t_layers[1])  # different random draws before
    copied = init_from_teacher(student, teacher)
    assert copied == {"layer_map": [[1, 2], [2, 4]], "pooler": True, "classifier": True}
    # student layer k (1-based) = teacher layer 2k: modules 0 <- 1 and 1 <- 3
    assert _equal(s_layers[0], t_layers[1]) and _equal(s_layers[1], t_layers[3])
    assert _equal(student.bert.bert.pooler, teacher.bert.bert.pooler)
    assert _equal(student.bert.classifier, teacher.bert.classifier)
    s_emb, t_emb = student.bert.bert.embeddings, teacher.bert.bert.embeddings
    assert torch.equal(s_emb.word_embeddings.weight, t_emb.word_embeddings.weight)
    # A shorter max_length keeps the teacher's first position rows.
    assert torch.equal(s_emb.position_embeddings.weight, t_emb.position_embeddings.weight[:8])
    ids = torch.tensor([[5, 6, 7, PAD]])
    assert torch.isfinite(student.eval()(ids)).all()


def test_uniform_map_when_the_depth_ratio_is_not_two() -> None:
    teacher, student = _bert(4, seed=1), _bert(3, seed=2)
    assert init_from_teacher(student, teacher)["layer_map"] == [[1, 1], [2, 2], [3, 4]]
    t_layers, s_layers = teacher.bert.bert.encoder.layer, student.bert.bert.encoder.layer
    assert _equal(s_layers[0], t_layers[0]) and _equal(s_layers[1], t_layers[1]) and _equal(s_layers[2], t_layers[3])


def test_a_hugging_face_bert_teacher() -> None:
    config = {
        "model_type": "bert",
        "vocab_size": VOCAB + 2,  # a model's table may be padded beyond the tokenizer's ids
        "hidden_size": 16,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 64,
        "type_vocab_size": 2,
        "num_labels": CLASSES,
        "pad_token_id": PAD,
    }
    torch.manual_seed(1)
    teacher = huggingface.build((12,), CLASSES, config, pad_id=PAD)
    student = _bert(2, seed=2)
    copied = init_from_teacher(student, teacher)
    assert copied == {"layer_map": [[1, 2], [2, 4]], "pooler": True, "classifier": True}
    t_bert: Any = teacher.model.bert
    assert _equal(student.bert.bert.encoder.layer[1], t_bert.encoder.layer[3])
    s_emb = student.bert.bert.embeddings
    assert torch.equal(s_emb.word_embeddings.weight, t_bert.embeddings.word_embeddings.weight[:VOCAB])
    assert torch.equal(s_emb.token_type_embeddings.weight, t_bert.embeddings.token_type_embeddings.weight[:1])
    head: Any = teacher.model.classifier
    assert _equal(student.bert.classifier, head)


def test_a_head_of_other_classes_is_left_alone() -> None:
    teacher = _bert(2, seed=1)
    torch.manual_seed(2)
    student = transformer((12,), 5, vocab_size=VOCAB, pad_id=PAD, layers=1, hidden=16, heads=2, intermediate=32)
    before = student.bert.classifier.weight.detach().clone()
    copied = init_from_teacher(student, teacher)
    assert copied["classifier"] is False and copied["pooler"] is True
    assert torch.equal(student.bert.classifier.weight, before)


@pytest.mark.parametrize(
    ("params", "field", "fix"),
    [
        ({"hidden": 8, "intermediate": 32}, "hidden_size: the student has 8, the teacher 16", "params.hidden: 16"),
        ({"heads": 4}, "num_attention_heads: the student has 4, the teacher 2", "params.heads: 2"),
        ({"intermediate": 64}, "intermediate_size: the student has 64, the teacher 32", "params.intermediate: 32"),
    ],
)
def test_a_different_width_is_a_config_error_naming_the_field(params: dict, field: str, fix: str) -> None:
    teacher = _bert(2, seed=1)
    student = _bert(1, **params)
    with pytest.raises(ConfigError, match=f"same {field}") as err:
        init_from_teacher(student, teacher)
    assert fix in err.value.fix and "init_from_teacher: false" in err.value.fix


def test_a_larger_student_table_or_a_non_transformer_is_refused() -> None:
    with pytest.raises(ConfigError, match="position_embeddings.weight is \\(16, 16\\) in the student"):
        init_from_teacher(_bert(1, length=16), _bert(2, length=12))
    lstm = bilstm((12,), CLASSES, vocab_size=VOCAB, pad_id=PAD)
    with pytest.raises(ConfigError, match="the student \\(BiLstmClassifier\\) has no BERT-family encoder"):
        init_from_teacher(lstm, _bert(2))
    with pytest.raises(ConfigError, match="the teacher \\(BiLstmClassifier\\)"):
        init_from_teacher(_bert(1), lstm)


def test_a_distilbert_teacher_of_the_same_depth_gives_its_own_encoder() -> None:
    """DistilBERT's layers are BERT's under other names: copied by name into a BERT student of the
    same shape, every layer computes what the teacher's does (the student's token-type table is
    zeroed: DistilBERT has none). Its head is not BERT's, so neither pooler nor classifier is copied."""
    config = {
        "model_type": "distilbert",
        "vocab_size": VOCAB,
        "dim": 16,
        "n_layers": 2,
        "n_heads": 2,
        "hidden_dim": 32,
        "max_position_embeddings": 40,
        "num_labels": CLASSES,
        "pad_token_id": PAD,
    }
    torch.manual_seed(1)
    teacher: Any = huggingface.build((12,), CLASSES, config, pad_id=PAD).eval()
    student = _bert(2, seed=2).eval()
    assert init_from_teacher(student, teacher) == {"layer_map": [[1, 1], [2, 2]], "pooler": False, "classifier": False}
    ids = torch.tensor([[2, 7, 9, 4, 3, PAD, PAD, PAD, PAD, PAD, PAD, PAD], [2, 5, 11, 12, 6, 8, 10, 3, 1, 1, 1, 1]])
    mask = (ids != PAD).long()
    with torch.no_grad():
        mine = student.bert.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        theirs = teacher.model.distilbert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert len(mine) == len(theirs) == 3
    for layer, (a, b) in enumerate(zip(mine, theirs, strict=True)):
        torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-5, rtol=1e-5, msg=f"layer {layer}")
    assert not torch.equal(student.bert.classifier.weight, teacher.model.classifier.weight)


def test_a_distilbert_teacher_of_another_feed_forward_width_names_hidden_dim() -> None:
    config = {"model_type": "distilbert", "vocab_size": VOCAB, "dim": 16, "n_layers": 2, "n_heads": 2}
    torch.manual_seed(1)
    teacher = huggingface.build((12,), CLASSES, config | {"hidden_dim": 48, "num_labels": CLASSES}, pad_id=PAD)
    with pytest.raises(ConfigError, match="same intermediate_size: the student has 32, the teacher 48") as err:
        init_from_teacher(_bert(1), teacher)
    assert "student.model.params.intermediate: 48" in err.value.fix


def test_a_roberta_teacher_is_refused() -> None:
    config = {
        "model_type": "roberta",
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 40,
        "num_labels": CLASSES,
        "pad_token_id": 1,
    }
    torch.manual_seed(1)
    teacher = huggingface.build((12,), CLASSES, config, pad_id=1)
    with pytest.raises(ConfigError, match="copies BERT weights, but the teacher is a 'roberta' model"):
        init_from_teacher(_bert(1), teacher)
