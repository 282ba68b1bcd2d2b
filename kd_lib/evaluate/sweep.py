"""A sweep: candidate configs from ``sweep:``, and the choice of one among their results.

Pure functions, no MLflow and no KFP. ``expand`` turns one config with a ``sweep`` section
into one full config per candidate (what the pipeline fans out with ``dsl.ParallelFor``);
``select`` takes each candidate's measurements and gate decision and applies the rule:

1. the accuracy/size Pareto front over all candidates (quantized test accuracy up, artifact
   bytes down) is computed and reported;
2. the chosen one is the smallest candidate that passes every gate. Among equally small
   passing ones a less accurate one is dominated, so the most accurate wins, then the lowest
   batch-1 latency p50, then the first listed. When none passes every check and
   ``registry.keep_rejected`` let some through as challengers (only champion checks failed),
   the same rule picks among those; otherwise nothing is chosen and every candidate's failed
   checks say why.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tabulate import tabulate

from kd_lib.artifacts.records import (
    DecisionRecord,
    EvaluationRecord,
    ModelMetrics,
    parse_decision,
    parse_evaluation,
)
from kd_lib.config import TEMPERATURE_LOSSES, ModelConfig, PipelineConfig, parse_config
from kd_lib.evaluate.gates import GateCheck, GateDecision

RULE = (
    "the smallest candidate that passes every gate (equally small: the most accurate, then the lowest "
    "batch-1 latency p50)"
)
# Short forms of the builders' usual parameters in candidate names, in the order they appear.
_ABBREVIATIONS = {"channels": "c", "width": "w", "depth": "d", "hidden": "h", "dropout": "p"}
# The actions of GateDecision.action, best first: the rule looks at the best group that is not empty.
_ELIGIBLE_ACTIONS = ("promote", "challenger")


@dataclass(frozen=True)
class Candidate:
    """One point of the sweep.

    Attributes:
        index: Position in the product order (students, then schemes, then temperatures).
        name: Stable short name, e.g. ``c2-mlp-w32d1-static_int8-T4``; unique within the sweep.
        config: The full config of this candidate (``sweep`` removed, ``candidate`` = name).
        student: The student architecture of this candidate.
        scheme: Its quantization scheme.
        temperature: Its kd/dkd temperature, or None when the sweep keeps the base ones.
    """

    index: int
    name: str
    config: PipelineConfig
    student: ModelConfig
    scheme: str
    temperature: float | None


def _number(value: Any) -> str:
    """``4.0`` -> ``"4"``, ``0.1`` -> ``"0.1"``; anything else as its string."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "", text)


def candidate_name(index: int, student: ModelConfig, scheme: str, temperature: float | None = None) -> str:
    """The candidate's short name: ``c<index>-<arch>-<params>-<scheme>[-T<temperature>]``.

    Params are abbreviated (width -> w, depth -> d, channels -> c, hidden -> h, dropout -> p;
    other keys as they are, sorted), so ``{arch: mlp, params: {width: 32, depth: 1}}`` with
    ``static_int8`` at T=4 as the third candidate is ``c2-mlp-w32d1-static_int8-T4``. The
    index keeps names unique even where abbreviations collide.
    """
    arch = _slug(student.arch.split(":")[-1].split(".")[-1]) or "model"
    order = [k for k in _ABBREVIATIONS if k in student.params] + sorted(
        k for k in student.params if k not in _ABBREVIATIONS
    )
    params = _slug("".join(f"{_ABBREVIATIONS.get(k, k)}{_number(student.params[k])}" for k in order))
    parts = [f"c{index}", arch, params, scheme] + ([f"T{_number(temperature)}"] if temperature is not None else [])
    return "-".join(p for p in parts if p)[:100]


