"""Teacher training and distillation loops.

Both are the same minibatch loop (``_fit``) with a different loss: supervised training uses
cross-entropy on the labels, distillation the configured ``Objective`` (kd, dkd, fitnets, at,
ce, weighted). The loss function receives the SAMPLE INDICES of each batch, so cached
teacher logits are looked up by sample, never by batch position, and shuffling cannot
misalign them.

Teacher logits are cached (computed once per training set, reused every epoch) when nothing
changes the teacher's input or needs more than its logits; with augmentation, or a
feature-based loss, the teacher runs live on every batch.

Under torchrun (``kd_lib.train.ranks``) the same loop runs on every rank, data-parallel, with
the global batches of a single process: see ``_fit``.

Training samples are a tensor, or samples read lazily (``kd_lib.data.lazy.LazySamples``: image
folders and tables), indexed alike. Lazy samples are read by ``num_workers`` ``DataLoader``
worker processes ahead of the step (pinned memory on a GPU); the batch order stays the seeded
one, so a run gives the same weights with any number of workers. A teacher-logit cache too big
to hold comfortably in memory is a memory-mapped file instead (``_teacher_cache``).
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kd_lib.config import PREDICT_BATCH_SIZE, ConfigError, TrainConfig
from kd_lib.data.augment import Augment
from kd_lib.data.lazy import Concat, LazySamples, Samples
from kd_lib.train import ddp
from kd_lib.train.checkpoint import (
    CHECKPOINT_FILE,
    load_checkpoint,
    restore_training_state,
    save_checkpoint,
    training_state,
)
from kd_lib.train.inference import compute_logits, trim_padding
from kd_lib.train.losses import LossInputs, Objective, capture_features
from kd_lib.train.objective import UNLABELED, eval_mode
from kd_lib.train.ranks import current, resolve_device

EpochCallback = Callable[[dict[str, Any]], None]
# (model, input batch [B, *input_shape] on the device, sample indices of the batch [B] int64 on
# the device) -> scalar. The loss runs the forward pass itself: feature losses hook into it.
BatchLoss = Callable[[nn.Module, Tensor, Tensor], Tensor]


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        model: The trained module holding the weights of the kept epoch (``TrainConfig.keep``: the
            best validation epoch, or the last), on CPU, in eval mode.
        history: One dict per epoch run: ``epoch`` (1-based), ``train_loss``, ``val_loss``
            (hard-label cross-entropy, so teacher and student curves compare), ``val_accuracy``
            (fraction), ``lr`` (used during that epoch), ``seconds``.
        best_epoch: 1-based epoch whose weights ``model`` holds (the last one with ``keep`` "last").
        best_val_accuracy: Validation accuracy of that epoch.
        stopped_early: True when early stopping ended the run before ``cfg.epochs``.
        keep: ``TrainConfig.keep`` of the run: which epoch ``best_epoch`` is.
    """

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    stopped_early: bool = False
    keep: Literal["best", "last"] = "best"


def _optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        # Plain SGD without momentum trains small nets far slower; 0.9 is the usual default.
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ConfigError(f"train.optimizer {cfg.optimizer!r} is not one of adam, adamw, sgd")


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    if cfg.scheduler == "none":
        return None
    raise ConfigError(f"train.scheduler {cfg.scheduler!r} is not one of cosine, step, none")


def _check_data(x_train: Samples, y_train: Tensor, x_val: Samples, y_val: Tensor) -> None:
    if len(x_train) != len(y_train):
        raise ValueError(f"x_train has {len(x_train)} samples but y_train has {len(y_train)}")
    if len(x_val) != len(y_val):
        raise ValueError(f"x_val has {len(x_val)} samples but y_val has {len(y_val)}")
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError(f"training needs samples: got {len(x_train)} train and {len(x_val)} validation")


