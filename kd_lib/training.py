"""Teacher training and distillation loops.

Both loops are the same minibatch SGD loop (``_fit``) with a different loss: supervised
training uses cross-entropy on the labels, distillation uses ``hinton_loss`` against teacher
logits precomputed once for the whole training set. The loss function receives the SAMPLE
INDICES of each batch, so teacher logits are looked up by sample, never by batch position,
and shuffling cannot misalign them.
"""

from __future__ import annotations

import copy
import itertools
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lib.config import ConfigError, TrainConfig
from kd_lib.losses import hinton_loss

EpochCallback = Callable[[dict[str, Any]], None]
# (logits of the batch [B, C] on the device, sample indices of the batch [B] int64 on the device) -> scalar
BatchLoss = Callable[[Tensor, Tensor], Tensor]


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        model: The trained module holding the weights of the best epoch, on CPU, in eval mode.
        history: One dict per epoch run: ``epoch`` (1-based), ``train_loss``, ``val_loss``
            (hard-label cross-entropy, so teacher and student curves compare), ``val_accuracy``
            (fraction), ``lr`` (used during that epoch), ``seconds``.
        best_epoch: 1-based epoch whose weights ``model`` holds.
        best_val_accuracy: Validation accuracy of that epoch.
        stopped_early: True when early stopping ended the run before ``cfg.epochs``.
    """

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = 0.0
    stopped_early: bool = False


def resolve_device(name: str) -> torch.device:
    """Turn a config device name into a torch.device.

    Args:
        name: ``"cpu"``, ``"cuda"`` (or ``"cuda:N"``), or ``"auto"`` (cuda when available).

    Raises:
        ConfigError: cuda was requested on a machine without it, or the name is not a device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device; use 'cpu', 'cuda' or 'auto'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} was requested but CUDA is not available on this machine; use 'cpu' or 'auto'"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use 'cpu', 'cuda' or 'auto'")
    return device


