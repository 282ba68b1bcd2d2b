"""The compression report: one self-contained HTML file (plots inlined) plus a Markdown summary.

Pure rendering: plain dicts in (what evaluate, the training loops, the gate and the registry
recorded), strings out. No MLflow, no KFP, no file I/O; the callers decide where it goes
(the evaluate step's ``Output[HTML]``, the MLflow parent run, ``kdflow report -o``).

Plots use matplotlib's object API (``Figure`` + Agg canvas) rather than pyplot, so rendering
never touches a global backend or opens a window; every PNG is base64-inlined so the file can
be mailed, attached or opened from an artifact store without its neighbours.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Report stages: the evaluate step knows measurements and thresholds, not yet the decision;
# the exit handler (and `kdflow report`) know everything that happened.
STAGE_EVALUATE = "evaluate"
STAGE_FINAL = "final"

# Section ids, in page order; tests and anchors rely on them.
SECTIONS = ("decision", "models", "training", "confusion", "tradeoff", "gate", "config")

ROLE_LABELS = {
    "teacher": "teacher",
    "student": "student (fp32)",
    "quantized": "student (quantized)",
    "baseline": "student without KD (fp32)",
}
ROLE_COLORS = {"teacher": "#1f77b4", "student": "#ff7f0e", "quantized": "#2ca02c", "baseline": "#7f7f7f"}

OPS = {">=": "≥", "<=": "≤"}
CHECK_MEANINGS = {
    "min_accuracy": "quantized student test accuracy",
    "max_accuracy_drop": "teacher minus quantized student accuracy",
    "max_quantization_drop": "fp32 minus quantized student accuracy",
    "max_size_mb": "quantized student artifact size",
    "min_compression_ratio": "teacher bytes / quantized student bytes",
}


@dataclass
class ReportData:
    """Everything a report shows, as plain JSON-able values.

    Attributes:
        name: The pipeline config's ``name``.
        evaluation: Role (``teacher``, ``student``, ``quantized``) -> the dict of
            ``evaluation.evaluate_model`` (accuracy, macro_f1, size_bytes, num_params,
            latency_b{bs}_p50_ms/p95_ms, confusion_matrix, optionally ``vs_teacher``: the
            dict of ``evaluation.agreement``).
        histories: ``teacher`` / ``student`` -> per-epoch dicts of ``TrainResult.history``
            (epoch, train_loss, val_loss, val_accuracy, ...). Missing roles (an imported
            teacher) are shown as such.
        gate: ``GateDecision.to_dict()``, or None when the gate never ran.
        thresholds: The config's ``gate`` section; used for the plot when ``gate`` is None.
        registration: ``{"model_name", "version", "alias"}`` when a version was registered.
        stage: ``"evaluate"`` (written before the gate/registration) or ``"final"``.
        state: The pipeline's final state (``SUCCEEDED``, ``FAILED``, ...) in the final stage.
        error: The pipeline's error message, if it failed.
        run: Identifiers shown in the header (pipeline_run_id, mlflow_parent_run_id,
            dataset_fingerprint, config_hash).
        config: The resolved pipeline config (nested), shown at the end for audit.
        class_names: One name per class; defaults to the class indices.
        pareto: Candidates of a sweep, ``[{"label", "accuracy", "size_bytes"}]``: drawn on
            the accuracy-versus-size plot with their Pareto front.
    """

    name: str = "kdflow"
    evaluation: dict[str, dict[str, Any]] = field(default_factory=dict)
    histories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    gate: dict[str, Any] | None = None
    thresholds: dict[str, float] = field(default_factory=dict)
    registration: dict[str, str] | None = None
    stage: str = STAGE_FINAL
    state: str = ""
    error: str = ""
    run: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    class_names: list[str] | None = None
    pareto: list[dict[str, Any]] | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReportData:
        """Build from a dict with (a subset of) the attribute names; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown report field(s) {unknown}; expected some of {sorted(known)}")
        return cls(**dict(data))


def _param_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # strings were logged as they are


def config_from_params(params: Mapping[str, str]) -> dict[str, Any]:
    """Rebuild the nested config from the parent run's flat params (``a.b.c`` -> value)."""
    tree: dict[str, Any] = {}
    for key in sorted(params):
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                break
        else:
            node[leaf] = _param_value(params[key])
    return tree


