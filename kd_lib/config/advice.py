"""Advice on a valid config: settings that run, but are unlikely to give what they are there for.

A config error stops the run; advice does not. ``kdflow validate`` and ``kdflow run`` print
each item as a ``warning:`` line with its fix before anything runs. The checks read the config
alone (no data, no torch), so they cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from kd_lib.config.pipeline import PipelineConfig

# Below this many distillation epochs a teacher term is more likely to cost accuracy than to add
# any: the student is still underfitting, and soft targets slow its fit of the labels. Measured
# (README, "Defaults that do not hurt"; builtin digits, default 1x32 MLP student, 3 seeds): with
# Hinton's 0.9/0.1 at T=4, 10 epochs lost 4.1 to 12.6 points and 30 epochs up to 2.6 (significantly
# worse, exact McNemar, in 6 of 6 runs); the default losses were behind by up to 1.1 points at 10
# epochs (one of 6 seeds significantly, on validation) and by up to 1.5 at 30 (not significantly).
# A new user's 10-epoch run on 5,000 MNIST digits lost 1.3 points with 0.9/0.1 at T=4 (p = 0.011).
MIN_KD_EPOCHS = 30


@dataclass(frozen=True)
class Advice:
    """One warning about a config.

    Attributes:
        field: The dotted path of the setting the warning is about.
        cause: What is likely to go wrong, with the value that makes it so.
        fix: What to change.
    """

    field: str
    cause: str
    fix: str


def advise(cfg: PipelineConfig) -> list[Advice]:
    """The warnings ``cfg`` deserves, most important first; empty when there is nothing to say.

    Args:
        cfg: A validated pipeline config.

    Returns:
        One ``Advice`` per problem found.
    """
    found: list[Advice] = []
    train = cfg.distill.train
    if cfg.distill.uses_teacher and train.epochs < MIN_KD_EPOCHS:
        terms = ", ".join(t.name for t in cfg.distill.losses if t.weight > 0 and t.name != "ce")
        found.append(
            Advice(
                "distill.train.epochs",
                f"distill.train.epochs is {train.epochs}: a schedule this short rarely gives the teacher's soft "
                f"targets ({terms}) time to pay off, and the student can end up less accurate than the same "
                "student trained without the teacher",
                f"set distill.train.epochs to at least {MIN_KD_EPOCHS} (e.g. --set distill.train.epochs="
                f"{2 * MIN_KD_EPOCHS}); keep distill.baseline: true to measure what the teacher buys",
            )
        )
    return found
