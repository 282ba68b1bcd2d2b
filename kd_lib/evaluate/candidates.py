"""Which deployment artifact goes on: the best candidate within the accuracy budget.

The quantize step builds every artifact ``quantize.candidates`` names (torch fp32, ONNX Runtime
fp32 and int8, torch schemes), measures each one as it would be deployed (validation accuracy,
bytes on disk, p50 latency at every ``evaluate.batch_sizes``) and hands the measurements here.
``select`` is pure: same measurements, same choice, and a sentence saying why.

Rules:

- A candidate qualifies when it was built (a scheme that does not apply is recorded, not
  chosen), its validation accuracy is at most ``max_drop`` points below the fp32 student's, and
  it is no larger than the gate's size checks allow (``max_bytes``): the choice is the best
  artifact that can pass the gate, not one the gate must then refuse.
- ``fastest``: among the qualifying, only those no slower than the torch fp32 reference at any
  measured batch size (an int8 artifact slower than fp32 is never the fastest choice); the one
  with the lowest geometric mean of its latencies over the batch sizes wins.
- ``smallest``: the qualifying one with the fewest bytes; ties go to the faster.
- Ties after that go to the earlier candidate in the configured order, so the choice is total.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from tabulate import tabulate

# The torch fp32 student: the reference no chosen artifact may be slower than under `fastest`.
REFERENCE = "none"


@dataclass(frozen=True)
class Candidate:
    """One deployment artifact as measured by the quantize step.

    Attributes:
        name: The scheme (``none``, ``onnx_fp32``, ``onnx_static_int8``, ``dynamic_int8``, ...).
        backend: What runs it (``eager`` torch, ``onnxruntime``, ``x86``, ...).
        val_accuracy: Accuracy on the validation split, fraction; None when not built.
        drop_points: fp32 student minus this candidate's validation accuracy, points.
        size_bytes: Bytes of its model directory.
        latency_ms: Batch size -> p50 milliseconds per forward pass.
        error: Why it could not be built (then nothing else is set).
        verdict: Filled by ``select``: ``chosen``, ``qualifies``, or why it does not.
    """

    name: str
    backend: str = ""
    val_accuracy: float | None = None
    drop_points: float | None = None
    size_bytes: int | None = None
    latency_ms: dict[int, float] = field(default_factory=dict)
    error: str | None = None
    verdict: str = ""

    @property
    def built(self) -> bool:
        return self.error is None and self.val_accuracy is not None

    def mean_latency(self) -> float:
        """Geometric mean of the p50 latencies over the measured batch sizes (ms)."""
        values = [v for v in self.latency_ms.values() if v > 0]
        if not values:
            return math.inf
        return math.exp(sum(math.log(v) for v in values) / len(values))

    def to_dict(self) -> dict[str, object]:
        row: dict[str, object] = {"name": self.name, "backend": self.backend, "verdict": self.verdict}
        if self.error is not None:
            return row | {"error": self.error}
        return row | {
            "val_accuracy": self.val_accuracy,
            "drop_points": self.drop_points,
            "size_bytes": self.size_bytes,
            "latency_ms": {str(bs): ms for bs, ms in sorted(self.latency_ms.items())},
        }


@dataclass(frozen=True)
class Selection:
    """What ``select`` decided.

    Attributes:
        chosen: The winning candidate's name, or None when none qualified.
        reason: One sentence: what was chosen and why (or why nothing was).
        candidates: Every candidate with its ``verdict`` filled, in the configured order.
        reference: The torch fp32 measurements the ``fastest`` rule compared with, if measured.
    """

    chosen: str | None
    reason: str
    candidates: list[Candidate]
    reference: Candidate | None = None

    @property
    def found(self) -> bool:
        return self.chosen is not None

    def table(self) -> str:
        """Plain-text table of every candidate (for logs and the run's artifacts)."""
        batch_sizes = sorted({bs for c in self.candidates for bs in c.latency_ms})
        header = ["candidate", "backend", "val acc", "drop (pt)", "bytes", *[f"p50 b{bs} (ms)" for bs in batch_sizes]]
        rows = []
        for c in self.candidates:
            if not c.built:
                rows.append([c.name, c.backend, "-", "-", "-", *["-" for _ in batch_sizes], c.verdict])
                continue
            latencies = [f"{c.latency_ms[bs]:.4f}" if bs in c.latency_ms else "-" for bs in batch_sizes]
            rows.append(
                [
                    c.name,
                    c.backend,
                    f"{c.val_accuracy:.4f}",
                    f"{c.drop_points:.2f}",
                    str(c.size_bytes),
                    *latencies,
                    c.verdict,
                ]
            )
        return tabulate(rows, [*header, "verdict"], tablefmt="simple", disable_numparse=True)


def _slower_than(candidate: Candidate, reference: Candidate) -> list[int]:
    """The batch sizes at which ``candidate`` is slower than ``reference``."""
    return [
        bs
        for bs, ms in sorted(candidate.latency_ms.items())
        if bs in reference.latency_ms and ms > reference.latency_ms[bs]
    ]


def select(
    candidates: Sequence[Candidate],
    policy: Literal["fastest", "smallest"],
    max_drop: float,
    reference: Candidate | None = None,
    max_bytes: float | None = None,
    size_rule: str = "the size limit",
) -> Selection:
    """Choose the deployment artifact.

    Args:
        candidates: The configured candidates, measured, in the configured order.
        policy: ``fastest`` or ``smallest`` (``quantize.select``).
        max_drop: ``gate.max_quantization_drop``, points.
        reference: Torch fp32 measurements; defaults to the candidate named ``none`` when
            there is one. Without a reference the ``fastest`` rule has nothing to compare with
            and skips the not-slower check.
        max_bytes: The largest artifact the gate accepts (its size checks); larger candidates
            do not qualify. None: no limit.
        size_rule: Which setting ``max_bytes`` comes from, for the verdict.

    Returns:
        The selection; ``chosen`` None when no candidate qualified (``reason`` says why).
    """
    if not candidates:
        raise ValueError("select needs at least one candidate")
    if reference is None:
        reference = next((c for c in candidates if c.name == REFERENCE and c.built), None)

    judged: list[Candidate] = []
    qualifying: list[tuple[int, Candidate]] = []
    for order, c in enumerate(candidates):
        if not c.built:
            judged.append(replace(c, verdict=f"not applicable: {c.error}"))
            continue
        assert c.drop_points is not None
        if round(c.drop_points, 9) > max_drop:
            judged.append(replace(c, verdict=f"accuracy drop {c.drop_points:.2f} > {max_drop:g} points"))
            continue
        if max_bytes is not None and (c.size_bytes or 0) > max_bytes:
            judged.append(replace(c, verdict=f"{c.size_bytes} bytes > {max_bytes:.0f} allowed by {size_rule}"))
            continue
        slower = _slower_than(c, reference) if policy == "fastest" and reference is not None else []
        if slower and c.name != reference.name:  # type: ignore[union-attr]
            sizes = ", ".join(f"b{bs}" for bs in slower)
            judged.append(replace(c, verdict=f"slower than torch fp32 at {sizes}"))
            continue
        judged.append(replace(c, verdict="qualifies"))
        qualifying.append((order, judged[-1]))

    if not qualifying:
        tried = "; ".join(f"{c.name}: {c.verdict}" for c in judged)
        reason = f"no candidate qualified under select={policy} within {max_drop:g} points ({tried})"
        return Selection(chosen=None, reason=reason, candidates=judged, reference=reference)

    if policy == "fastest":
        order, best = min(qualifying, key=lambda oc: (oc[1].mean_latency(), oc[0]))
        why = f"fastest within {max_drop:g} points (geometric-mean p50 {best.mean_latency():.4f} ms"
    else:
        order, best = min(qualifying, key=lambda oc: (oc[1].size_bytes or 0, oc[1].mean_latency(), oc[0]))
        why = f"smallest within {max_drop:g} points ({best.size_bytes} bytes"
    if reference is not None and best.name != reference.name:
        speedups = [
            f"{reference.latency_ms[bs] / ms:.2f}x at b{bs}"
            for bs, ms in sorted(best.latency_ms.items())
            if bs in reference.latency_ms and ms > 0
        ]
        if speedups:
            why += f"; vs torch fp32: {', '.join(speedups)}"
    why += f"; validation drop {best.drop_points:.2f} points)"
    judged[order] = replace(best, verdict="chosen")
    return Selection(chosen=best.name, reason=f"chose {best.name}: {why}", candidates=judged, reference=reference)
