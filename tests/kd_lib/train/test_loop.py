from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import Tensor, nn

from kd_lib.config import AugmentConfig, ConfigError, LossTermConfig, TrainConfig
from kd_lib.data.augment import make_augment
from kd_lib.models.builders import mlp
from kd_lib.train.inference import compute_logits
from kd_lib.train.loop import _fit, distill, resolve_device, train_supervised
from kd_lib.train.losses import build_objective
from tests.helpers import TableTeacher

Data = tuple[Tensor, Tensor, Tensor, Tensor]


def _student(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)  # initial weights are the caller's to seed
    return mlp((8,), 3, width=16, depth=1, dropout=dropout)


def _linear(model: nn.Module, index: int) -> nn.Linear:
    """Layer ``index`` of a trained ``_student()`` (an ``nn.Sequential``), which must be a Linear."""
    assert isinstance(model, nn.Sequential)
    layer = model[index]
    assert isinstance(layer, nn.Linear)
    return layer


def _val_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return (compute_logits(model, x).argmax(1) == y).float().mean().item()


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_learns_a_separable_problem(blobs: Data, fast_cfg: TrainConfig) -> None:
    x_train, y_train, x_val, y_val = blobs
    seen: list[dict] = []
    result = train_supervised(_student(), x_train, y_train, x_val, y_val, fast_cfg, on_epoch=seen.append)
    assert result.best_val_accuracy > 0.9
    assert _val_accuracy(result.model, x_val, y_val) == pytest.approx(result.best_val_accuracy)
    assert not result.model.training
    assert next(result.model.parameters()).device.type == "cpu"
    assert [h["epoch"] for h in result.history] == list(range(1, fast_cfg.epochs + 1))
    assert seen == result.history
    assert set(seen[0]) == {"epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"}
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert not result.stopped_early


def test_tied_validation_accuracy_is_broken_by_the_lower_validation_loss(blobs: Data) -> None:
    x_train, y_train, x_val, y_val = blobs
    # Three easy validation samples: accuracy sits at 100% for most epochs while the loss still falls.
    cfg = TrainConfig(epochs=12, batch_size=32, lr=0.01, patience=100, seed=0)
    result = train_supervised(_student(), x_train, y_train, x_val[:3], y_val[:3], cfg)
    perfect = [h for h in result.history if h["val_accuracy"] == 1.0]
    assert len(perfect) >= 2, "the case needs a tie"
    assert result.best_epoch == min(perfect, key=lambda h: h["val_loss"])["epoch"]
    assert result.best_epoch != perfect[0]["epoch"]  # not simply the first epoch to reach the best accuracy