def _step(
    model: nn.Module,
    loss_fn: BatchLoss,
    optimizer: torch.optim.Optimizer,
    batch: Tensor,
    idx: Tensor,
    device: torch.device,
    augment: Augment | None,
    augment_generator: torch.Generator,
    pad_id: int | None = None,
) -> float:
    """One optimizer step on ``batch``, the samples ``idx`` of the training set (augmented when
    ``augment`` is set; a text batch trimmed to its longest row); returns the batch's summed
    loss (mean loss times batch size) for the epoch's mean."""
    xb = trim_padding(batch, pad_id).to(device, non_blocking=True)
    if augment is not None:
        xb = augment(xb, augment_generator)
    loss = loss_fn(model, xb, idx.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item() * len(idx)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # a worker decodes; the main process's threads do the math


def _batches(
    x: Samples, order: Tensor, batch_size: int, num_workers: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(idx, x[idx])`` for each batch of ``order``, in order: read ahead by ``num_workers``
    ``DataLoader`` workers when ``x`` is read lazily, indexed in place when it is a tensor."""
    chunks = list(torch.split(order, batch_size))
    if num_workers == 0 or not isinstance(x, LazySamples):
        for idx in chunks:
            yield idx, x[idx]
        return
    # Lazy samples index by a tensor of positions too: each item the sampler names is a whole batch.
    loader = DataLoader(
        x,
        sampler=chunks,  # a batch's indices, not one sample's
        batch_size=None,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_one_thread,
        prefetch_factor=2,
    )
    yield from zip(chunks, loader, strict=True)


def _fit(
    model: nn.Module,
    x_train: Samples,
    x_val: Samples,
    y_val: Tensor,
    cfg: TrainConfig,
    loss_fn: BatchLoss,
    device: torch.device,
    on_epoch: EpochCallback | None,
    checkpoint_dir: str | Path | None = None,
    augment: Augment | None = None,
    objective: Objective | None = None,
    pad_id: int | None = None,
    num_workers: int = 0,
) -> TrainResult:
    """The one training loop: shuffled minibatches, LR schedule, early stopping, best-epoch restore.

    ``loss_fn(model, batch_x, batch_idx)`` gets the (augmented) inputs and the indices into
    ``x_train`` of the samples in the batch, runs the forward pass and looks up whatever
    targets it needs (labels, cached teacher logits) by those indices. ``objective``'s own
    parameters (FitNets' regressor) are optimized and checkpointed with the model's.

    Inside a rank of a multi-process step (``kd_lib.train.ranks.current()`` is set) every rank
    calls this with the same arguments: each computes its slice of every global batch under
    DistributedDataParallel (``kd_lib.train.ddp.step``), the epoch's numbers are all-reduced
    (``ddp.reduce_epoch``), and only rank 0 calls ``on_epoch`` and writes the checkpoint.

    ``pad_id`` (text data) trims every batch to its longest row (``trim_padding``); the ranks
    of a multi-process run keep the full padded rows.
    """
    # Seeds dropout and anything else drawing from the global RNG during training. The model's
    # initial weights were drawn by the caller when it built the model, so seeding before
    # build_model is the caller's job.
    ranks = current()  # None: one process, the loop exactly as it always was
    torch.manual_seed(cfg.seed if ranks is None else ranks.seed(cfg.seed))
    # Private generators make the batch order and the augmentation depend on cfg.seed alone
    # (the same on every rank: each draws the global order and augments the global batch).
    generator = torch.Generator().manual_seed(cfg.seed)
    augment_generator = torch.Generator().manual_seed(cfg.seed + 1)
    model.to(device)
    params = list(model.parameters()) + (list(objective.parameters()) if objective is not None else [])
    optimizer = _optimizer(params, cfg)
    scheduler = _scheduler(optimizer, cfg)
    undo_sync: Callable[[], None] | None = None
    if ranks is not None:
        ddp.check_world(ranks, len(x_train), len(x_val), cfg)
        # DDP wraps model and objective together so the objective's learnable parts (FitNets'
        # regressor) get averaged gradients too; it starts every rank from rank 0's weights.
        # SyncBatchNorm: global-batch statistics; undone before the weights are returned.
        undo_sync = ddp.to_sync_batchnorm(model, ranks) if cfg.sync_batchnorm else None
        ddp_loss = ddp.wrap(ddp.BatchLossModule(model, objective, loss_fn), ranks)

    history: list[dict[str, Any]] = []
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, best_acc, best_loss, since_best, stopped_early = 0, -1.0, math.inf, 0, False
    first_epoch = 1
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    state = load_checkpoint(ckpt) if ckpt is not None and ckpt.is_file() and (ranks is None or ranks.is_main) else None
    if ranks is not None:
        # Rank 0 reads, every rank resumes: the other ranks may not see rank 0's disk (other pods).
        state = ranks.broadcast(state)
    if state is not None:
        rank = ranks.rank if ranks is not None else None
        restore_training_state(state, model, optimizer, scheduler, generator, augment_generator, objective, rank)
        best_state, best_epoch, best_acc = state["best_state"], state["best_epoch"], state["best_acc"]
        best_loss = state.get("best_loss", math.inf)  # checkpoints written before the tie-break
        since_best, history = state["since_best"], state["history"]
        first_epoch = state["epoch"] + 1
        stopped_early = state["stopped_early"]
    n = len(x_train)
    for epoch in range(first_epoch, cfg.epochs + 1):
        if stopped_early:  # resumed from the checkpoint of the epoch that stopped the run
            break
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        model.train()
        order = torch.randperm(n, generator=generator)
        loss_sum = 0.0
        if ranks is not None:
            for idx in torch.split(order, cfg.batch_size):
                loss_sum += ddp.step(
                    ddp_loss, ranks, x_train, idx, augment, augment_generator, optimizer, objective, device
                )
        else:
            for idx, batch in _batches(x_train, order, cfg.batch_size, num_workers, device):
                loss_sum += _step(model, loss_fn, optimizer, batch, idx, device, augment, augment_generator, pad_id)
        if scheduler is not None:
            scheduler.step()

        if ranks is None:
            val_logits = compute_logits(model, x_val, device=device, pad_id=pad_id)
            val_loss = F.cross_entropy(val_logits, y_val).item()
            val_acc = (val_logits.argmax(dim=1) == y_val).float().mean().item()
            term_means = objective.epoch_means() if objective is not None else {}
        else:
            lo, hi = ranks.bounds(len(x_val))  # each rank validates its shard
            shard_logits = compute_logits(model, x_val[lo:hi], device=device)
            loss_sum, val_loss, val_acc, term_means = ddp.reduce_epoch(ranks, shard_logits, y_val, loss_sum, objective)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / n,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": lr,
            "seconds": time.perf_counter() - start,
        }
        record |= term_means
        history.append(record)
        if on_epoch is not None and (ranks is None or ranks.is_main):
            on_epoch(dict(record))

        # keep "last": each epoch replaces the one before (the live weights, no copy; the
        # checkpoint stores them once); the final weights are the result.
        # keep "best": better = higher validation accuracy, or the same accuracy at a lower
        # validation loss: a few hundred validation samples move accuracy in coarse steps, so
        # ties are common and the loss says which of the tied epochs fits the held-out data better.
        if cfg.keep == "last":
            best_epoch, best_acc, best_loss, best_state = epoch, val_acc, val_loss, model.state_dict()
        elif val_acc > best_acc or (val_acc == best_acc and val_loss < best_loss):
            best_epoch, best_acc, best_loss, since_best = epoch, val_acc, val_loss, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            stopped_early = since_best >= cfg.patience and epoch < cfg.epochs
        # Every rank's dropout stream, so a resumed run continues each (a collective: all ranks).
        rng_per_rank = ranks.all_gather_bytes(torch.get_rng_state()) if ranks is not None else None
        if ckpt is not None and (ranks is None or ranks.is_main):
            progress = {
                "best_state": best_state,
                "best_epoch": best_epoch,
                "best_acc": best_acc,
                "best_loss": best_loss,
                "since_best": since_best,
                "history": history,
                "stopped_early": stopped_early,
            }
            save_checkpoint(
                ckpt,
                training_state(
                    epoch,
                    model,
                    optimizer,
                    scheduler,
                    generator,
                    augment_generator,
                    objective,
                    rng_per_rank,
                    **progress,
                ),
            )
        if stopped_early:
            break

    if undo_sync is not None:
        undo_sync()
    model.load_state_dict(best_state)
    model.to("cpu").eval()
    return TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_val_accuracy=best_acc,
        stopped_early=stopped_early,
        keep=cfg.keep,
    )


def train_supervised(
    model: nn.Module,
    x_train: Samples,
    y_train: Tensor,
    x_val: Samples,
    y_val: Tensor,
    cfg: TrainConfig,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    augment: Augment | None = None,
    pad_id: int | None = None,
    num_workers: int = 0,
) -> TrainResult:
    """Train a model with cross-entropy on hard labels (the teacher).

    Minibatches are shuffled by a generator seeded with ``cfg.seed``; the run stops when the
    validation accuracy has not improved for ``cfg.patience`` epochs, and the best epoch's
    weights are restored (best: highest validation accuracy, ties broken by lower validation
    loss); with ``cfg.keep`` "last" every epoch runs and the final weights are kept. Same
    seed, same initial weights, same data -> identical weights.

    Args:
        model: Maps ``[B, *input_shape]`` to ``[B, C]``; trained in place and returned.
        x_train: ``[N, *input_shape]`` float32.
        y_train: ``[N]`` int64 labels.
        x_val: ``[M, *input_shape]`` float32.
        y_val: ``[M]`` int64 labels.
        cfg: Epochs, batch size, optimizer, schedule, patience, seed, device.
        on_epoch: Called with a copy of each epoch's history dict (e.g. to log to MLflow).
        checkpoint_dir: When given, the full training state (model, optimizer, scheduler, RNG
            states, best weights, history) is saved there after every epoch, and a run that
            finds a checkpoint resumes after its epoch: a preempted step restarted with the
            same seed ends with the same weights as an uninterrupted run.
        augment: Applied to every training batch (``kd_lib.data.augment.make_augment``).
        pad_id: Text data (int64 ids): the padding id; each batch is trimmed to its longest row.
        num_workers: ``DataLoader`` workers reading batches of lazily read samples ahead (0: in
            the training process); tensors are indexed in place either way.

    Returns:
        TrainResult with the kept epoch's weights (``cfg.keep``) on CPU in eval mode.

    Raises:
        ValueError: lengths of inputs and labels differ, or a split is empty.
        ConfigError: the configured device is unavailable.
    """
    _check_data(x_train, y_train, x_val, y_val)
    device = resolve_device(cfg.device)
    targets = y_train.to(device)

    def loss_fn(net: nn.Module, xb: Tensor, idx: Tensor) -> Tensor:
        return F.cross_entropy(net(xb), targets[idx])

    return _fit(
        model,
        x_train,
        x_val,
        y_val,
        cfg,
        loss_fn,
        device,
        on_epoch,
        checkpoint_dir,
        augment,
        pad_id=pad_id,
        num_workers=num_workers,
    )


def _distill_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    objective: Objective,
    x_train: Samples,
    y_train: Tensor,
    device: torch.device,
    live_teacher: bool,
    pad_id: int | None = None,
    cache_dir: str | Path | None = None,
    cache_budget_bytes: int | None = None,
) -> BatchLoss:
    """Bind the objective and return the per-batch loss, with the teacher cached or live.

    Cached: the teacher's logits for every training sample are computed once here (eval
    mode, no grad) and each batch reads its rows by sample index. Live: the teacher runs on
    each batch as the student sees it (augmented), capturing the feature maps feature losses
    need. Feature losses force live, since the cache holds logits only.
    """
    if objective.needs_teacher and teacher is None:
        raise ValueError(f"the objective ({', '.join(objective.names)}) needs a teacher; pass one or use [ce] alone")
    targets = y_train.to(device)
    student.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    objective.bind(student, teacher, x_train[:2].to(device))
    s_layers, t_layers = objective.feature_layers()
    uses_teacher = objective.needs_teacher
    live = uses_teacher and (live_teacher or objective.needs_features)
    cache = (
        _teacher_cache(teacher, x_train, device, pad_id, cache_dir, cache_budget_bytes)  # type: ignore[arg-type]
        if uses_teacher and not live
        else None
    )

    def loss_fn(net: nn.Module, xb: Tensor, idx: Tensor) -> Tensor:
        if s_layers:
            logits, s_feats = capture_features(net, s_layers, xb)
        else:
            logits, s_feats = net(xb), {}
        t_logits: Tensor | None = None
        t_feats: dict[str, Tensor] = {}
        if cache is not None:
            t_logits = cache[idx]
        elif live:
            # eval_mode: the teacher teaches with its frozen BatchNorm statistics, whatever
            # set its flag since (nothing should; this makes it impossible).
            with torch.no_grad(), eval_mode(teacher):  # type: ignore[arg-type]
                t_logits, t_feats = capture_features(teacher, t_layers, xb)  # type: ignore[arg-type]
        return objective(LossInputs(logits, targets[idx], t_logits, s_feats, t_feats, inputs=xb))

    return loss_fn


class _MappedLogits:
    """The teacher-logit cache as a memory-mapped ``.npy`` file ``[N, C]`` float32: rows are read
    by sample index (``cache[idx]``) and moved to ``device``; only the rows read stay in memory.
    ``scratch``: the temporary directory holding the file when no checkpoint directory did, removed
    with this object."""

    def __init__(
        self, array: np.memmap, device: torch.device, scratch: tempfile.TemporaryDirectory[str] | None = None
    ) -> None:
        self.array, self.device, self._scratch = array, device, scratch

    def __getitem__(self, idx: Tensor) -> Tensor:
        rows = np.asarray(self.array[idx.detach().cpu().numpy()])
        return torch.from_numpy(rows).to(self.device)


def cache_budget() -> int:
    """Bytes a teacher-logit cache may take in memory: a quarter of the memory available now
    (``KDFLOW_LOGIT_CACHE_BYTES`` overrides it). A larger cache is memory-mapped from disk."""
    override = os.environ.get("KDFLOW_LOGIT_CACHE_BYTES")
    if override:
        return int(override)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError):  # no sysconf (not Linux): a fixed 1 GiB
        return 1 << 30


def _teacher_cache(
    teacher: nn.Module,
    x_train: Samples,
    device: torch.device,
    pad_id: int | None = None,
    cache_dir: str | Path | None = None,
    budget_bytes: int | None = None,
) -> Any:
    """The teacher's logits for every training sample, ``[N, C]``, indexed by sample (``cache[idx]``).

    In memory on ``device`` when ``N * C * 4`` bytes fit ``budget_bytes`` (default
    ``cache_budget()``); otherwise written batch by batch to ``teacher_logits.npy`` in
    ``cache_dir`` (beside the step's output: its checkpoint directory; a temporary directory
    without one) and memory-mapped.

    Under several processes each rank runs the teacher over its contiguous shard of the
    training set only, and the shards are all-gathered: every rank ends with the full table,
    because the global batches it slices index the whole set.
    """
    ranks = current()
    if ranks is None:
        # Rows per teacher pass, in whole batches of compute_logits; the first pass tells the width.
        step = 8 * PREDICT_BATCH_SIZE
        first = compute_logits(teacher, x_train[:step], device=device, pad_id=pad_id)
        rest = range(step, len(x_train), step)
        if len(x_train) * first.shape[1] * 4 <= (cache_budget() if budget_bytes is None else budget_bytes):
            chunks = [compute_logits(teacher, x_train[i : i + step], device=device, pad_id=pad_id) for i in rest]
            return torch.cat([first, *chunks]).to(device)
        scratch = None
        if cache_dir is None:  # no checkpoint directory to put it beside: a temporary one, removed with the cache
            scratch = tempfile.TemporaryDirectory(prefix="kdflow-logits-")
            cache_dir = scratch.name
        folder = Path(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
        array = np.lib.format.open_memmap(
            folder / "teacher_logits.npy", mode="w+", dtype=np.float32, shape=(len(x_train), first.shape[1])
        )
        array[: len(first)] = first.numpy()
        for i in rest:
            array[i : i + step] = compute_logits(teacher, x_train[i : i + step], device=device, pad_id=pad_id).numpy()
        array.flush()
        return _MappedLogits(array, device, scratch)
    lo, hi = ranks.bounds(len(x_train))
    shard = compute_logits(teacher, x_train[lo:hi], device=device, pad_id=pad_id).to(device)
    return ranks.all_gather_rows(shard, len(x_train))


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    objective: Objective,
    x_train: Samples,
    y_train: Tensor,
    x_val: Samples,
    y_val: Tensor,
    cfg: TrainConfig,
    augment: Augment | None = None,
    cache_teacher_logits: bool = True,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: str | Path | None = None,
    pad_id: int | None = None,
    x_transfer: Samples | None = None,
    num_workers: int = 0,
    logit_cache_budget_bytes: int | None = None,
) -> TrainResult:
    """Distill a student from a frozen teacher with the configured objective.

    Without augmentation and feature losses the teacher's logits are computed once for the
    whole training set and looked up by sample index (exact: the teacher is frozen and in
    eval mode); otherwise the teacher runs on every batch. Validation accuracy and early
    stopping are measured on hard labels, as for the teacher. ``objective = [ce]`` with the
    same ``cfg`` and ``augment`` is the fair no-KD baseline: same loop, same everything.

    A transfer set (``x_transfer``, unlabeled samples) joins the training set with the label
    ``UNLABELED``: every epoch shuffles train and transfer samples together, the teacher's
    logits for both come from the one cache (or the live teacher), and label terms skip the
    transfer samples (``ce`` averages over the labeled ones), so the student learns there from
    the teacher alone. ``train_loss`` is then the mean over train + transfer samples.

    Args:
        student: Maps ``[B, *input_shape]`` to ``[B, C]``; trained in place and returned.
        teacher: The frozen teacher, or None when no term needs it.
        objective: ``kd_lib.train.losses.build_objective(cfg.distill.losses)``.
        x_train: ``[N, *input_shape]`` float32.
        y_train: ``[N]`` int64 labels.
        x_val: ``[M, *input_shape]`` float32.
        y_val: ``[M]`` int64 labels.
        cfg: Epochs, batch size, optimizer, schedule, patience, seed, device.
        augment: Applied to every training batch; forces a live teacher.
        cache_teacher_logits: False runs the teacher live even when a cache would be exact
            (for benchmarking the cache).
        on_epoch: Called with a copy of each epoch's history dict (with per-term losses).
        checkpoint_dir: Per-epoch checkpoint and resume, as in ``train_supervised``.
        pad_id: Text data: batches (and the teacher's cache fill) trimmed to their longest row.
        x_transfer: ``[M, *input_shape]`` unlabeled samples encoded like ``x_train`` (a transfer
            set), or None.
        num_workers: ``DataLoader`` workers reading lazily read samples ahead, as in ``train_supervised``.
        logit_cache_budget_bytes: Largest teacher-logit cache held in memory; a larger one is a
            memory-mapped file in ``checkpoint_dir`` (default: ``cache_budget()``).

    Returns:
        TrainResult with the kept epoch's weights (``cfg.keep``) on CPU in eval mode.

    Raises:
        ValueError: lengths differ, the objective needs a teacher and none was given, or a
            transfer set is given to an objective that does not use the teacher, or one whose
            samples differ in shape or dtype from the training samples.
    """
    _check_data(x_train, y_train, x_val, y_val)
    if x_transfer is not None:
        x_train, y_train = _with_transfer(x_train, y_train, x_transfer, objective)
    device = resolve_device(cfg.device)
    live = augment is not None or not cache_teacher_logits
    loss_fn = _distill_loss(
        student, teacher, objective, x_train, y_train, device, live, pad_id, checkpoint_dir, logit_cache_budget_bytes
    )
    return _fit(
        student,
        x_train,
        x_val,
        y_val,
        cfg,
        loss_fn,
        device,
        on_epoch,
        checkpoint_dir,
        augment,
        objective,
        pad_id,
        num_workers,
    )


def _with_transfer(
    x_train: Samples, y_train: Tensor, x_transfer: Samples, objective: Objective
) -> tuple[Samples, Tensor]:
    """Train + transfer samples ``[N + M, ...]`` and their labels, ``UNLABELED`` for the transfer ones."""
    if not objective.needs_teacher:
        raise ValueError(
            f"a transfer set is learnt from the teacher alone, but the objective ({', '.join(objective.names)}) "
            "does not use the teacher; add a teacher term (kd) or leave the transfer set out"
        )
    if x_transfer.shape[1:] != x_train.shape[1:] or x_transfer.dtype != x_train.dtype:
        raise ValueError(
            f"transfer samples are {x_transfer.dtype} {list(x_transfer.shape[1:])} but training samples "
            f"{x_train.dtype} {list(x_train.shape[1:])}: encode them the same way"
        )
    unlabeled = torch.full((len(x_transfer),), UNLABELED, dtype=y_train.dtype)
    if isinstance(x_train, LazySamples) or isinstance(x_transfer, LazySamples):
        if not (isinstance(x_train, LazySamples) and isinstance(x_transfer, LazySamples)):
            raise ValueError("transfer samples must be read the same way as the training samples (both lazily or not)")
        return Concat(x_train, x_transfer), torch.cat([y_train, unlabeled])
    return torch.cat([x_train, x_transfer]), torch.cat([y_train, unlabeled])


def kd_finetune(
    model: nn.Module,
    teacher: nn.Module | None,
    objective: Objective,
    x_train: Samples,
    y_train: Tensor,
    cfg: TrainConfig,
    augment: Augment | None = None,
    on_epoch: EpochCallback | None = None,
    x_transfer: Samples | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune ``model`` in place for exactly ``cfg.epochs`` epochs with the KD objective.

    Made for quantization-aware training: the model holds fake-quantize modules whose
    observers also record every batch they see, so unlike ``distill`` there is no validation
    pass (it would leak validation statistics into the quantization ranges) and no early
    stopping or best-epoch restore (the last state is what gets converted).

    Args:
        model: Maps ``[B, *input_shape]`` to ``[B, C]``; left in train mode on its device.
        teacher: The frozen teacher, or None when no term needs it.
        objective: The distillation objective (freshly built: its learnable parts start anew).
        x_train: ``[N, *input_shape]`` float32.
        y_train: ``[N]`` int64.
        cfg: Epochs, batch size, lr, optimizer, seed and device (the scheduler is ignored).
        augment: Applied to every training batch.
        on_epoch: Called with ``{"epoch", "train_loss", "seconds", "loss_<term>"...}`` after each epoch.
        x_transfer: Unlabeled samples learnt from the teacher alone, as in ``distill``.

    Returns:
        One such dict per epoch.

    Raises:
        ValueError: lengths differ, the objective needs a teacher and none was given, or a
            transfer set that ``distill`` would refuse.
    """
    if len(x_train) != len(y_train) or len(x_train) == 0:
        raise ValueError(f"need matching, non-empty x_train and y_train; got {len(x_train)} and {len(y_train)}")
    if x_transfer is not None:
        x_train, y_train = _with_transfer(x_train, y_train, x_transfer, objective)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    augment_generator = torch.Generator().manual_seed(cfg.seed + 1)
    loss_fn = _distill_loss(model, teacher, objective, x_train, y_train, device, augment is not None)
    model.train()
    optimizer = _optimizer(list(model.parameters()) + list(objective.parameters()), cfg)
    history: list[dict[str, Any]] = []
    n = len(x_train)
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        loss_sum = 0.0
        order = torch.randperm(n, generator=generator)
        for idx, batch in _batches(x_train, order, cfg.batch_size, 0, device):
            loss_sum += _step(model, loss_fn, optimizer, batch, idx, device, augment, augment_generator)
        record = {"epoch": epoch, "train_loss": loss_sum / n, "seconds": time.perf_counter() - start}
        record |= objective.epoch_means()
        history.append(record)
        if on_epoch is not None:
            on_epoch(dict(record))
    return history
