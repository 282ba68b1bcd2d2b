"""What the report says, as plain text: formatted numbers, labels, the decision and one-liners.

Shared by the HTML page (:mod:`kd_lib.report.html`), the Markdown summary
(:mod:`kd_lib.report.summary`) and the plots (:mod:`kd_lib.report.plots`), so the three say the
same thing in the same words. Nothing here escapes: each format escapes its own output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kd_lib.report.data import STAGE_EVALUATE, ReportData

ROLE_LABELS = {
    "teacher": "teacher",
    "student": "student (fp32)",
    "quantized": "student (quantized)",
    "baseline": "student without KD (fp32)",
}

OPS = {">=": "≥", "<=": "≤"}
CHECK_MEANINGS = {
    "min_accuracy": "quantized student test accuracy",
    "max_accuracy_drop": "teacher minus quantized student accuracy",
    "max_quantization_drop": "fp32 minus quantized student accuracy",
    "max_size_mb": "quantized student artifact size",
    "min_compression_ratio": "teacher bytes / quantized student bytes",
    "max_latency_ms": "deployed artifact p50 latency at that batch size",
    "min_speedup": "teacher p50 / deployed artifact p50 latency at that batch size",
    "kd_not_worse": "the KD student is not significantly worse than its baseline, or the baseline went on",
    "quantization_auto_found": "a candidate artifact qualified on the validation split",
}


def check_meaning(name: str) -> str:
    """What a gate check measures (per-batch-size checks share their field's meaning)."""
    return CHECK_MEANINGS.get(name, CHECK_MEANINGS.get(name.split(".")[0], ""))


# Shown where a value was not measured.
MISSING = "–"


def percent(fraction: Any) -> str:
    """A fraction as a percentage with two decimals (``0.9333`` -> ``93.33%``)."""
    return f"{float(fraction) * 100:.2f}%" if isinstance(fraction, (int, float)) else MISSING


def size_text(n: Any) -> str:
    """A byte count in B, KB or MB (decimal units, as artifact sizes are quoted)."""
    if not isinstance(n, (int, float)):
        return MISSING
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} KB"
    return f"{int(n)} B"


def number(value: Any, digits: int = 4) -> str:
    """A measurement to ``digits`` significant digits; counts with thousands separators."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return MISSING if value is None else str(value)
    # Counts come back from KFP/MLflow as floats (85002.0): print those as the ints they are.
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.{digits}g}"


def ratio_text(teacher: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """Teacher bytes / model bytes (``51.5x``), or the missing mark without both sizes."""
    if teacher.get("size_bytes") and row.get("size_bytes"):
        return f"{teacher['size_bytes'] / row['size_bytes']:.1f}x"
    return MISSING


def roles(data: ReportData) -> list[str]:
    """The evaluated roles: the known ones in table order, then any others as recorded."""
    ordered = [r for r in ROLE_LABELS if r in data.evaluation]
    return ordered + [r for r in data.evaluation if r not in ROLE_LABELS]


def role_label(data: ReportData, role: str) -> str:
    """A role's name for people; the quantized student is named by its scheme."""
    label = ROLE_LABELS.get(role, role)
    scheme = data.evaluation.get(role, {}).get("quantization")
    if role == "quantized" and scheme and scheme != "none":
        label = f"student ({scheme})"
    return label


