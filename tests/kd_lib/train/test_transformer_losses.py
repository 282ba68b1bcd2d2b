"""The transformer intermediate losses: TinyBERT's hidden_mse and MiniLM's attention_kl.

Pure functions against values computed by hand on tiny tensors; the registered terms on real
tiny BERT models (kdflow's ``transformer`` and a Hugging Face ``BertForSequenceClassification``
built from a config: nothing downloaded), and a distillation run through ``kd_lib.train.loop``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import Tensor

from kd_lib.config import ConfigError, LossTermConfig, TrainConfig
from kd_lib.config.train import FEATURE_LOSSES, TRANSFORMER_LOSSES
from kd_lib.models import huggingface
from kd_lib.models.text import textcnn
from kd_lib.models.transformer_layers import uniform_layer_map
from kd_lib.train.loop import distill
from kd_lib.train.losses import (
    LOSSES,
    LossInputs,
    Objective,
    attention_kl,
    build_objective,
    capture_features,
    hidden_mse,
    masked_log_softmax,
)
from tests.helpers import tiny_bert

VOCAB, PAD, LENGTH, CLASSES = 40, 0, 10, 3


def _bert(layers: int, hidden: int, heads: int, seed: int = 0) -> Any:
    return tiny_bert(
        layers, hidden, heads, length=LENGTH, vocab_size=VOCAB, num_classes=CLASSES, seed=seed, dropout=0.0
    )


def _ids(lengths: list[int], seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), LENGTH), generator=generator)
    for row, length in enumerate(lengths):
        ids[row, length:] = PAD
    return ids


def _objective(*terms: LossTermConfig) -> Objective:
    return build_objective(list(terms))


def _batch_loss(objective: Objective, student: torch.nn.Module, teacher: torch.nn.Module, ids: Tensor) -> Tensor:
    s_layers, t_layers = objective.feature_layers()
    logits, s_feats = capture_features(student, s_layers, ids)
    with torch.no_grad():
        t_logits, t_feats = capture_features(teacher, t_layers, ids)
    labels = torch.zeros(len(ids), dtype=torch.int64)
    return objective(LossInputs(logits, labels, t_logits, s_feats, t_feats, inputs=ids))


# --- pure functions ------------------------------------------------------------------------------


def test_hidden_mse_by_hand_and_padding_ignored() -> None:
    student = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    teacher = torch.tensor([[[0.0, 2.0], [3.0, 0.0], [0.0, 0.0]]])
    # position 0: (1^2 + 0^2) / 2 = 0.5; position 1: (0^2 + 4^2) / 2 = 8; position 2 is padding.
    mask = torch.tensor([[True, True, False]])
    assert hidden_mse(student, teacher, mask).item() == pytest.approx((0.5 + 8.0) / 2)
    assert hidden_mse(student[:, :2], teacher[:, :2]).item() == pytest.approx(4.25)
    with pytest.raises(ValueError, match="shapes differ"):
        hidden_mse(student, teacher[..., :1])


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def test_attention_kl_by_hand_per_head_mean_over_queries() -> None:
    teacher = torch.tensor([[[[0.5, 0.5], [0.75, 0.25]]]])  # [B=1, H=1, L=2, L=2]
    student = torch.tensor([[[[0.25, 0.75], [0.5, 0.5]]]])
    # KL(t||s) row by row: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) and 0.75 ln(0.75/0.5) + 0.25 ln(0.25/0.5).
    row0 = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    row1 = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    expected = (row0 + row1) / 2
    assert attention_kl(student.log(), teacher.log()).item() == pytest.approx(expected, abs=1e-6)
    assert attention_kl(teacher.log(), teacher.log()).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_kl_masks_padded_keys_and_queries() -> None:
    # The same 2-token distributions as above, in a 3-position batch whose last token is
    # padding: scores log(p) for the real keys, anything at the padded key and query.
    teacher_p = [[0.5, 0.5], [0.75, 0.25]]
    student_p = [[0.25, 0.75], [0.5, 0.5]]

    def scores(rows: list[list[float]]) -> Tensor:
        out = torch.full((1, 1, 3, 3), 7.0)
        out[0, 0, :2, :2] = torch.tensor(rows).log()
        return out

    mask = torch.tensor([[True, True, False]])
    loss = attention_kl(masked_log_softmax(scores(student_p), mask), masked_log_softmax(scores(teacher_p), mask), mask)
    expected = (_kl(teacher_p[0], student_p[0]) + _kl(teacher_p[1], student_p[1])) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_attention_kl_averages_heads_when_counts_differ() -> None:
    # Teacher: 2 heads, both queries of head 0 at [0.9, 0.1], of head 1 at [0.5, 0.5]: mean [0.7, 0.3].
    teacher = torch.tensor([[0.9, 0.1], [0.5, 0.5]])[:, None, :].expand(2, 2, 2)[None]  # [1, 2, 2, 2]
    student = torch.tensor([0.4, 0.6]).expand(1, 1, 2, 2)
    expected = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    assert attention_kl(student.log(), teacher.log()).item() == pytest.approx(expected, abs=1e-6)


def test_uniform_layer_map_is_tinyberts() -> None:
    assert uniform_layer_map(2, 4) == [(1, 2), (2, 4)]
    assert uniform_layer_map(4, 12) == [(1, 3), (2, 6), (3, 9), (4, 12)]
    assert uniform_layer_map(3, 4) == [(1, 1), (2, 2), (3, 4)]
    assert uniform_layer_map(4, 2) == [(1, 1), (2, 1), (3, 1), (4, 2)]


# --- registered terms on real models ----------------------------------------------------------


def test_terms_are_registered_feature_losses_the_config_knows() -> None:
    # The config checks archs by these names (it cannot import the registry).
    assert set(TRANSFORMER_LOSSES) == {"hidden_mse", "attention_kl"} and set(TRANSFORMER_LOSSES) <= set(FEATURE_LOSSES)
    for name in TRANSFORMER_LOSSES:
        assert LOSSES.get(name).needs_features and LOSSES.get(name).needs_teacher


def test_default_map_and_explicit_pairs_name_the_layers() -> None:
    student, teacher = _bert(2, 8, 2), _bert(4, 16, 4, seed=1)
    ids = _ids([10, 6, 3])
    objective = _objective(LossTermConfig(name="hidden_mse"), LossTermConfig(name="attention_kl"))
    objective.bind(student, teacher, ids)
    s_layers, t_layers = objective.feature_layers()
    assert s_layers == {
        "bert.bert.encoder.layer.0@hidden",
        "bert.bert.encoder.layer.1@hidden",
        "bert.bert.encoder.layer.0.attention.self@attention",
        "bert.bert.encoder.layer.1.attention.self@attention",
    }
    assert t_layers == {
        "bert.bert.encoder.layer.1@hidden",
        "bert.bert.encoder.layer.3@hidden",
        "bert.bert.encoder.layer.1.attention.self@attention",
        "bert.bert.encoder.layer.3.attention.self@attention",
    }
    explicit = _objective(LossTermConfig(name="hidden_mse", params={"layers": [[0, 0], [2, 3]]}))
    explicit.bind(student, teacher, ids)
    assert explicit.feature_layers() == (
        {"bert.bert.embeddings@hidden", "bert.bert.encoder.layer.1@hidden"},
        {"bert.bert.embeddings@hidden", "bert.bert.encoder.layer.2@hidden"},
    )


def test_a_student_identical_to_its_teacher_has_zero_loss_and_padding_is_masked() -> None:
    teacher = _bert(2, 8, 2)
    student = copy.deepcopy(teacher)
    objective = _objective(LossTermConfig(name="hidden_mse"), LossTermConfig(name="attention_kl"))
    ids = _ids([10, 4])
    objective.bind(student, teacher, ids)
    term: Any = objective.terms[0]
    assert term.projection is None  # same width: identity
    assert _batch_loss(objective, student, teacher, ids).item() == pytest.approx(0.0, abs=1e-6)
    # Perturb only what padding feeds: the pad token's embedding row. Real tokens never attend
    # to padding (masked keys), so only padded positions change, and the loss ignores those.
    # (Not a constant shift: the embeddings' LayerNorm would remove it.)
    shift = torch.linspace(-3.0, 3.0, 8)
    with torch.no_grad():
        student.bert.bert.embeddings.word_embeddings.weight[PAD] += shift
    assert _batch_loss(objective, student, teacher, ids).item() == pytest.approx(0.0, abs=1e-5)
    objective.epoch_means()
    # ... whereas the same change on a real token's row is seen.
    with torch.no_grad():
        student.bert.bert.embeddings.word_embeddings.weight[ids[0, 0]] += shift
    assert _batch_loss(objective, student, teacher, ids).item() > 1e-3


def test_recomputed_attention_equals_the_models_own_probabilities() -> None:
    model = _bert(2, 8, 2).eval()
    ids = _ids([10, 5])
    objective = _objective(LossTermConfig(name="attention_kl", params={"layers": [[2, 2]]}))
    objective.bind(model, model, ids)
    name = "bert.bert.encoder.layer.1.attention.self@attention"
    with torch.no_grad():
        _, feats = capture_features(model, {name}, ids)
        own = model.bert(input_ids=ids, attention_mask=(ids != PAD).long(), output_attentions=True).attentions[1]
    mask = ids != PAD
    mine = masked_log_softmax(feats[name], mask).exp()
    keys = mask[:, None, None, :].expand_as(own)
    torch.testing.assert_close(mine[keys], own[keys], atol=1e-6, rtol=1e-5)


def test_hidden_mse_projection_is_learned() -> None:
    student, teacher = _bert(1, 8, 2), _bert(2, 16, 4, seed=1)
    ids = _ids([10, 7, 2])
    objective = _objective(LossTermConfig(name="hidden_mse"))
    objective.bind(student, teacher, ids)
    names = [n for n, _ in objective.named_parameters()]
    assert names == ["terms.0.projection.weight"]
    term: Any = objective.terms[0]
    weight = term.projection.weight
    assert tuple(weight.shape) == (16, 8)
    before = weight.detach().clone()
    optimizer = torch.optim.SGD(list(student.parameters()) + list(objective.parameters()), lr=0.1)
    _batch_loss(objective, student, teacher, ids).backward()
    optimizer.step()
    assert not torch.equal(before, weight.detach())


def test_hugging_face_teacher_layers_under_model_bert() -> None:
    config = {
        "model_type": "bert",
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 32,
        "max_position_embeddings": 64,
        "num_labels": CLASSES,
        "pad_token_id": PAD,
    }
    torch.manual_seed(0)
    teacher = huggingface.build((LENGTH,), CLASSES, config, pad_id=PAD)  # sdpa attention: no probabilities
    student = _bert(2, 8, 2)
    ids = _ids([10, 3])
    objective = _objective(LossTermConfig(name="hidden_mse"), LossTermConfig(name="attention_kl"))
    objective.bind(student, teacher, ids)
    assert objective.feature_layers()[1] == {
        "model.bert.encoder.layer.1@hidden",
        "model.bert.encoder.layer.3@hidden",
        "model.bert.encoder.layer.1.attention.self@attention",
        "model.bert.encoder.layer.3.attention.self@attention",
    }
    loss = _batch_loss(objective, student, teacher, ids)
    assert torch.isfinite(loss) and loss.item() > 0


def test_a_distilbert_teacher_is_read_by_its_own_layout() -> None:
    """DistilBERT names its parts apart from BERT (``distilbert.transformer.layer.N``, the
    self-attention at ``attention`` with ``q_lin``/``k_lin``/``n_heads``): both terms find them,
    and the recomputed probabilities are the model's own."""
    config = {
        "model_type": "distilbert",
        "vocab_size": VOCAB,
        "dim": 16,
        "n_layers": 4,
        "n_heads": 4,
        "hidden_dim": 32,
        "max_position_embeddings": 64,
        "num_labels": CLASSES,
        "pad_token_id": PAD,
    }
    torch.manual_seed(0)
    teacher: Any = huggingface.build((LENGTH,), CLASSES, config, pad_id=PAD).eval()
    student = _bert(2, 8, 2)
    ids = _ids([10, 4])
    objective = _objective(LossTermConfig(name="hidden_mse"), LossTermConfig(name="attention_kl"))
    objective.bind(student, teacher, ids)
    prefix = "model.distilbert.transformer.layer"
    assert objective.feature_layers()[1] == {
        f"{prefix}.1@hidden",
        f"{prefix}.3@hidden",
        f"{prefix}.1.attention@attention",
        f"{prefix}.3.attention@attention",
    }
    loss = _batch_loss(objective, student, teacher, ids)
    assert torch.isfinite(loss) and loss.item() > 0
    teacher.model.set_attn_implementation("eager")  # eager attention returns its probabilities
    name = f"{prefix}.3.attention@attention"
    mask = ids != PAD
    with torch.no_grad():
        _, feats = capture_features(teacher, {name}, ids)
        own = teacher.model(input_ids=ids, attention_mask=mask.long(), output_attentions=True).attentions[3]
    keys = mask[:, None, None, :].expand_as(own)
    torch.testing.assert_close(masked_log_softmax(feats[name], mask).exp()[keys], own[keys], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["hidden_mse", "attention_kl"])
