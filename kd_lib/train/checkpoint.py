"""The training loop's per-epoch checkpoint: written atomically, read without pickled code.

``kd_lib.train.loop._fit`` saves the full training state (model, optimizer, scheduler, RNG
states, best weights, history) after every epoch and resumes from it, so a preempted step
restarted with the same seed ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

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
        raise ValueError(
            f"{path}: unreadable training checkpoint ({type(err).__name__}: {err}); delete it to restart"
        ) from None


def training_state(
    epoch: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generator: torch.Generator,
    augment_generator: torch.Generator,
    objective: nn.Module | None,
    rng_per_rank: list[Tensor] | None,
    **progress: Any,
) -> dict[str, Any]:
    """The checkpoint after ``epoch``: every live state, the RNG streams included.

    Args:
        rng_per_rank: Every rank's global-RNG state, in rank order (None in one process).
        progress: The loop's own bookkeeping (``best_state``, ``best_epoch``, ``best_acc``,
            ``best_loss``, ``since_best``, ``history``, ``stopped_early``), stored as given.
    """
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "generator": generator.get_state(),
        "augment_generator": augment_generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "objective": objective.state_dict() if objective is not None else None,
        **progress,
    }
    return state | ({"torch_rng_ranks": rng_per_rank} if rng_per_rank is not None else {})


def restore_training_state(
    state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    generator: torch.Generator,
    augment_generator: torch.Generator,
    objective: nn.Module | None,
    rank: int | None,
) -> None:
    """Load what ``training_state`` saved back into the live objects.

    ``rank`` (None in one process) picks this rank's dropout stream; a checkpoint written by
    one process holds only its own, which every rank then continues from.
    """
    model.load_state_dict(state["model"])
    if objective is not None:
        objective.load_state_dict(state["objective"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    augment_generator.set_state(state["augment_generator"])
    rng_per_rank = state.get("torch_rng_ranks") or [state["torch_rng"]]
    torch.set_rng_state(rng_per_rank[rank] if rank is not None and rank < len(rng_per_rank) else state["torch_rng"])