def test_early_stopping_stops_and_restores_the_best_epoch(blobs: Data) -> None:
    x_train, y_train, x_val, _ = blobs
    # Random validation labels: accuracy wanders around chance, so it soon stops improving.
    noisy_val = torch.randint(0, 3, (len(x_val),), generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(epochs=40, batch_size=32, lr=0.05, patience=2, seed=0, scheduler="none")
    model = _student()
    snapshots: dict[int, dict[str, Tensor]] = {}

    def snapshot(record: dict) -> None:
        snapshots[record["epoch"]] = copy.deepcopy(model.state_dict())

    result = train_supervised(model, x_train, y_train, x_val, noisy_val, cfg, on_epoch=snapshot)
    accuracies = [h["val_accuracy"] for h in result.history]
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + cfg.patience < cfg.epochs
    best_record = max(result.history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    assert result.best_epoch == best_record["epoch"]
    assert result.best_val_accuracy == max(accuracies)
    best = snapshots[result.best_epoch]
    assert all(torch.equal(result.model.state_dict()[k], best[k]) for k in best)
    last = snapshots[len(result.history)]
    assert not all(torch.equal(result.model.state_dict()[k], last[k]) for k in last)


def test_keep_last_trains_every_epoch_and_returns_the_final_weights(blobs: Data) -> None:
    x_train, y_train, x_val, _ = blobs
    # Random validation labels, as above: the best validation epoch is an early one, not the last.
    noisy_val = torch.randint(0, 3, (len(x_val),), generator=torch.Generator().manual_seed(3))
    cfg = TrainConfig(epochs=12, batch_size=32, lr=0.05, seed=0, scheduler="none", keep="last")
    model = _student()
    snapshots: dict[int, dict[str, Tensor]] = {}

    def snapshot(record: dict) -> None:
        snapshots[record["epoch"]] = copy.deepcopy(model.state_dict())

    result = train_supervised(model, x_train, y_train, x_val, noisy_val, cfg, on_epoch=snapshot)
    best_record = max(result.history, key=lambda h: (h["val_accuracy"], -h["val_loss"]))
    assert best_record["epoch"] < cfg.epochs - cfg.patience, "the case needs an early best epoch"
    assert not result.stopped_early and len(result.history) == cfg.epochs
    assert result.best_epoch == cfg.epochs and result.keep == "last"
    assert result.best_val_accuracy == result.history[-1]["val_accuracy"]
    assert all(torch.equal(result.model.state_dict()[k], v) for k, v in snapshots[cfg.epochs].items())
    early = snapshots[best_record["epoch"]]
    assert not all(torch.equal(result.model.state_dict()[k], early[k]) for k in early)


def test_training_is_deterministic(blobs: Data, fast_cfg: TrainConfig) -> None:
    x_train, y_train, x_val, y_val = blobs
    cfg = fast_cfg.model_copy(update={"epochs": 4})
    runs = []
    for noise in (1, 99):
        model = _student(dropout=0.3)
        torch.rand(noise)  # disturb the global RNG: training must reseed it for dropout
        runs.append(train_supervised(model, x_train, y_train, x_val, y_val, cfg).model)
    assert _same_weights(runs[0], runs[1])
    other_seed = train_supervised(
        _student(dropout=0.3), x_train, y_train, x_val, y_val, cfg.model_copy(update={"seed": 1})
    ).model
    assert not _same_weights(runs[0], other_seed)


def _kd(temperature: float = 2.0, ce_weight: float = 0.0):
    terms = [LossTermConfig(name="kd", weight=1.0, params={"temperature": temperature})]
    if ce_weight:
        terms.append(LossTermConfig(name="ce", weight=ce_weight))
    return build_objective(terms)


def test_distill_with_ce_only_is_supervised_training(blobs: Data, fast_cfg: TrainConfig) -> None:
    x_train, y_train, x_val, y_val = blobs
    cfg = fast_cfg.model_copy(update={"epochs": 3})
    supervised = train_supervised(_student(), x_train, y_train, x_val, y_val, cfg).model
    ce_only = build_objective([LossTermConfig(name="ce")])
    baseline = distill(_student(), None, ce_only, x_train, y_train, x_val, y_val, cfg).model
    assert _same_weights(supervised, baseline)


def test_distill_learns_from_teacher_logits_alone(blobs: Data, fast_cfg: TrainConfig) -> None:
    x_train, y_train, x_val, y_val = blobs
    teacher = TableTeacher(x_train, nn.functional.one_hot(y_train, 3).float() * 10)
    useless_labels = torch.zeros_like(y_train)  # kd alone: the labels must not matter
    result = distill(_student(), teacher, _kd(), x_train, useless_labels, x_val, y_val, fast_cfg)
    assert result.best_val_accuracy > 0.9
    assert teacher.calls == 1  # cached: one batched pass (compute_logits, batch 512) for all 240 samples


def test_the_cache_changes_nothing_but_the_teacher_calls(blobs: Data, fast_cfg: TrainConfig) -> None:
    x_train, y_train, x_val, y_val = blobs
    cfg = fast_cfg.model_copy(update={"epochs": 2})
    teacher = TableTeacher(x_train, torch.randn(len(x_train), 3, generator=torch.Generator().manual_seed(1)))
    cached = distill(_student(), teacher, _kd(ce_weight=0.5), x_train, y_train, x_val, y_val, cfg)
    calls_cached, teacher.calls = teacher.calls, 0
    live = distill(
        _student(), teacher, _kd(ce_weight=0.5), x_train, y_train, x_val, y_val, cfg, cache_teacher_logits=False
    )
    assert calls_cached == 1 and teacher.calls == 2 * 8  # 240 samples / 32 per batch, 2 epochs
    assert torch.allclose(_linear(cached.model, 1).weight, _linear(live.model, 1).weight, atol=1e-5)


def test_augmentation_runs_the_teacher_on_each_augmented_batch(blobs: Data, fast_cfg: TrainConfig) -> None:
    x_train, y_train, x_val, y_val = blobs
    cfg = fast_cfg.model_copy(update={"epochs": 1})
    seen: list[Tensor] = []

    class Recorder(nn.Module):
        def forward(self, batch: Tensor) -> Tensor:
            seen.append(batch.clone())
            return torch.zeros(len(batch), 3)

    augment = make_augment(AugmentConfig(noise_std=0.5), (8,))
    distill(_student(), Recorder(), _kd(ce_weight=0.5), x_train, y_train, x_val, y_val, cfg, augment=augment)
    assert len(seen) == 8  # live: one teacher call per batch, no cache pass
    # Each teacher batch is noisy (not a row of x_train): the teacher saw what the student saw.
    rows = {tuple(r.tolist()) for r in x_train}
    assert not any(tuple(r.tolist()) in rows for r in seen[0])


def test_teacher_logits_are_matched_by_sample_index(blobs: Data, fast_cfg: TrainConfig) -> None:
    x_train, y_train, x_val, y_val = blobs
    perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(7))

    def run(x: Tensor, teacher_labels: Tensor, val_labels: Tensor) -> float:
        # The cache is computed once in x's order; batches are shuffled and look rows up by index.
        teacher = TableTeacher(x, nn.functional.one_hot(teacher_labels, 3).float() * 10)
        no_labels = torch.zeros(len(x), dtype=torch.int64)
        result = distill(_student(), teacher, _kd(), x, no_labels, x_val, val_labels, fast_cfg)
        return result.best_val_accuracy

    # Reordering samples and teacher rows together keeps each sample's target: still learns.
    assert run(x_train[perm], y_train[perm], y_val) > 0.9
    # A teacher that maps every class c to c+1 is followed sample by sample: the student learns
    # the shifted labelling, which only happens if row i of the logits is used for sample i.
    shifted_val = (y_val + 1) % 3
    assert run(x_train, (y_train + 1) % 3, shifted_val) > 0.9
    assert run(x_train, (y_train + 1) % 3, y_val) < 0.4


def test_fit_hands_the_loss_the_indices_of_the_batch_it_ran() -> None:
    x = torch.arange(20, dtype=torch.float32).reshape(20, 1)
    seen_inputs: list[Tensor] = []
    seen_indices: list[Tensor] = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(1, 2)

        def forward(self, batch: Tensor) -> Tensor:
            if self.training:
                seen_inputs.append(batch.clone())
            return self.linear(batch)

    def loss_fn(model: nn.Module, batch: Tensor, idx: Tensor) -> Tensor:
        seen_indices.append(idx.clone())
        return model(batch).pow(2).mean()

    cfg = TrainConfig(epochs=2, batch_size=6, patience=5, seed=0)
    _fit(Spy(), x, x[:4], torch.zeros(4, dtype=torch.int64), cfg, loss_fn, torch.device("cpu"), None)
    assert len(seen_indices) == 8  # 4 batches (6, 6, 6, 2) per epoch
    for batch, idx in zip(seen_inputs, seen_indices, strict=True):  # one training forward per loss call
        assert torch.equal(batch, x[idx])
    first_epoch = torch.cat(seen_indices[:4])
    assert sorted(first_epoch.tolist()) == list(range(20))
    assert first_epoch.tolist() != list(range(20))  # actually shuffled


def test_lr_schedules(blobs: Data) -> None:
    x_train, y_train, x_val, y_val = blobs
    small = (x_train[:32], y_train[:32], x_val[:8], y_val[:8])

    def lrs(**update: object) -> list[float]:
        cfg = TrainConfig(epochs=6, batch_size=32, lr=0.1, patience=10, seed=0, **update)
        return [h["lr"] for h in train_supervised(_student(), *small, cfg).history]

    assert lrs(scheduler="step", optimizer="sgd") == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cosine = lrs(scheduler="cosine", optimizer="adamw")
    assert cosine[0] == pytest.approx(0.1) and all(a > b for a, b in itertools.pairwise(cosine))
    assert lrs(scheduler="none", optimizer="adam") == pytest.approx([0.1] * 6)


def test_mismatched_inputs_raise(blobs: Data, fast_cfg: TrainConfig) -> None:
    x_train, y_train, x_val, y_val = blobs
    with pytest.raises(ValueError, match="needs a teacher"):
        distill(_student(), None, _kd(), x_train, y_train, x_val, y_val, fast_cfg)
    with pytest.raises(ValueError, match="x_train has 240 samples but y_train has 239"):
        train_supervised(_student(), x_train, y_train[:-1], x_val, y_val, fast_cfg)


def test_compute_logits_batches_and_restores_mode() -> None:
    model = _student(dropout=0.5).train()
    x = torch.randn(37, 8)
    logits = compute_logits(model, x, batch_size=5)
    assert logits.shape == (37, 3)
    assert model.training
    model.eval()
    with torch.no_grad():
        assert torch.allclose(logits, model(x), atol=1e-6)


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")