def test_a_non_transformer_model_is_a_config_error_at_bind(name: str) -> None:
    torch.manual_seed(0)
    cnn = textcnn((LENGTH,), CLASSES, vocab_size=VOCAB, pad_id=PAD, embedding=8, channels=4, kernel_sizes=[3])
    objective = _objective(LossTermConfig(name=name))
    with pytest.raises(ConfigError, match=f"loss '{name}'.*student \\(TextCnnClassifier\\).*arch transformer"):
        objective.bind(cnn, _bert(2, 8, 2), _ids([10]))
    with pytest.raises(ConfigError, match=f"loss '{name}'.*teacher \\(TextCnnClassifier\\)"):
        _objective(LossTermConfig(name=name)).bind(_bert(2, 8, 2), cnn, _ids([10]))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"layers": [[1, 9]]}, "teacher attention layer 9 is out of range: this encoder has layers 1 to 4"),
        ({"layers": [[0, 0]]}, "attention layer 0 is out of range"),
        ({"layers": [[1, "bert.bert.encoder.layer.1"]]}, "not a self-attention"),
    ],
)
def test_bad_attention_layers_are_config_errors(params: dict, message: str) -> None:
    objective = _objective(LossTermConfig(name="attention_kl", params=params))
    with pytest.raises(ConfigError, match=message):
        objective.bind(_bert(2, 8, 2), _bert(4, 16, 4), _ids([10]))


