"""A model run over a whole array in batches: what training validates with, the teacher's logit
cache is filled with, and evaluation predicts with; and the dynamic padding of text batches."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from kd_lib.config import PREDICT_BATCH_SIZE
from kd_lib.data.lazy import Samples


def home_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (or buffer) lives; CPU for a module that has neither."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def trim_padding(batch: Tensor, pad_id: int | None) -> Tensor:
    """A text batch cut to its longest row: drop the trailing columns that are padding in every row.

    Text splits are right-padded to ``max_length`` (``kd_lib.data.text.encode``); a model masks
    ``pad_id`` itself, so removing all-pad columns changes no logit, only the work. At least one
    column is kept.

    Args:
        batch: ``[B, L]`` int64 token ids, or any other batch.
        pad_id: The padding id; None (not text data) returns ``batch`` as it is.

    Returns:
        ``batch[:, :n]`` with ``n`` the longest row's length (>= 1), or ``batch`` itself.
    """
    if pad_id is None or batch.ndim != 2 or batch.dtype.is_floating_point or batch.shape[1] == 0:
        return batch
    used = (batch != pad_id).any(dim=0).nonzero()
    length = int(used.max()) + 1 if used.numel() else 1
    return batch if length == batch.shape[1] else batch[:, :length]


@torch.no_grad()
def compute_logits(
    model: nn.Module,
    x: Samples,
    batch_size: int = PREDICT_BATCH_SIZE,
    device: torch.device | str = "cpu",
    pad_id: int | None = None,
) -> Tensor:
    """Run the model over ``x`` in eval mode without gradients, in batches.

    The model's training flag and device are restored afterwards, so calling this in the
    middle of training has no side effect.

    Args:
        model: Maps ``[B, *input_shape]`` to ``[B, C]``.
        x: ``[N, *input_shape]`` float32 (text: int64 ids ``[N, max_length]``), a tensor or
            samples read lazily (``kd_lib.data.lazy``).
        batch_size: Samples per forward pass. It bounds memory. It also shapes the result of a model
            that takes activation ranges per batch (dynamic int8), which is why evaluate and register's
            verification share ``PREDICT_BATCH_SIZE``.
        device: Where to run.
        pad_id: Text data's padding id: each batch is trimmed to its longest row (``trim_padding``).

    Returns:
        ``[N, C]`` float32 logits on CPU.

    Raises:
        ValueError: ``batch_size`` < 1, or ``x`` is empty.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    was_training, home = model.training, home_device(model)
    model.eval().to(device)
    try:
        chunks = [
            model(trim_padding(x[i : i + batch_size], pad_id).to(device)).cpu() for i in range(0, len(x), batch_size)
        ]
    finally:
        model.train(was_training).to(home)
    if not chunks:
        raise ValueError("compute_logits got an empty input (N = 0)")
    return torch.cat(chunks)