def _home_device(model: nn.Module) -> torch.device:
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def compute_logits(
    model: nn.Module,
    x: Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Run the model over ``x`` in eval mode without gradients, in batches.

    The model's training flag and device are restored afterwards, so calling this in the
    middle of training has no side effect.

    Args:
        model: Maps ``[B, *input_shape]`` to ``[B, C]``.
        x: ``[N, *input_shape]`` float32.
        batch_size: Samples per forward pass (bounds memory, not the result).
        device: Where to run.

    Returns:
        ``[N, C]`` float32 logits on CPU.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    was_training, home = model.training, _home_device(model)
    model.eval().to(device)
    try:
        chunks = [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training).to(home)
    if not chunks:
        raise ValueError("compute_logits got an empty input (N = 0)")
    return torch.cat(chunks)


def _optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        # Plain SGD without momentum trains small nets far slower; 0.9 is the usual default.
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise ConfigError(f"train.optimizer {cfg.optimizer!r} is not one of adam, adamw, sgd")


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    if cfg.scheduler == "none":
        return None
    raise ConfigError(f"train.scheduler {cfg.scheduler!r} is not one of cosine, step, none")


def _check_data(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor) -> None:
    if len(x_train) != len(y_train):
        raise ValueError(f"x_train has {len(x_train)} samples but y_train has {len(y_train)}")
    if len(x_val) != len(y_val):
        raise ValueError(f"x_val has {len(x_val)} samples but y_val has {len(y_val)}")
    if len(x_train) == 0 or len(x_val) == 0:
        raise ValueError(f"training needs samples: got {len(x_train)} train and {len(x_val)} validation")


def _fit(
    model: nn.Module,
    x_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    cfg: TrainConfig,
    loss_fn: BatchLoss,
    device: torch.device,
    on_epoch: EpochCallback | None,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """The one training loop: shuffled minibatches, LR schedule, early stopping, best-epoch restore.

    ``loss_fn(batch_logits, batch_idx)`` gets the indices into ``x_train`` of the samples in
    the batch and looks up whatever targets it needs (labels, teacher logits) by those indices.
    """
    # Seeds dropout and anything else drawing from the global RNG during training. The model's
    # initial weights were drawn by the caller when it built the model, so seeding before
    # build_model is the caller's job.
    torch.manual_seed(cfg.seed)
    # A private generator makes the batch order depend on cfg.seed alone.
    generator = torch.Generator().manual_seed(cfg.seed)
    model.to(device)
    optimizer = _optimizer(model, cfg)
    scheduler = _scheduler(optimizer, cfg)

    history: list[dict[str, Any]] = []
    best_state = copy.deepcopy(model.state_dict())
    best_epoch, best_acc, since_best, stopped_early = 0, -1.0, 0, False
    first_epoch = 1
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.is_file():
        state = load_checkpoint(ckpt)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        best_state, best_epoch, best_acc = state["best_state"], state["best_epoch"], state["best_acc"]
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
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            logits = model(x_train[idx].to(device))
            loss = loss_fn(logits, idx.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
        if scheduler is not None:
            scheduler.step()

        val_logits = compute_logits(model, x_val, device=device)
        val_loss = F.cross_entropy(val_logits, y_val).item()
        val_acc = (val_logits.argmax(dim=1) == y_val).float().mean().item()
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / n,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "lr": lr,
            "seconds": time.perf_counter() - start,
        }
        history.append(record)
        if on_epoch is not None:
            on_epoch(dict(record))

        # Strictly better only: on ties keep the earlier (less trained) weights.
        if val_acc > best_acc:
            best_epoch, best_acc, since_best = epoch, val_acc, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since_best += 1
            stopped_early = since_best >= cfg.patience and epoch < cfg.epochs
        if ckpt is not None:
            save_checkpoint(ckpt, {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "best_state": best_state, "best_epoch": best_epoch, "best_acc": best_acc,
                "since_best": since_best, "history": history, "stopped_early": stopped_early,
            })  # fmt: skip
        if stopped_early:
            break

    model.load_state_dict(best_state)
    model.to("cpu").eval()
    return TrainResult(
        model=model,
        history=history,
        best_epoch=best_epoch,
        best_val_accuracy=best_acc,
        stopped_early=stopped_early,
    )


CHECKPOINT_FILE = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write atomically (temp file + rename): a kill mid-write leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: tensors and plain containers, never code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 (torch raises many types for a bad file)
        raise ValueError(f"{path}: unreadable training checkpoint ({type(err).__name__}: {err}); delete it to restart") from None


def train_supervised(
    model: nn.Module,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    cfg: TrainConfig,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """Train a model with cross-entropy on hard labels (the teacher, or a from-scratch baseline).

    Minibatches are shuffled by a generator seeded with ``cfg.seed``; the run stops when the
    validation accuracy has not improved for ``cfg.patience`` epochs, and the best epoch's
    weights are restored. Same seed, same initial weights, same data -> identical weights.

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

    Returns:
        TrainResult with the best epoch's weights on CPU in eval mode.

    Raises:
        ValueError: lengths of inputs and labels differ, or a split is empty.
        ConfigError: the configured device is unavailable.
    """
    _check_data(x_train, y_train, x_val, y_val)
    device = resolve_device(cfg.device)
    targets = y_train.to(device)

    def loss_fn(logits: Tensor, idx: Tensor) -> Tensor:
        return F.cross_entropy(logits, targets[idx])

    return _fit(model, x_train, x_val, y_val, cfg, loss_fn, device, on_epoch, checkpoint_dir)


def distill(
    student: nn.Module,
    teacher_logits_train: Tensor | None,
    x_train: Tensor,
    y_train: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    cfg: TrainConfig,
    temperature: float,
    alpha: float,
    on_epoch: EpochCallback | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrainResult:
    """Distill a student from precomputed teacher logits with ``hinton_loss``.

    Teacher logits are computed once (``compute_logits``) rather than per batch: the teacher
    is frozen, so this is exact and avoids a teacher forward pass every step. Row ``i`` of
    ``teacher_logits_train`` must belong to sample ``i`` of ``x_train``; batches look rows up
    by sample index. Validation accuracy and early stopping are measured on hard labels.

    Args:
        student: Maps ``[B, *input_shape]`` to ``[B, C]``; trained in place and returned.
        teacher_logits_train: ``[N, C]`` float teacher logits for ``x_train``, or None when
            ``alpha == 0`` (the no-KD baseline).
        x_train: ``[N, *input_shape]`` float32.
        y_train: ``[N]`` int64 labels.
        x_val: ``[M, *input_shape]`` float32.
        y_val: ``[M]`` int64 labels.
        cfg: Epochs, batch size, optimizer, schedule, patience, seed, device.
        temperature: Softmax temperature T > 0 of the KD term.
        alpha: Weight of the KD term in [0, 1].
        on_epoch: Called with a copy of each epoch's history dict.
        checkpoint_dir: Per-epoch checkpoint and resume, as in ``train_supervised``.

    Returns:
        TrainResult with the best epoch's weights on CPU in eval mode.

    Raises:
        ValueError: lengths differ (including teacher logits vs. x_train), teacher logits are
            missing while alpha > 0, or alpha/temperature are out of range.
    """
    _check_data(x_train, y_train, x_val, y_val)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if teacher_logits_train is None and alpha > 0:
        raise ValueError(f"alpha={alpha} > 0 needs teacher_logits_train; pass them or set alpha=0")
    if teacher_logits_train is not None:
        if teacher_logits_train.dim() != 2 or len(teacher_logits_train) != len(x_train):
            raise ValueError(
                f"teacher_logits_train must be [N, C] with N = len(x_train) = {len(x_train)}, "
                f"got shape {tuple(teacher_logits_train.shape)}; compute them on the same training split"
            )
    device = resolve_device(cfg.device)
    targets = y_train.to(device)
    teacher = None if teacher_logits_train is None else teacher_logits_train.to(device, torch.float32)

    def loss_fn(logits: Tensor, idx: Tensor) -> Tensor:
        batch_teacher = None if teacher is None else teacher[idx]
        return hinton_loss(logits, batch_teacher, targets[idx], temperature=temperature, alpha=alpha)

    return _fit(student, x_train, x_val, y_val, cfg, loss_fn, device, on_epoch, checkpoint_dir)


def kd_finetune(
    model: nn.Module,
    teacher_logits_train: Tensor | None,
    x_train: Tensor,
    y_train: Tensor,
    cfg: TrainConfig,
    temperature: float,
    alpha: float,
    on_epoch: EpochCallback | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune ``model`` in place for exactly ``cfg.epochs`` epochs with ``hinton_loss``.

    Made for quantization-aware training: the model holds fake-quantize modules whose
    observers also record every batch they see, so unlike ``distill`` there is no validation
    pass (it would leak validation statistics into the quantization ranges) and no early
    stopping or best-epoch restore (the last state is what gets converted).

    Args:
        model: Maps ``[B, *input_shape]`` to ``[B, C]``; left in train mode on its device.
        teacher_logits_train: ``[N, C]`` teacher logits of ``x_train``, or None when ``alpha == 0``.
        x_train: ``[N, *input_shape]`` float32.
        y_train: ``[N]`` int64.
        cfg: Epochs, batch size, lr, optimizer, seed and device (the scheduler is ignored).
        temperature: Softmax temperature T > 0 of the KD term.
        alpha: Weight of the KD term in [0, 1].
        on_epoch: Called with ``{"epoch", "train_loss", "seconds"}`` after each epoch.

    Returns:
        One ``{"epoch", "train_loss", "seconds"}`` dict per epoch.

    Raises:
        ValueError: lengths differ, or teacher logits are missing while alpha > 0.
    """
    if len(x_train) != len(y_train) or len(x_train) == 0:
        raise ValueError(f"need matching, non-empty x_train and y_train; got {len(x_train)} and {len(y_train)}")
    if teacher_logits_train is None and alpha > 0:
        raise ValueError(f"alpha={alpha} > 0 needs teacher_logits_train; pass them or set alpha=0")
    if teacher_logits_train is not None and tuple(teacher_logits_train.shape[:1]) != (len(x_train),):
        raise ValueError(
            f"teacher_logits_train must be [N, C] with N = {len(x_train)}, got {tuple(teacher_logits_train.shape)}"
        )
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model.to(device).train()
    optimizer = _optimizer(model, cfg)
    targets = y_train.to(device)
    teacher = None if teacher_logits_train is None else teacher_logits_train.to(device, torch.float32)
    history: list[dict[str, Any]] = []
    n = len(x_train)
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        loss_sum = 0.0
        order = torch.randperm(n, generator=generator)
        for i in range(0, n, cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            logits = model(x_train[idx].to(device))
            batch_teacher = None if teacher is None else teacher[idx.to(device)]
            loss = hinton_loss(logits, batch_teacher, targets[idx.to(device)], temperature=temperature, alpha=alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(idx)
        record = {"epoch": epoch, "train_loss": loss_sum / n, "seconds": time.perf_counter() - start}
        history.append(record)
        if on_epoch is not None:
            on_epoch(dict(record))
    return history