@pytest.mark.parametrize("layers", [[[1]], [[1, -1]], "1,2", [[True, 1]]])
def test_malformed_layer_pairs_are_refused_by_build_objective(layers: object) -> None:
    with pytest.raises(ConfigError, match=r"distill.losses\[0\].params: hidden_mse"):
        build_objective([LossTermConfig(name="hidden_mse", params={"layers": layers})])


def test_distilling_a_tiny_transformer_with_the_transformer_losses() -> None:
    teacher, student = _bert(4, 16, 4, seed=1).eval(), _bert(2, 8, 2)
    generator = torch.Generator().manual_seed(3)
    x = _ids([int(n) for n in torch.randint(2, LENGTH + 1, (48,), generator=generator)], seed=4)
    y = torch.randint(0, CLASSES, (48,), generator=generator)
    objective = build_objective(
        [
            LossTermConfig(name="kd", weight=0.5, params={"temperature": 2}),
            LossTermConfig(name="hidden_mse", weight=1.0, params={"layers": [[1, 2], [2, 4]]}),
            LossTermConfig(name="attention_kl", weight=1.0),
        ]
    )
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.01, seed=0, patience=10)
    result = distill(student, teacher, objective, x[:32], y[:32], x[32:], y[32:], cfg, pad_id=PAD)
    history = result.history
    assert len(history) == 3
    for record in history:
        assert all(math.isfinite(record[k]) for k in ("loss_kd", "loss_hidden_mse", "loss_attention_kl"))
    # The student (with W_h) moves towards the teacher's hidden states.
    assert history[-1]["loss_hidden_mse"] < history[0]["loss_hidden_mse"]