def from_pipeline_record(record: Mapping[str, Any], state: str | None = None, error: str | None = None) -> ReportData:
    """The final report's data from ``tracking.pipeline_record`` (what MLflow holds of a run).

    Args:
        record: The dict of ``tracking.pipeline_record``.
        state: The pipeline's final state when known better than the parent run's tags
            (the exit handler knows it before it tags the run).
        error: The pipeline's error message, likewise.
    """
    tags = record.get("tags", {})
    config = config_from_params(record.get("params", {}))
    meta = record.get("dataset_meta") or {}
    registration = None
    if tags.get("kdflow.registered_version"):
        registry = config.get("registry", {})
        registration = {
            "model_name": str(registry.get("model_name", "")),
            "version": tags["kdflow.registered_version"],
            "alias": tags.get("kdflow.alias", str(registry.get("alias", ""))),
        }
    return ReportData(
        name=str(config.get("name", "kdflow")),
        evaluation=record.get("evaluation") or {},
        histories=record.get("histories") or {},
        gate=record.get("gate"),
        thresholds=config.get("gate", {}),
        registration=registration,
        stage=STAGE_FINAL,
        state=state or tags.get("kdflow.pipeline_state", ""),
        error=error if error is not None else tags.get("kdflow.pipeline_error", ""),
        run={
            "pipeline_run_id": tags.get("kdflow.pipeline_run_id", ""),
            "mlflow_parent_run_id": record.get("parent_run_id", ""),
            "dataset_fingerprint": tags.get("kdflow.dataset_fingerprint", ""),
            "config_hash": tags.get("kdflow.config_hash", ""),
        },
        config=config,
        class_names=meta.get("class_names"),
        # A sweep's candidates, drawn with their front on the accuracy-versus-size plot.
        pareto=[
            {"label": r["candidate"], "accuracy": r["accuracy"], "size_bytes": r["size_bytes"]}
            for r in (record.get("sweep") or {}).get("candidates", [])
        ]
        or None,
    )


# ---------------------------------------------------------------- numbers and small helpers


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(fraction: Any) -> str:
    return f"{float(fraction) * 100:.2f}%" if isinstance(fraction, (int, float)) else "–"


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    if n >= 1e6:
        return f"{n / 1e6:.2f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.1f} KB"
    return f"{int(n)} B"


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–" if value is None else str(value)
    # Counts come back from KFP/MLflow as floats (85002.0): print those as the ints they are.
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.{digits}g}"


def _roles(data: ReportData) -> list[str]:
    ordered = [r for r in ROLE_LABELS if r in data.evaluation]
    return ordered + [r for r in data.evaluation if r not in ROLE_LABELS]


def _role_label(data: ReportData, role: str) -> str:
    label = ROLE_LABELS.get(role, role)
    scheme = data.evaluation.get(role, {}).get("quantization")
    if role == "quantized" and scheme and scheme != "none":
        label = f"student ({scheme})"
    return label


def _latency_batch_sizes(rows: Sequence[Mapping[str, Any]]) -> list[int]:
    sizes: set[int] = set()
    for row in rows:
        for key in row:
            if key.startswith("latency_b") and key.endswith("_p50_ms"):
                digits = key[len("latency_b") : -len("_p50_ms")]
                if digits.isdigit():
                    sizes.add(int(digits))
    return sorted(sizes)


def _class_names(data: ReportData, n: int) -> list[str]:
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


# ---------------------------------------------------------------- decision text


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
        f"{_role_label(data, 'quantized')}: {_pct(final['accuracy'])} test accuracy ({drop:+.2f} points vs the "
        f"teacher's {_pct(teacher['accuracy'])}), {_bytes(final['size_bytes'])}, {ratio:.1f}x smaller than the teacher."
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


# ---------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Figure:
    # Imported here: every pipeline step imports kd_lib.steps, and only two of them draw.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{b64}">'