def expand(cfg: PipelineConfig) -> list[Candidate]:
    """Every candidate of ``cfg.sweep``: the base config with its overrides applied.

    Each candidate's config has ``student.model`` and ``quantize.scheme`` replaced, the
    ``temperature`` param of every kd/dkd term of ``distill.losses`` set when the sweep lists
    temperatures, ``quantize.backend`` kept only for the scheme it was set for (it names one
    scheme's backend), ``sweep`` removed and ``candidate`` set to the candidate's name.

    Raises:
        ValueError: ``cfg`` has no sweep section.
        ConfigError: a candidate's config is invalid (named in the message).
    """
    if cfg.sweep is None:
        raise ValueError("the config has no sweep section; add sweep: {students: [...], schemes: [...]}")
    base = cfg.model_dump(mode="json", exclude={"sweep"})
    temperatures: list[float | None] = list(cfg.sweep.temperatures) if cfg.sweep.temperatures else [None]
    candidates = []
    combos = itertools.product(cfg.sweep.students, cfg.sweep.schemes, temperatures)
    for index, (student, scheme, temperature) in enumerate(combos):
        name = candidate_name(index, student, scheme, temperature)
        tree = json.loads(json.dumps(base))  # a deep copy of plain JSON values
        tree["student"]["model"] = student.model_dump(mode="json")
        tree["quantize"]["scheme"] = scheme
        if scheme != cfg.quantize.scheme:
            tree["quantize"]["backend"] = None
        if temperature is not None:
            for term in tree["distill"]["losses"]:
                if term["name"] in TEMPERATURE_LOSSES:
                    term["params"]["temperature"] = temperature
        tree["candidate"] = name
        config = parse_config(tree, origin=f"sweep candidate {name}")
        candidates.append(Candidate(index, name, config, student, scheme, temperature))
    return candidates


def candidate_configs(cfg: PipelineConfig) -> list[str]:
    """The candidates' configs as canonical JSON, in candidate order: the items of the
    pipeline's ``dsl.ParallelFor``."""
    return [c.config.to_json() for c in expand(cfg)]


# ---------------------------------------------------------------- choosing one


class Point(Protocol):
    """Anything with a quantized test accuracy (fraction) and an artifact size (bytes)."""

    @property
    def accuracy(self) -> float: ...

    @property
    def size_bytes(self) -> float: ...


@dataclass(frozen=True)
class CandidateResult:
    """What one candidate measured and what its gate decided.

    Attributes:
        name: The candidate's name.
        index: Its position in the sweep (the last tie-break).
        accuracy: Quantized student test accuracy, fraction.
        size_bytes: Quantized student artifact bytes.
        latency_ms: Quantized student batch-1 latency p50, ms; None when not measured.
        decision: Its gate decision.
        action: ``promote``, ``challenger`` or ``reject`` (``GateDecision.action``).
        info: Anything else shown in the table (scheme, student, temperature, fp32 accuracy).
    """

    name: str
    index: int
    accuracy: float
    size_bytes: float
    latency_ms: float | None
    decision: GateDecision
    action: str
    info: dict[str, Any] = field(default_factory=dict)


def _measured(row: ModelMetrics, key: str) -> float:
    value = row.get(key)
    if value is None:
        raise ValueError(f"the evaluation's quantized row lacks {key!r}; got keys {sorted(row.to_dict())}")
    return float(value)


def result_from(
    name: str,
    index: int,
    evaluation: EvaluationRecord | Mapping[str, Any],
    decision: DecisionRecord | Mapping[str, Any],
    info: Mapping[str, Any] | None = None,
) -> CandidateResult:
    """A CandidateResult from the evaluate step's record and the gate step's decision record.

    Args:
        evaluation: Role -> metrics, as ``steps.evaluate`` writes it (a record or its dict);
            its ``quantized`` row is used.
        decision: ``GateDecision.to_dict()`` plus ``action``, as ``steps.gate`` writes it.

    Raises:
        ArtifactError: either is malformed (naming the field).
        ValueError: the evaluation has no quantized accuracy or size.
    """
    record = parse_evaluation(evaluation)
    quantized = record.quantized
    if quantized is None:
        raise ValueError(f"the evaluation of candidate {name} has no quantized row; got roles {list(record.roles())}")
    written = parse_decision(decision)
    gate = GateDecision.from_record(written)
    return CandidateResult(
        name=name,
        index=index,
        accuracy=_measured(quantized, "accuracy"),
        size_bytes=_measured(quantized, "size_bytes"),
        latency_ms=quantized.latency_ms(1),
        decision=gate,
        action=written.action or ("promote" if gate.passed else "reject"),
        info=dict(info or {}) | {"fp32_accuracy": record.student.get("accuracy") if record.student else None},
    )


def dominates(a: Point, b: Point) -> bool:
    """``a`` is at least as small and as accurate as ``b``, and strictly better in one."""
    no_worse = a.size_bytes <= b.size_bytes and a.accuracy >= b.accuracy
    return no_worse and (a.size_bytes < b.size_bytes or a.accuracy > b.accuracy)


