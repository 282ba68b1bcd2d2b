"""BatchNorm while distilling: the teacher teaches in eval mode (its running statistics never
move, cached or live, logits or features), and probing the student does not move its own."""

from __future__ import annotations

import json

import pytest
import torch
from torch import Tensor, nn

from kd_lib.config import AugmentConfig, ConfigError, LossTermConfig, TrainConfig, parse_config
from kd_lib.data.augment import make_augment
from kd_lib.models.resnet import resnet
from kd_lib.train.ddp import to_sync_batchnorm
from kd_lib.train.loop import distill
from kd_lib.train.losses import build_objective
from kd_lib.train.objective import eval_mode
from kd_lib.train.ranks import Ranks

SHAPE = (1, 8, 8)


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(before: dict[str, Tensor], after: nn.Module) -> None:
    now = after.state_dict()
    changed = [k for k in before if not torch.equal(before[k], now[k])]
    assert not changed, f"changed while teaching: {changed[:5]}"


def _teacher() -> nn.Module:
    torch.manual_seed(0)
    teacher = resnet(SHAPE, 10, depth=8, width=0.5)
    # A teacher trained elsewhere: running statistics far from the (0, 1) a new BatchNorm starts with.
    gen = torch.Generator().manual_seed(1)
    for m in teacher.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert m.running_mean is not None and m.running_var is not None and m.num_batches_tracked is not None
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.num_batches_tracked.fill_(100)
    return teacher.train()  # handed over in train mode: distill must switch it


@pytest.mark.parametrize(
    ("losses", "augment"),
    [
        ([{"name": "kd", "params": {"temperature": 4.0}}, {"name": "ce"}], False),  # cached logits
        ([{"name": "kd", "params": {"temperature": 4.0}}], True),  # live teacher on augmented batches
        ([{"name": "fitnets"}, {"name": "ce"}], False),  # live features (FitNets: layer3 by default)
        ([{"name": "at", "params": {"student_layer": "layer2", "teacher_layer": "layer2"}}, {"name": "ce"}], True),
    ],
)
def test_the_teachers_batchnorm_statistics_never_change_while_it_teaches(losses: list[dict], augment: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(96, *SHAPE, generator=gen), torch.randint(0, 10, (96,), generator=gen)
    teacher = _teacher()
    before = _buffers(teacher)
    torch.manual_seed(3)
    student = resnet(SHAPE, 10, depth=8, width=0.25)
    objective = build_objective([LossTermConfig(**t) for t in losses])
    aug = make_augment(AugmentConfig(random_crop_padding=1), SHAPE) if augment else None
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.01, keep="last")
    result = distill(student, teacher, objective, x[:64], y[:64], x[64:], y[64:], cfg, augment=aug)
    _assert_same(before, teacher)
    assert not teacher.training
    # The student did train its own BatchNorm statistics (the test's BN is live at all).
    new = resnet(SHAPE, 10, depth=8, width=0.25)
    key = "stem.1.running_mean"
    assert not torch.equal(result.model.state_dict()[key], new.state_dict()[key])


def test_binding_feature_losses_leaves_both_models_modes_and_statistics_alone() -> None:
    teacher = _teacher()
    torch.manual_seed(3)
    student = resnet(SHAPE, 10, depth=8, width=0.25).train()
    before_t, before_s = _buffers(teacher), _buffers(student)
    objective = build_objective([LossTermConfig(name="fitnets"), LossTermConfig(name="at")])
    objective.bind(student, teacher, torch.randn(2, *SHAPE) * 3 + 1)
    _assert_same(before_t, teacher)
    _assert_same(before_s, student)
    assert student.training and teacher.training  # each as it was


def test_eval_mode_restores_every_submodules_own_flag() -> None:
    model = resnet(SHAPE, 10, depth=8, width=0.25).train()
    model.layer2.eval()  # a mixed state, e.g. a frozen stage
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model.layer1.training and not model.layer2.training
    assert not any(m.training for m in model.layer2.modules())


def test_sync_batchnorm_is_off_by_default_and_leaves_the_config_hash_alone() -> None:
    plain = parse_config({})
    assert plain.teacher.train.sync_batchnorm is False and plain.distill.train.sync_batchnorm is False
    assert "sync_batchnorm" not in json.dumps(plain.model_dump(exclude=plain._unset_extensions()))
    written = parse_config({"distill": {"train": {"sync_batchnorm": False}}})
    assert written.config_hash() == plain.config_hash()
    on = parse_config({"distill": {"train": {"sync_batchnorm": True, "device": "cuda"}}})
    assert on.config_hash() != plain.config_hash()


@pytest.mark.parametrize(
    "train",
    [{"sync_batchnorm": True}, {"sync_batchnorm": True, "device": "auto", "distributed": {"backend": "gloo"}}],
)
def test_sync_batchnorm_on_cpu_or_gloo_is_a_config_error_with_the_fix(train: dict) -> None:
    with pytest.raises(ConfigError, match=r"distill.train.*sync_batchnorm needs CUDA.*rank 0's are saved"):
        parse_config({"distill": {"train": train}})


def test_sync_batchnorm_is_refused_for_ranks_that_are_not_on_cuda() -> None:
    ranks = Ranks(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="needs CUDA ranks.*trains on cpu"):
        to_sync_batchnorm(resnet(SHAPE, 10, depth=8, width=0.25), ranks)


def test_to_sync_batchnorm_converts_in_place_and_undo_restores_plain_batchnorm_with_the_new_values() -> None:
    model = resnet(SHAPE, 10, depth=8, width=0.25)
    params = {id(p) for p in model.parameters()}
    originals = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    undo = to_sync_batchnorm(model)
    syncs = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert len(syncs) == len(originals) and not any(type(m) is nn.BatchNorm2d for m in model.modules())
    # The optimizer built before the conversion still holds the parameters being trained.
    assert {id(p) for p in model.parameters()} == params
    for i, sync in enumerate(syncs):  # what training under DDP would leave in the sync layers
        sync.running_mean = torch.full((sync.num_features,), float(i))
        sync.num_batches_tracked = torch.tensor(7)
    undo()
    restored = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert restored == originals and not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    for i, m in enumerate(restored):
        state = m.state_dict()
        assert torch.equal(state["running_mean"], torch.full((m.num_features,), float(i)))
        assert int(state["num_batches_tracked"]) == 7
    assert model.eval()(torch.randn(2, *SHAPE)).shape == (2, 10)
