"""The report's plots: training curves, confusion matrices and accuracy versus size.

matplotlib's object API (``Figure`` + Agg canvas) rather than pyplot, so drawing never touches a
global backend or opens a window; every plot comes back as a base64 PNG that the HTML page
inlines, so the file can be mailed, attached or opened from an artifact store on its own.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kd_lib.report.data import ReportData
from kd_lib.report.facts import pareto_front, role_label, size_text, thresholds_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

ROLE_COLORS = {"teacher": "#1f77b4", "student": "#ff7f0e", "quantized": "#2ca02c", "baseline": "#7f7f7f"}


def _figure(width: float, height: float) -> Figure:
    # lazy: matplotlib takes ~0.6 s to import; every step imports the report (through
    # kd_lib.steps) and the text summary needs none of it, so only drawing pays for it.
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def plot_training(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """Loss and validation accuracy per epoch, teacher and student on shared axes.

    Args:
        histories: Role -> per-epoch dicts (epoch, train_loss, val_loss, val_accuracy).

    Returns:
        The figure as a base64 PNG.
    """
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
    # lazy: as in _figure, only drawing imports matplotlib.
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
    """Confusion matrices of the teacher and the final student, and their disagreements.

    Args:
        teacher_cm: The teacher's [num_classes, num_classes] counts (rows true, columns
            predicted), or None to leave its panel out.
        student_cm: The final student's counts, likewise.
        pairs: [num_classes, num_classes] counts of (teacher predicted, student predicted) over
            the samples where the two disagree, or None.
        names: One tick label per class.
        student_label: The final student's name for its panel title.

    Returns:
        The figure as a base64 PNG.
    """
    # (matrix, title, xlabel, ylabel, colour map, log colours); a None matrix drops its panel.
    candidates: list[tuple[list[list[int]] | None, str, str, str, str, bool]] = [
        (teacher_cm, "Teacher", "predicted", "true", "Blues", True),
        (student_cm, student_label[:1].upper() + student_label[1:], "predicted", "true", "Greens", True),
        (pairs, "Where they disagree", "student predicted", "teacher predicted", "Oranges", False),
    ]
    panels = [(m, title, x, y, cmap, log) for m, title, x, y, cmap, log in candidates if m is not None]
    fig = _figure(3.6 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (matrix, title, xlabel, ylabel, cmap, log) in zip(axes, panels, strict=True):
        _heatmap(ax, matrix, names, title, xlabel, ylabel, cmap, log)
    fig.tight_layout()
    return _png(fig)


def plot_tradeoff(data: ReportData) -> str:
    """Accuracy versus artifact size (log), the gate's pass region and thresholds, as a base64 PNG."""
    return _png(tradeoff_figure(data))


def tradeoff_figure(data: ReportData) -> Figure:
    """The figure of ``plot_tradeoff``, undrawn (tests read its lines and limits).

    x is the artifact size in KB (log scale), y the test accuracy in %; each gate threshold is
    a line (accuracy floors horizontal, size ceilings vertical), kept inside the axes.

    Args:
        data: What the report shows; its evaluation, gate (or thresholds) and sweep candidates.

    Returns:
        A matplotlib ``Figure`` with one axes.
    """
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

    # sizes_kb/accs continue with the sweep's candidates after the models: zip stops at the models.
    for (role, row), x, y in zip(points, sizes_kb, accs, strict=False):
        ax.scatter([x], [y], s=90, color=ROLE_COLORS.get(role, "#333333"), edgecolor="black", zorder=3)
        # fp32 and quantized students usually share an accuracy: one label above, one below.
        above = role == "quantized"
        ax.annotate(
            f"{role_label(data, role)}\n{y:.2f}%, {size_text(row['size_bytes'])}",
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