def pareto_front(points: Sequence[Point]) -> list[Any]:
    """The points no other point dominates, smallest first (accuracy then rises).

    Equal points do not dominate each other: both stay on the front. Quadratic, which is
    nothing at sweep sizes.
    """
    front = [p for p in points if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda p: (p.size_bytes, -p.accuracy))


def _latency(r: CandidateResult) -> float:
    return r.latency_ms if r.latency_ms is not None and math.isfinite(r.latency_ms) else math.inf


@dataclass(frozen=True)
class Selection:
    """The outcome of ``select``.

    Attributes:
        chosen: The candidate to register, or None when none may be.
        action: ``promote``, ``challenger`` (see ``registry.keep_rejected``) or ``reject``.
        front: Names of the candidates on the Pareto front of all candidates, smallest first.
        results: Every candidate, in sweep order.
    """

    chosen: CandidateResult | None
    action: str
    front: list[str]
    results: list[CandidateResult]

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-able row per candidate: measurements, front membership, gate verdict and
        every failed check with its value and threshold."""
        rows = []
        for r in self.results:
            failed = r.decision.failed()
            rows.append(
                {
                    "candidate": r.name,
                    "index": r.index,
                    **r.info,
                    "accuracy": r.accuracy,
                    "size_bytes": r.size_bytes,
                    "latency_b1_p50_ms": r.latency_ms,
                    "on_front": r.name in self.front,
                    "passed": r.decision.passed,
                    "action": r.action,
                    "chosen": self.chosen is not None and r.name == self.chosen.name,
                    "failed_checks": [c.name for c in failed],
                    "why": [_why(c) for c in failed],
                }
            )
        return rows

    def to_dict(self) -> dict[str, Any]:
        """What ``sweep.json`` holds: the choice, the rule, and every candidate's row."""
        return {
            "chosen": self.chosen.name if self.chosen else None,
            "action": self.action,
            "rule": RULE,
            "front": list(self.front),
            "candidates": self.rows(),
        }

    def decision(self) -> GateDecision:
        """The gate decision of the run: the chosen candidate's, or when none was chosen one
        failed check per candidate (value = its failed checks, detail = which)."""
        if self.chosen is not None:
            return self.chosen.decision
        checks = [
            GateCheck(
                name=f"candidate {r.name}",
                value=float(len(r.decision.failed())),
                threshold=0.0,
                op="<=",
                passed=False,
                unit="failed checks",
                detail="; ".join(_why(c) for c in r.decision.failed()),
            )
            for r in self.results
        ]
        return GateDecision(passed=False, checks=checks)

    def headline(self) -> str:
        """One sentence: what was chosen and why, or that nothing was."""
        n = len(self.results)
        if self.chosen is None:
            return f"No candidate of {n} passed every gate: nothing is registered and the alias stays where it was."
        kind = "it passes every gate" if self.action == "promote" else "it fails only champion checks (challenger)"
        return f"Chosen: {self.chosen.name} of {n} candidates as {RULE}; {kind}."


def _why(c: GateCheck) -> str:
    wanted = "at least" if c.op == ">=" else "at most"
    text = f"{c.name} {c.value:.4g} {c.unit}, needs {wanted} {c.threshold:.4g}"
    return f"{text} ({c.detail})" if c.detail else text


def select(results: Sequence[CandidateResult]) -> Selection:
    """Choose the candidate to register (see the module docstring for the rule).

    Args:
        results: Every candidate's measurements and gate decision.

    Returns:
        The Selection: the chosen candidate (or None), its action and the front.

    Raises:
        ValueError: ``results`` is empty or names a candidate twice.
    """
    if not results:
        raise ValueError("select needs at least one candidate result")
    names = [r.name for r in results]
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    ordered = sorted(results, key=lambda r: r.index)
    front = [r.name for r in pareto_front(ordered)]
    for action in _ELIGIBLE_ACTIONS:
        pool = [r for r in ordered if r.action == action]
        if pool:
            # The front of the eligible ones first: an equally small but less accurate
            # candidate is never chosen over a more accurate one.
            chosen = min(pareto_front(pool), key=lambda r: (r.size_bytes, _latency(r), r.index))
            return Selection(chosen=chosen, action=action, front=front, results=ordered)
    return Selection(chosen=None, action="reject", front=front, results=ordered)


# ---------------------------------------------------------------- tables and the plot


