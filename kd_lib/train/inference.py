"""A model run over a whole array in batches: what training validates with, the teacher's logit
cache is filled with, and evaluation predicts with."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn


def home_device(model: nn.Module) -> torch.device:
    """Where ``model``'s first parameter (or buffer) lives; CPU for a module that has neither."""
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

    Raises:
        ValueError: ``batch_size`` < 1, or ``x`` is empty.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    was_training, home = model.training, home_device(model)
    model.eval().to(device)
    try:
        chunks = [model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    finally:
        model.train(was_training).to(home)
    if not chunks:
        raise ValueError("compute_logits got an empty input (N = 0)")
    return torch.cat(chunks)
