"""The comparison's figure, drawn with matplotlib: one PNG of three panels, one colour per bundle.

- accuracy against latency: one labelled point per bundle; x: whole-caption latency p50 (batch 1), y: VQA
  accuracy when every bundle has it, else caption BLEU-4 when every bundle has it, else VQA accuracy of the
  bundles that have it;
- latency per stage: p50 of preprocess, encoder, first token and per token, one bar per bundle;
- size: the graph files and tokenizer of each bundle, in MB.

matplotlib is optional (the `compare` extra): without it compare writes its reports and says why there is
no plot. The figure is drawn on matplotlib's Agg canvas, without pyplot: no display, and a caller's own
matplotlib backend is left as it was.
"""

from __future__ import annotations

from pathlib import Path

from vlmedge.errors import first_line

PLOT = "plot.png"
PANELS = ("accuracy against latency", "latency per stage", "size")  # the figure's axes, left to right
STAGES = (("preprocess", "preprocess"), ("encoder", "encoder"), ("first_token", "first token"),
          ("per_token", "per token"))
SIZE_INCHES, DPI = (16.0, 5.6), 100


def plot_unavailable() -> str | None:
    """Why compare cannot draw its plot, in one line; None when it can."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        return "no plot: matplotlib is not installed (pip install matplotlib, or vlmedge[compare])"
    except ImportError as e:
        return f"no plot: matplotlib cannot be imported ({first_line(e)})"
    return None


def _metric(bundles: list[dict]) -> tuple[str, str, bool]:
    """(task, key, as percent) of the accuracy axis."""
    if all(b["vqa"] for b in bundles):
        return "vqa", "accuracy", True
    if all(b["caption"] for b in bundles):
        return "caption", "bleu4", False
    return ("vqa", "accuracy", True) if any(b["vqa"] for b in bundles) else ("caption", "bleu4", False)


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _accuracy_latency(ax, bundles: list[dict], colors: dict[str, str]) -> list:
    """Draws the panel; returns the points' labels (to be moved apart once the layout is known)."""
    timed = [b for b in bundles if b["latency_ms"] and b["latency_ms"]["whole"]]
    task, key, percent = _metric(timed)
    points = [(b["label"], b["latency_ms"]["whole"]["p50"], b[task][key]) for b in timed if b[task]]
    ax.set_title(PANELS[0])
    if not points:
        _empty(ax, "no bundle has both latency and accuracy")
        return []
    notes = []
    for label, x, y in points:
        ax.scatter([x], [y], s=60, color=colors[label], edgecolors="black", zorder=3)
        text = f"{label}\n{x:.1f} ms, " + (f"{100 * y:.1f}%" if percent else f"{y:.3f}")
        notes.append(ax.annotate(text, (x, y), xytext=(8, 6), textcoords="offset points", fontsize=8,
                                 color=colors[label], in_layout=False))
    ax.set_xlim(left=0, right=max(p[1] for p in points) * 1.35)  # from zero, so that distances show ratios
    lo, hi = min(p[2] for p in points), max(p[2] for p in points)
    pad = max((hi - lo) * 0.25, 0.02)  # accuracy zoomed in; room above the top point for its label
    ax.set_ylim(max(0.0, lo - pad), hi + 2 * pad)
    ax.set_yticks([t for t in ax.get_yticks() if max(0.0, lo - pad) <= t <= min(1.0, hi + 2 * pad)])
    ax.set_xlabel("whole caption latency, p50 ms (batch 1)")
    ax.set_ylabel("VQA accuracy" if task == "vqa" else "caption BLEU-4")
    if percent:
        from matplotlib.ticker import PercentFormatter

        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.grid(True, color="0.9")
    left_out = [b["label"] for b in bundles if b["label"] not in {p[0] for p in points}]
    if left_out:
        ax.text(0.01, 0.01, f"not plotted: {', '.join(left_out)}", transform=ax.transAxes, fontsize=7, color="0.4")
    return notes


def _unclutter(fig, notes: list) -> None:
    """Moves each label up until it overlaps no label placed before it (points close together)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not notes:
        return
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # the layout, so that extents are where they will be drawn
    renderer = canvas.get_renderer()
    placed = []
    for note in notes:
        box = note.get_window_extent(renderer)
        for _ in range(len(placed) + 1):
            if not any(box.overlaps(other) for other in placed):
                break
            dx, dy = note.xyann
            note.xyann = (dx, dy + (box.height + 2) * 72 / fig.dpi)  # offset points from pixels
            box = note.get_window_extent(renderer)
        placed.append(box)


def _stages(ax, bundles: list[dict], colors: dict[str, str]) -> None:
    timed = [b for b in bundles if b["latency_ms"]]
    ax.set_title(PANELS[1])
    if not timed:
        _empty(ax, "no bundle was timed")
        return
    width = 0.8 / len(timed)
    for i, b in enumerate(timed):
        xs = [s + (i - (len(timed) - 1) / 2) * width for s in range(len(STAGES))]
        ms = [(b["latency_ms"][key] or {"p50": 0.0})["p50"] for key, _ in STAGES]
        bars = ax.bar(xs, ms, width, label=b["label"], color=colors[b["label"]], edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2, rotation=90 if len(timed) > 3 else 0)
    ax.set_xticks(range(len(STAGES)), [name for _, name in STAGES])
    ax.set_ylabel("p50 ms (batch 1)")
    ax.margins(y=0.15)
    ax.grid(True, axis="y", color="0.9")
    ax.set_axisbelow(True)


def _size(ax, bundles: list[dict], colors: dict[str, str]) -> None:
    ax.set_title(PANELS[2])
    labels = [b["label"] for b in bundles]
    bars = ax.bar(range(len(bundles)), [b["size_bytes"] / 1e6 for b in bundles], 0.6,
                  color=[colors[label] for label in labels], edgecolor="black", linewidth=0.5)
    ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(range(len(bundles)), labels, rotation=20 if len(bundles) > 3 else 0, ha="right" if len(bundles) > 3 else "center")
    ax.set_ylabel("MB (graph files and tokenizer)")
    ax.margins(y=0.15)
    ax.grid(True, axis="y", color="0.9")
    ax.set_axisbelow(True)


def comparison_figure(report: dict):
    """The three panels of a comparison report as a matplotlib Figure (not tied to any display)."""
    from matplotlib.figure import Figure

    bundles = report["bundles"]
    palette = [f"C{i}" for i in range(10)]
    colors = {b["label"]: palette[i % len(palette)] for i, b in enumerate(bundles)}
    fig = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    acc, stages, size = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1.3, 0.8]})
    notes = _accuracy_latency(acc, bundles, colors)
    _stages(stages, bundles, colors)
    _size(size, bundles, colors)
    e = report["eval"]
    fig.suptitle(f"{len(bundles)} bundle{'s' if len(bundles) != 1 else ''} on {e['spec']}, device {report['device']}; "
                 f"reference {report['reference']}")
    if stages.get_legend_handles_labels()[0]:
        stages.legend(fontsize=8, loc="upper left")
    _unclutter(fig, notes)
    return fig


def save_plot(report: dict, path: Path) -> None:
    """Write the comparison's figure to `path` as a PNG."""
    comparison_figure(report).savefig(path, format="png", dpi=DPI)