def plot_training(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Loss and validation accuracy per epoch, teacher and student on shared axes; base64 PNG."""
    fig = _figure(10.5, 3.6)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for role, rows in histories.items():
        if not rows:
            continue
        color = ROLE_COLORS.get(role, "#555555")
        epochs = [r["epoch"] for r in rows]
        train_label = "train (KD loss)" if role == "student" else "train (CE)"
        ax_loss.plot(epochs, [r["train_loss"] for r in rows], color=color, label=f"{role} {train_label}")
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], color=color, ls="--", label=f"{role} val (CE)")
        acc = [r["val_accuracy"] * 100 for r in rows]
        ax_acc.plot(epochs, acc, color=color, label=role)
        best = max(range(len(acc)), key=lambda i: (acc[i], -i))
        ax_acc.plot(
            [epochs[best]],
            [acc[best]],
            marker="o",
            color=color,
            ms=7,
            label=f"{role} best: {acc[best]:.2f}% @ epoch {epochs[best]}",
        )
    ax_loss.set(title="Loss per epoch", xlabel="epoch", ylabel="loss")
    ax_loss.set_yscale("log")
    ax_acc.set(title="Validation accuracy per epoch", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _png(fig)


def _heatmap(
    ax: Any, matrix: list[list[int]], names: list[str], title: str, xlabel: str, ylabel: str, cmap: str, log: bool
) -> None:
    from matplotlib.colors import LogNorm, Normalize

    n = len(matrix)
    peak = max((max(row) for row in matrix), default=0)
    # Log colours where the diagonal holds nearly every sample: a linear scale would hide the errors.
    norm = LogNorm(vmin=1, vmax=max(peak, 2)) if log else Normalize(vmin=0, vmax=max(peak, 4))
    masked = [[v if v > 0 else math.nan for v in row] for row in matrix]
    ax.imshow(masked, cmap=cmap, norm=norm)
    ax.set_xticks(range(n), names, fontsize=7, rotation=90 if max(map(len, names)) > 3 else 0)
    ax.set_yticks(range(n), names, fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xticks([i - 0.5 for i in range(1, n)], minor=True)
    ax.set_yticks([i - 0.5 for i in range(1, n)], minor=True)
    ax.grid(which="minor", color="#eeeeee", lw=0.5)
    ax.tick_params(which="minor", length=0)
    if n <= 20:  # counts in the cells; beyond that they would not fit
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                if v:
                    dark = norm(v) > 0.6
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=6.5, color="white" if dark else "black")


def plot_confusions(
    teacher_cm: list[list[int]] | None,
    student_cm: list[list[int]] | None,
    pairs: list[list[int]] | None,
    names: list[str],
    student_label: str,
) -> str:
    """Confusion matrices of the teacher and the final student, and their disagreements; base64 PNG."""
    panels = [
        (teacher_cm, "Teacher", "predicted", "true", "Blues", True),
        (student_cm, student_label[:1].upper() + student_label[1:], "predicted", "true", "Greens", True),
        (pairs, "Where they disagree", "student predicted", "teacher predicted", "Oranges", False),
    ]
    panels = [p for p in panels if p[0] is not None]
    fig = _figure(3.6 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (matrix, *rest) in zip(axes, panels):
        _heatmap(ax, matrix, names, *rest)
    fig.tight_layout()
    return _png(fig)


def plot_tradeoff(data: ReportData) -> str:
    """Accuracy versus artifact size (log), the gate's pass region and thresholds; base64 PNG."""
    return _png(tradeoff_figure(data))


def tradeoff_figure(data: ReportData) -> Figure:
    """The figure of ``plot_tradeoff``: x is size in KB (log), y accuracy in %; each gate
    threshold is a line (accuracy floors horizontal, size ceilings vertical)."""
    fig = _figure(8.5, 5.0)
    ax = fig.subplots()
    th = thresholds_of(data)
    teacher = data.evaluation.get("teacher", {})
    points = [(role, row) for role, row in data.evaluation.items() if "size_bytes" in row and "accuracy" in row]
    sizes_kb = [row["size_bytes"] / 1e3 for _, row in points]
    accs = [row["accuracy"] * 100 for _, row in points]

    if data.pareto:
        px = [p["size_bytes"] / 1e3 for p in data.pareto]
        py = [p["accuracy"] * 100 for p in data.pareto]
        ax.scatter(px, py, color="#999999", s=18, label="sweep candidates", zorder=2)
        front = pareto_front(data.pareto)
        ax.step(
            [p["size_bytes"] / 1e3 for p in front],
            [p["accuracy"] * 100 for p in front],
            where="post",
            color="#555555",
            lw=1,
            label="Pareto front",
            zorder=2,
        )
        sizes_kb, accs = sizes_kb + px, accs + py

    # Bars: accuracy floor(s) and size ceiling(s); the pass region is their intersection.
    floors, ceilings = [], []
    if "min_accuracy" in th:
        floors.append((th["min_accuracy"] * 100, f"min_accuracy {th['min_accuracy'] * 100:.1f}%", "-"))
    if "max_accuracy_drop" in th and "accuracy" in teacher:
        floor = teacher["accuracy"] * 100 - th["max_accuracy_drop"]
        floors.append((floor, f"teacher − max_accuracy_drop ({th['max_accuracy_drop']:g} pts)", ":"))
    if "max_size_mb" in th:
        ceilings.append((th["max_size_mb"] * 1e3, f"max_size_mb {th['max_size_mb']:g} MB", "-"))
    if "min_compression_ratio" in th and "size_bytes" in teacher:
        ceiling = teacher["size_bytes"] / 1e3 / th["min_compression_ratio"]
        ceilings.append((ceiling, f"teacher / min_compression_ratio ({th['min_compression_ratio']:g}x)", ":"))

    x_lo = min(sizes_kb + [c for c, _, _ in ceilings] or [1.0]) / 2.5
    x_hi = max(sizes_kb + [c for c, _, _ in ceilings] or [10.0]) * 2.5
    y_lo = min(accs + [f for f, _, _ in floors] or [0.0]) - 3
    y_hi = min(100.5, max(accs + [f for f, _, _ in floors] or [100.0]) + 2)
    y_lo = max(0.0, min(y_lo, y_hi - 5))
    for value, label, style in floors:
        ax.axhline(value, color="#d62728", ls=style, lw=1.2, label=label)
    for value, label, style in ceilings:
        ax.axvline(value, color="#9467bd", ls=style, lw=1.2, label=label)
    if floors or ceilings:
        right = min([c for c, _, _ in ceilings] or [x_hi])
        bottom = max([f for f, _, _ in floors] or [y_lo])
        ax.fill_between([x_lo, right], bottom, y_hi, color="#2ca02c", alpha=0.08, lw=0, label="passes every bar")

    for (role, row), x, y in zip(points, sizes_kb, accs):
        ax.scatter([x], [y], s=90, color=ROLE_COLORS.get(role, "#333333"), edgecolor="black", zorder=3)
        # fp32 and quantized students usually share an accuracy: one label above, one below.
        above = role == "quantized"
        ax.annotate(
            f"{_role_label(data, role)}\n{y:.2f}%, {_bytes(row['size_bytes'])}",
            (x, y),
            textcoords="offset points",
            xytext=(0, 10 if above else -10),
            ha="center",
            va="bottom" if above else "top",
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set(title="Accuracy versus artifact size", xlabel="artifact size (KB, log scale)", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    return fig


# ---------------------------------------------------------------- HTML sections

_CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; margin: 0; color: #1d1d1f;
       background: #f6f7f9; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 0 0 12px; }
section { background: #fff; border: 1px solid #e1e4e8; border-radius: 8px; padding: 18px 22px; margin: 16px 0; }
.meta { color: #57606a; font-size: 13px; } .meta code { font-size: 12px; }
table { border-collapse: collapse; font-size: 14px; width: 100%; }
th, td { padding: 6px 10px; border-bottom: 1px solid #eaecef; text-align: right; white-space: nowrap; }
th { background: #f6f8fa; font-weight: 600; } th:first-child, td:first-child { text-align: left; }
table.gate td:nth-child(2), table.gate th:nth-child(2) { text-align: left; white-space: normal; color: #57606a; }
.badge { display: inline-block; padding: 4px 12px; border-radius: 14px; font-weight: 700; font-size: 15px;
         letter-spacing: .5px; }
.pass { background: #dafbe1; color: #116329; } .fail { background: #ffebe9; color: #a40e26; }
.pending { background: #fff8c5; color: #7d4e00; }
.verdict-pass { color: #116329; font-weight: 700; } .verdict-fail { color: #a40e26; font-weight: 700; }
img { max-width: 100%; height: auto; display: block; margin: 8px auto; }
.note { color: #57606a; font-size: 13px; } pre { background: #f6f8fa; padding: 12px; overflow-x: auto; font-size: 12px; }
ul.stats { margin: 6px 0 0; padding-left: 20px; font-size: 14px; }
"""


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], css_class: str = "") -> str:
    """``rows`` hold already-escaped HTML cells (so a cell may carry markup)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css_class}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _section(sid: str, title: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_esc(title)}</h2>{body}</section>'


def _missing(what: str) -> str:
    return f'<p class="note">{_esc(what)}</p>'


def _header_html(data: ReportData) -> str:
    run = data.run
    items = [
        ("pipeline run", run.get("pipeline_run_id")),
        ("MLflow parent run", run.get("mlflow_parent_run_id")),
        ("dataset", (run.get("dataset_fingerprint") or "")[:12]),
        ("config hash", (run.get("config_hash") or "")[:12]),
        ("state", data.state),
        ("report", "final" if data.stage == STAGE_FINAL else "written by the evaluate step"),
        ("generated", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]
    meta = " · ".join(f"{_esc(k)} <code>{_esc(v)}</code>" for k, v in items if v)
    return f'<header><h1>Compression report: {_esc(data.name)}</h1><p class="meta">{meta}</p></header>'


def _decision_html(data: ReportData) -> str:
    d = decision_of(data)
    lines = "".join(f"<li>{_esc(line)}</li>" for line in d.lines)
    badge = f'<span class="badge {d.css}">{_esc(d.verdict)}</span>'
    return _section("decision", "Decision", f'{badge}<ul class="stats">{lines}</ul>')


def kd_gain_line(evaluation: dict[str, Any]) -> str | None:
    """One sentence on what the teacher bought, when the run trained the no-KD baseline."""
    gain = (evaluation.get("student") or {}).get("kd_gain_points")
    if not isinstance(gain, (int, float)) or "baseline" not in evaluation:
        return None
    line = (
        f"KD gain: {gain:+.2f} points of test accuracy for the student trained with the teacher over the same "
        f"student trained without it ({_pct(evaluation['student'].get('accuracy'))} vs "
        f"{_pct(evaluation['baseline'].get('accuracy'))}; same architecture, initial weights, epochs and schedule)"
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


def _models_html(data: ReportData) -> str:
    roles = _roles(data)
    if not roles:
        return _section("models", "Models", _missing("No evaluation: the pipeline stopped before the evaluate step."))
    teacher = data.evaluation.get("teacher", {})
    batch_sizes = _latency_batch_sizes([data.evaluation[r] for r in roles])
    headers = ["model", "accuracy", "Δ vs teacher", "macro-F1", "size", "compression", "parameters"]
    headers += [f"latency b{bs} p50 / p95 (ms)" for bs in batch_sizes]
    rows = []
    for role in roles:
        row = data.evaluation[role]
        delta = "–"
        if role != "teacher" and "accuracy" in teacher and "accuracy" in row:
            delta = f"{(row['accuracy'] - teacher['accuracy']) * 100:+.2f} pts"
        ratio = "–"
        if teacher.get("size_bytes") and row.get("size_bytes"):
            ratio = f"{teacher['size_bytes'] / row['size_bytes']:.1f}x"
        cells = [
            _esc(_role_label(data, role)),
            _esc(_pct(row.get("accuracy"))),
            _esc(delta),
            _esc(_num(row.get("macro_f1"))),
            _esc(_bytes(row.get("size_bytes"))),
            _esc(ratio),
            _esc(_num(row.get("num_params"))),
        ]
        for bs in batch_sizes:
            p50, p95 = row.get(f"latency_b{bs}_p50_ms"), row.get(f"latency_b{bs}_p95_ms")
            cells.append(_esc(f"{_num(p50, 3)} / {_num(p95, 3)}"))
        rows.append(cells)
    note = (
        '<p class="note">Test split. Size is the bytes of the saved artifact; compression is teacher bytes / '
        "model bytes; parameters are counted on the fp32 architecture; latency is one CPU forward pass.</p>"
    )
    gain = kd_gain_line(data.evaluation)
    if gain:
        note = f'<ul class="stats"><li>{_esc(gain)}</li></ul>' + note
    return _section("models", "Models", _table(headers, rows) + note)


def _history_summary(role: str, rows: Sequence[Mapping[str, Any]]) -> str:
    best = max(rows, key=lambda r: (r["val_accuracy"], -r["epoch"]))
    seconds = sum(float(r.get("seconds", 0.0)) for r in rows)
    return (
        f"{role}: {len(rows)} epochs in {seconds:.1f} s, best validation accuracy "
        f"{best['val_accuracy'] * 100:.2f}% at epoch {best['epoch']}"
    )


def _training_html(data: ReportData) -> str:
    present = {r: rows for r, rows in data.histories.items() if rows}
    if not present:
        return _section("training", "Training curves", _missing("No training history was recorded for this run."))
    lacking = [r for r in ("teacher", "student") if r not in present]
    notes = [_history_summary(r, rows) for r, rows in present.items()]
    notes += [f"{r}: no training history (imported or not trained in this run)" for r in lacking]
    body = _img(plot_training(present), "training curves") + '<ul class="stats">'
    body += "".join(f"<li>{_esc(n)}</li>" for n in notes) + "</ul>"
    return _section("training", "Training curves", body)


def _confusion_html(data: ReportData) -> str:
    teacher = data.evaluation.get("teacher", {})
    final = data.evaluation.get("quantized") or data.evaluation.get("student") or {}
    final_role = "quantized" if "quantized" in data.evaluation else "student"
    if "confusion_matrix" not in teacher and "confusion_matrix" not in final:
        return _section("confusion", "Confusion matrices", _missing("No confusion matrices: nothing was evaluated."))
    n = len(teacher.get("confusion_matrix") or final.get("confusion_matrix"))
    names = _class_names(data, n)
    vs = final.get("vs_teacher") or {}
    png = plot_confusions(
        teacher.get("confusion_matrix"),
        final.get("confusion_matrix"),
        vs.get("pairs"),
        names,
        _role_label(data, final_role),
    )
    body = _img(png, "confusion matrices")
    if vs:
        n_total = sum(map(sum, final["confusion_matrix"]))
        stats = [
            f"teacher and final student agree on {vs['agreement'] * 100:.2f}% of the test set "
            f"({vs['n_disagree']} of {n_total} samples differ)",
            f"of the {vs['n_disagree']} samples where they differ, the student is right on {vs['other_right']}, "
            f"the teacher on {vs['reference_right']}, and neither on {vs['both_wrong']}",
        ]
        body += '<ul class="stats">' + "".join(f"<li>{_esc(s)}</li>" for s in stats) + "</ul>"
    body += (
        '<p class="note">Rows are true classes, columns predicted; colours on a log scale so errors show. '
        "The right panel counts only the samples on which the two models disagree.</p>"
    )
    return _section("confusion", "Confusion matrices", body)


def _tradeoff_html(data: ReportData) -> str:
    if not any("size_bytes" in row for row in data.evaluation.values()):
        return _section("tradeoff", "Accuracy versus size", _missing("No measurements to plot."))
    note = '<p class="note">Red: accuracy floors; purple: size ceilings; green: where a candidate passes both.'
    note += " Grey: the candidates of a sweep and their Pareto front.</p>" if data.pareto else "</p>"
    return _section("tradeoff", "Accuracy versus size", _img(plot_tradeoff(data), "accuracy versus size") + note)


def _gate_html(data: ReportData) -> str:
    if not data.gate:
        return _section("gate", "Gate checks", _missing("The gate did not run."))
    rows = []
    for c in data.gate["checks"]:
        ok = bool(c["passed"])
        rows.append(
            [
                _esc(c["name"]),
                _esc(CHECK_MEANINGS.get(c["name"], "")),
                _esc(f"{float(c['value']):.4g} {c.get('unit', '')}"),
                _esc(OPS.get(c["op"], c["op"])),
                _esc(f"{float(c['threshold']):.4g} {c.get('unit', '')}"),
                f'<span class="verdict-{"pass" if ok else "fail"}">{"PASS" if ok else "FAIL"}</span>',
            ]
        )
    overall = "PASS" if data.gate.get("passed") else "FAIL"
    body = _table(["check", "measures", "value", "op", "threshold", "verdict"], rows, css_class="gate")
    body += f'<p>Overall: <span class="verdict-{overall.lower()}">{overall}</span> (every check must pass)</p>'
    return _section("gate", "Gate checks", body)


def _config_html(data: ReportData) -> str:
    if not data.config:
        return _section("config", "Configuration", _missing("The configuration was not recorded."))
    text = yaml.safe_dump(data.config, sort_keys=False).rstrip()
    body = f"<details><summary>resolved pipeline config</summary><pre>{_esc(text)}</pre></details>"
    return _section("config", "Configuration", body)


def render_html(data: ReportData) -> str:
    """The whole report as one self-contained HTML document (no external resources)."""
    sections = [
        _decision_html(data),
        _models_html(data),
        _training_html(data),
        _confusion_html(data),
        _tradeoff_html(data),
        _gate_html(data),
        _config_html(data),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>kdflow report: {_esc(data.name)}</title><style>{_CSS}</style></head>"
        f"<body><main>{_header_html(data)}{''.join(sections)}</main></body></html>\n"
    )


# ---------------------------------------------------------------- Markdown


def _md(value: Any) -> str:
    """A Markdown table cell: HTML-escaped (the KFP UI renders Markdown as HTML), pipes escaped."""
    return html.escape(str(value), quote=False).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]


def render_markdown(data: ReportData) -> str:
    """A short Markdown summary: decision, models, gate checks, training and agreement."""
    d = decision_of(data)
    out = [f"# Compression report: {_md(data.name)}", "", f"**Decision: {d.verdict}**", ""]
    out += [f"- {_md(line)}" for line in d.lines] + [""]
    roles = _roles(data)
    if roles:
        teacher = data.evaluation.get("teacher", {})
        rows = []
        for role in roles:
            row = data.evaluation[role]
            ratio = "–"
            if teacher.get("size_bytes") and row.get("size_bytes"):
                ratio = f"{teacher['size_bytes'] / row['size_bytes']:.1f}x"
            rows.append(
                [
                    _role_label(data, role),
                    _pct(row.get("accuracy")),
                    _num(row.get("macro_f1")),
                    _bytes(row.get("size_bytes")),
                    ratio,
                    _num(row.get("num_params")),
                    _num(row.get("latency_b1_p50_ms"), 3),
                ]
            )
        out += ["## Models (test split)", ""]
        headers = ["model", "accuracy", "macro-F1", "size", "compression", "parameters", "latency b1 p50 (ms)"]
        out += _md_table(headers, rows)
        out.append("")
        gain = kd_gain_line(data.evaluation)
        if gain:
            out += [f"- {_md(gain)}", ""]
    if data.gate:
        rows = [
            [
                c["name"],
                f"{float(c['value']):.4g} {c.get('unit', '')}",
                OPS.get(c["op"], c["op"]),
                f"{float(c['threshold']):.4g} {c.get('unit', '')}",
                "PASS" if c["passed"] else "FAIL",
            ]
            for c in data.gate["checks"]
        ]
        out += ["## Gate", ""] + _md_table(["check", "value", "op", "threshold", "verdict"], rows) + [""]
    present = {r: rows for r, rows in data.histories.items() if rows}
    if present:
        out += ["## Training", ""] + [f"- {_md(_history_summary(r, rows))}" for r, rows in present.items()] + [""]
    vs = (data.evaluation.get("quantized") or {}).get("vs_teacher")
    if vs:
        out += [
            "## Teacher vs final student",
            "",
            f"- agreement {vs['agreement'] * 100:.2f}% ({vs['n_disagree']} test samples differ): student right "
            f"{vs['other_right']}, teacher right {vs['reference_right']}, both wrong {vs['both_wrong']}",
            "",
        ]
    ids = [f"{k}: `{_md(v)}`" for k, v in data.run.items() if v]
    if ids:
        out += ["## Run", ""] + [f"- {i}" for i in ids] + [""]
    return "\n".join(out)