def latency_batch_sizes(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    """The batch sizes that any row has a ``latency_b{bs}_p50_ms`` for, ascending."""
    sizes: set[int] = set()
    for row in rows:
        for key in row:
            if key.startswith("latency_b") and key.endswith("_p50_ms"):
                digits = key[len("latency_b") : -len("_p50_ms")]
                if digits.isdigit():
                    sizes.add(int(digits))
    return sorted(sizes)


def class_names(data: ReportData, n: int) -> list[str]:
    """The ``n`` class names, or the class indices when the recorded names do not fit."""
    names = list(data.class_names or [])
    return names if len(names) == n else [str(i) for i in range(n)]


def thresholds_of(data: ReportData) -> dict[str, float]:
    """Gate thresholds by check name: from the decision when there is one, else the config."""
    if data.gate and data.gate.get("checks"):
        return {c["name"]: float(c["threshold"]) for c in data.gate["checks"]}
    return {k: float(v) for k, v in data.thresholds.items() if isinstance(v, (int, float))}


def pareto_front(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats on both size (smaller) and accuracy (higher).

    Args:
        points: Dicts with ``size_bytes`` and ``accuracy``.

    Returns:
        The non-dominated points, sorted by size ascending (accuracy then ascends too).
    """
    ordered = sorted((dict(p) for p in points), key=lambda p: (p["size_bytes"], -p["accuracy"]))
    front: list[dict[str, Any]] = []
    for p in ordered:
        if not front or p["accuracy"] > front[-1]["accuracy"]:
            front.append(p)
    return front


def history_summary(role: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """One line on a training run: epochs, seconds and the best validation accuracy."""
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["epoch"]))
    seconds = sum(float(r.get("seconds", 0.0)) for r in rows)
    return (
        f"{role}: {len(rows)} epochs in {seconds:.1f} s, best validation accuracy "
        f"{best['val_accuracy'] * 100:.2f}% at epoch {best['epoch']}"
    )


def check_cells(check: Mapping[str, Any]) -> tuple[str, str, str]:
    """A gate check's value, operator and threshold as table cells (``0.8667 fraction``, ``≥``, ...)."""
    unit = check.get("unit", "")
    return (
        f"{float(check['value']):.4g} {unit}",
        OPS.get(check["op"], check["op"]),
        f"{float(check['threshold']):.4g} {unit}",
    )


def kd_gain_line(evaluation: dict[str, Any]) -> str | None:
    """One sentence on what the teacher bought, when the run trained the no-KD baseline."""
    gain = (evaluation.get("student") or {}).get("kd_gain_points")
    if not isinstance(gain, (int, float)) or "baseline" not in evaluation:
        return None
    line = (
        f"KD gain: {gain:+.2f} points of test accuracy for the student trained with the teacher over the same "
        f"student trained without it ({percent(evaluation['student'].get('accuracy'))} vs "
        f"{percent(evaluation['baseline'].get('accuracy'))}; same architecture, initial weights, epochs and schedule)"
    )
    paired = evaluation["student"].get("kd_gain")
    if isinstance(paired, dict) and "p_value" in paired:  # absent from evaluations written before it existed
        verdict = "significant at 5%"
        if not paired["significant"]:
            verdict = "not " + verdict + ": this test split cannot tell them apart"
        line += (
            f". Of {paired['n']} test samples, only the KD student is right on {paired['kd_only_right']} and only "
            f"the baseline on {paired['baseline_only_right']}: exact McNemar p = {paired['p_value']:.3g}, {verdict}"
        )
    return line


CANDIDATE_HEADERS = ("candidate", "backend", "val accuracy", "drop (pts)", "size")


def candidate_table(evaluation: dict[str, Any]) -> tuple[list[str], list[list[str]], list[str]] | None:
    """The deployment candidates the quantize step measured (validation split, this machine):
    ``(headers, rows, notes)``, the notes saying what was chosen and which fp32 model went on;
    None when the evaluation has no candidates (a run from before they existed)."""
    row = evaluation.get("quantized") or {}
    tries = row.get("candidates")
    if not tries:
        return None
    batch_sizes = sorted({int(bs) for t in tries for bs in (t.get("latency_ms") or {})})
    threads = row.get("latency_threads")
    unit = f", {threads} thread{'s' if threads != 1 else ''}" if threads else ""
    headers = [*CANDIDATE_HEADERS, *[f"p50 b{bs} (ms{unit})" for bs in batch_sizes], "verdict"]
    rows = []
    for t in tries:
        latency = t.get("latency_ms") or {}
        rows.append(
            [
                str(t.get("name", "")),
                str(t.get("backend", "")),
                percent(t.get("val_accuracy")),
                number(t.get("drop_points"), 2),
                size_text(t.get("size_bytes")),
                *[number(latency.get(str(bs)), 4) for bs in batch_sizes],
                str(t.get("verdict", "")),
            ]
        )
    notes = [str(row[key]) for key in ("quantization_auto_reason", "promotion_reason") if row.get(key)]
    return headers, rows, notes


# ---------------------------------------------------------------- the decision


@dataclass
class Decision:
    """The headline: a short verdict word, a CSS class and the sentences explaining it."""

    verdict: str
    css: str
    lines: list[str]


def _check_sentence(c: Mapping[str, Any]) -> str:
    unit = c.get("unit", "")
    wanted = "at least" if c["op"] == ">=" else "at most"
    return f"{c['name']}: {float(c['value']):.4g} {unit}, needs {wanted} {float(c['threshold']):.4g} {unit}"


def headline(data: ReportData) -> str:
    """The final student against the teacher in one sentence ("" without both measured)."""
    teacher, final = data.evaluation.get("teacher"), data.evaluation.get("quantized")
    if not teacher or not final or not final.get("size_bytes"):
        return ""
    drop = (final["accuracy"] - teacher["accuracy"]) * 100
    ratio = teacher["size_bytes"] / final["size_bytes"]
    return (
        f"{role_label(data, 'quantized')}: {percent(final['accuracy'])} test accuracy ({drop:+.2f} points vs the "
        f"teacher's {percent(teacher['accuracy'])}), {size_text(final['size_bytes'])}, {ratio:.1f}x smaller than "
        "the teacher."
    )


def decision_of(data: ReportData) -> Decision:
    """What happened to the candidate, in words, for the headline of both formats."""
    decision = _decision(data)
    if line := headline(data):
        decision.lines.insert(0, line)
    return decision


def _decision(data: ReportData) -> Decision:
    gate = data.gate
    failed = [c for c in (gate or {}).get("checks", []) if not c.get("passed")]
    if data.stage == STAGE_EVALUATE:
        if gate is None:
            return Decision("PENDING", "pending", ["The gate step decides after this step."])
        verdict = "all gate checks pass" if not failed else f"{len(failed)} gate check(s) fail"
        return Decision(
            "PENDING",
            "pending",
            [
                f"Measured by the evaluate step: {verdict}. The gate step decides, and registration runs, after it.",
                "The final report, with the decision and the registered version, is report.html on the MLflow "
                "parent run.",
            ],
        )
    state_note = f"Pipeline state: {data.state}." if data.state else ""
    if data.registration:
        reg = data.registration
        lines = [f"{reg['model_name']} version {reg['version']} was registered and @{reg['alias']} now points to it."]
        return Decision("PROMOTED", "pass", lines + ([state_note] if state_note else []))
    if gate is None:
        lines = ["The pipeline stopped before the gate: nothing was registered and no alias moved."]
        if data.error:
            lines.append(f"Error: {data.error}")
        return Decision("NO DECISION", "fail", lines + ([state_note] if state_note else []))
    if failed:
        lines = ["Rejected by the gate; nothing was registered and the alias was left where it was. Failed checks:"]
        return Decision("REJECTED", "fail", lines + [_check_sentence(c) for c in failed])
    lines = ["Every gate check passed, but no version was registered."]
    if data.error:
        lines.append(f"Error: {data.error}")
    return Decision("NOT REGISTERED", "fail", lines + ([state_note] if state_note else []))
