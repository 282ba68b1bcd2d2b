"""The data-parallel parts of the training loop: one global batch computed by all ranks.

``kd_lib.train.loop._fit`` calls these when ``kd_lib.train.ranks.current()`` is set: every
rank runs the loop with the same arguments and the same global batches as one process, each
computes its slice of every batch under DistributedDataParallel (``step``), and the epoch's
numbers are summed over the ranks (``reduce_epoch``), so all ranks log the same history and
take the same early-stopping decision.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lib.config import ConfigError, TrainConfig
from kd_lib.data.augment import Augment
from kd_lib.data.lazy import Samples
from kd_lib.train.losses import Objective
from kd_lib.train.ranks import Ranks


class BatchLossModule(nn.Module):
    """The model and the objective behind one forward that returns the batch loss.

    DistributedDataParallel synchronizes the gradients of the module it wraps, so the
    objective's learnable parts must sit in it beside the model.
    """

    def __init__(
        self, model: nn.Module, objective: Objective | None, loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor]
    ) -> None:
        super().__init__()
        self.model = model
        self.objective = objective
        self.loss_fn = loss_fn

    def forward(self, xb: Tensor, idx: Tensor) -> Tensor:
        return self.loss_fn(self.model, xb, idx)


def to_sync_batchnorm(model: nn.Module, ranks: Ranks | None = None) -> Callable[[], None]:
    """Replace every BatchNorm inside ``model`` by ``torch.nn.SyncBatchNorm``, in place.

    The SyncBatchNorm layers share the BatchNorm layers' parameters (the optimizer built
    before keeps training them), so under DistributedDataParallel the batch mean and variance
    are those of the global batch. Returns the undo: it puts the original BatchNorm modules
    back, holding the trained values (the state dict keys are the same either way), so the
    saved model is an ordinary one that exports and quantizes as before.

    Args:
        model: Holds ``nn.BatchNorm1d/2d/3d`` children anywhere below it.
        ranks: The current ranks; their device must be CUDA (None skips the check, for tests).

    Raises:
        ConfigError: the ranks do not run on CUDA (SyncBatchNorm has no CPU kernel).
    """
    if ranks is not None and ranks.device.type != "cuda":
        raise ConfigError(
            f"train.sync_batchnorm needs CUDA ranks, but this run trains on {ranks.device.type} "
            "(torch's SyncBatchNorm does not run on CPU/gloo)",
            "set train.device: cuda, or remove train.sync_batchnorm: each rank then keeps its own BatchNorm "
            "statistics and rank 0's are saved",
        )
    originals = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm)
    ]
    for parent, name, child in originals:
        setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))

    def undo() -> None:
        for parent, name, child in originals:
            child.load_state_dict(getattr(parent, name).state_dict())
            setattr(parent, name, child)

    return undo


def wrap(module: nn.Module, ranks: Ranks) -> nn.Module:
    """``module`` under DistributedDataParallel; it starts every rank from rank 0's weights."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ranks.device.index] if ranks.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def check_world(ranks: Ranks, n_train: int, n_val: int, cfg: TrainConfig) -> None:
    """Every rank needs a sample of each batch and of each split.

    Raises:
        ConfigError: ``batch_size`` is below the number of processes.
        ValueError: a split has fewer samples than processes.
    """
    if cfg.batch_size < ranks.world_size:
        raise ConfigError(
            f"train.batch_size {cfg.batch_size} is smaller than the {ranks.world_size} processes of train.distributed: "
            "every process needs a sample of each batch; raise batch_size or lower nproc_per_node"
        )
    if min(n_train, n_val) < ranks.world_size:
        raise ValueError(
            f"{n_train} training / {n_val} validation samples cannot be split over {ranks.world_size} processes"
        )


def step(
    ddp_loss: nn.Module,
    ranks: Ranks,
    x_train: Samples,
    idx: Tensor,
    augment: Augment | None,
    augment_generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    objective: Objective | None,
    device: torch.device,
) -> float:
    """One optimizer step on the global batch ``idx`` [B], this rank computing its slice.

    The loss of every term is a mean over the batch, and DDP averages gradients over the W
    ranks; scaling this rank's mean loss by ``b_r * W / B`` (b_r: its samples) makes that
    average the gradient of the mean over the whole global batch, also when B is not a
    multiple of W. A rank left without samples (a last batch smaller than W) still joins the
    all-reduce, with one sample weighted 0.

    Returns:
        This rank's sum of per-sample losses (for the epoch's train_loss).
    """
    lo, hi = ranks.bounds(len(idx))
    if augment is not None:
        # Augment the whole global batch with the shared generator: the random stream and the
        # augmented samples are a single process's, whatever the slice.
        xb = augment(x_train[idx].to(device), augment_generator)
        mine = xb[lo:hi] if hi > lo else xb[:1]
    else:
        mine = x_train[idx[lo:hi] if hi > lo else idx[:1]].to(device)
    mine_idx = idx[lo:hi] if hi > lo else idx[:1]
    count = hi - lo
    untracked = objective.untracked() if objective is not None and count == 0 else contextlib.nullcontext()
    with untracked:
        loss = ddp_loss(mine, mine_idx.to(device))
    optimizer.zero_grad(set_to_none=True)
    (loss * (count * ranks.world_size / len(idx))).backward()
    optimizer.step()
    return loss.item() * count


def reduce_epoch(
    ranks: Ranks,
    val_logits: Tensor,
    y_val: Tensor,
    loss_sum: float,
    objective: Objective | None,
) -> tuple[float, float, float, dict[str, float]]:
    """The epoch's numbers over all ranks: (train loss sum, val loss, val accuracy, term means).

    Each rank validates its shard of the validation set; the sums are all-reduced, so every
    rank gets the same accuracy (an exact count) and takes the same early-stopping decision.

    Args:
        ranks: This process's place in the group.
        val_logits: ``[hi - lo, C]`` this rank's logits on its ``ranks.bounds(M)`` shard.
        y_val: ``[M]`` int64, the whole validation set's labels.
        loss_sum: This rank's sum of per-sample training losses.
        objective: The distillation objective, whose per-term sums are reduced too.
    """
    lo, hi = ranks.bounds(len(y_val))
    ce_sum = F.cross_entropy(val_logits, y_val[lo:hi], reduction="sum").item()
    correct = (val_logits.argmax(dim=1) == y_val[lo:hi]).sum().item()
    # Per-term sums over this rank's samples (the zero-weighted stand-in samples are not counted).
    terms, counted = objective.epoch_sums() if objective is not None else ({}, 0)
    keys = sorted(terms)  # the same on every rank: each computed every active term
    totals = ranks.all_reduce_sum([loss_sum, ce_sum, float(correct), float(counted)] + [terms[k] for k in keys])
    loss_sum, ce_sum, all_correct, all_counted = totals[:4]
    m = len(y_val)
    # As one process computes it (a float32 mean of 0/1), so the logged value is the same.
    val_acc = (torch.tensor(all_correct, dtype=torch.float32) / m).item()
    means = {k: v / all_counted for k, v in zip(keys, totals[4:], strict=True)} if all_counted else {}
    return loss_sum, ce_sum / m, val_acc, means