def _cells(row: Mapping[str, Any]) -> list[str]:
    latency = row.get("latency_b1_p50_ms")
    verdict = "PASS" if row["passed"] else ("challenger" if row["action"] == "challenger" else "FAIL")
    return [
        ("* " if row["chosen"] else "  ") + row["candidate"],
        f"{row['accuracy'] * 100:.2f}%",
        f"{row['size_bytes'] / 1e3:.1f} KB",
        f"{latency:.3f}" if isinstance(latency, (int, float)) else "-",
        "yes" if row["on_front"] else "-",
        verdict,
        "; ".join(row["why"]) or "-",
    ]


_HEADERS = ["candidate", "accuracy", "size", "latency b1 p50 (ms)", "front", "gate", "failed checks"]


def table_text(summary: Mapping[str, Any]) -> str:
    """Plain-text table of ``Selection.to_dict()``: every candidate, ``*`` marks the chosen one,
    with the failed checks that explain each FAIL."""
    rows = [_cells(r) for r in summary["candidates"]]
    # preserve_whitespace: the two spaces before an unchosen name line it up with "* chosen".
    lines = [tabulate(rows, _HEADERS, tablefmt="simple", disable_numparse=True, preserve_whitespace=True)]
    chosen = summary.get("chosen")
    if chosen:
        lines.append(f"chosen: {chosen} ({summary['action']}), {summary.get('rule', RULE)}")
    else:
        lines.append(
            "chosen: none; no candidate passed every gate, so nothing is registered (the failed checks say why)"
        )
    return "\n".join(lines)


def _md(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def table_markdown(summary: Mapping[str, Any], plot_png_b64: str | None = None) -> str:
    """Markdown of ``Selection.to_dict()`` (for the KFP UI and MLflow), the plot inlined when given."""
    out = ["# Sweep", ""]
    chosen = summary.get("chosen")
    if chosen:
        out.append(f"**Chosen: {_md(chosen)}** ({summary['action']}): {_md(summary.get('rule', RULE))}.")
    else:
        out.append(
            "**No candidate passed every gate**: nothing is registered; each candidate's failed checks are below."
        )
    rows = []
    for row in summary["candidates"]:
        cells = _cells(row)
        cells[0] = ("**" + row["candidate"] + "**") if row["chosen"] else row["candidate"]
        rows.append([_md(c) for c in cells])
    out += ["", tabulate(rows, _HEADERS, tablefmt="github", disable_numparse=True)]
    if plot_png_b64:
        out += ["", f"![accuracy versus size, Pareto front](data:image/png;base64,{plot_png_b64})"]
    return "\n".join(out) + "\n"


def plot_front(summary: Mapping[str, Any]) -> bytes:
    """Accuracy versus artifact size of every candidate with the Pareto front; PNG bytes.

    Green dots pass every gate, red crosses fail; the chosen one is a star. matplotlib's
    object API with the Agg canvas (no pyplot, no display), as in kd_lib.report.plots.
    """
    from matplotlib.figure import Figure  # lazy: matplotlib (slow to import) only for the plot

    rows = list(summary["candidates"])
    fig = Figure(figsize=(8.5, 5.0))
    ax = fig.subplots()
    for row in rows:
        x, y = row["size_bytes"] / 1e3, row["accuracy"] * 100
        if row["chosen"]:
            ax.scatter([x], [y], marker="*", s=320, color="#2ca02c", edgecolor="black", zorder=4)
        elif row["passed"]:
            ax.scatter([x], [y], marker="o", s=60, color="#2ca02c", edgecolor="black", zorder=3)
        else:
            ax.scatter([x], [y], marker="x", s=60, color="#d62728", zorder=3)
        ax.annotate(row["candidate"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
    front = sorted((r for r in rows if r["on_front"]), key=lambda r: (r["size_bytes"], -r["accuracy"]))
    ax.step(
        [r["size_bytes"] / 1e3 for r in front],
        [r["accuracy"] * 100 for r in front],
        where="post",
        color="#555555",
        lw=1,
        label="Pareto front (all candidates)",
    )
    # Legend entries for the markers (drawn once, off the data).
    ax.scatter([], [], marker="*", s=160, color="#2ca02c", edgecolor="black", label="chosen")
    ax.scatter([], [], marker="o", color="#2ca02c", edgecolor="black", label="passes every gate")
    ax.scatter([], [], marker="x", color="#d62728", label="fails a gate")
    ax.set_xscale("log")
    ax.set(
        title="Sweep: accuracy versus artifact size",
        xlabel="quantized artifact size (KB, log scale)",
        ylabel="quantized test accuracy (%)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()
