"""The comparison's figure, drawn with matplotlib: one PNG of three panels, one colour per bundle.

- accuracy against latency: one point per bundle; x: whole-caption latency p50 (batch 1), y: VQA
  accuracy when every bundle has it, else caption BLEU-4 when every bundle has it, else VQA accuracy of the
  bundles that have it;
- latency per stage: p50 of preprocess, encoder, first token and per token, one bar per bundle;
- size: the graph files and tokenizer of each bundle, in MB.

Bundles are named in the figure by a short label, their precision and method ("fp32", "fp16", "int8
minmax", "int4-wo gptq"; numbered where two share one); one key under the panels ties each colour and
short label to the bundle's own label, and gives each variant's attention drift against the reference
where the bundles have explain graphs (Jensen-Shannon divergence, top-5 overlap). Layout policy, so that no text overlaps another or leaves the
figure at any number of bundles: the key sits outside the panels; the points' labels stand in a column at
the right of their panel, each as near its point's height as the others allow, joined to it by a line;
value labels on bars get headroom measured from their drawn size, and turn upright when side by side they
would touch; the size panel's tick labels break precision and method onto two lines, and slant when even
that is too wide.

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
_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
_NO_METHOD = ("export", "cast", "fp16")  # methods that add nothing to the precision's name
_KEY_CHARS = 40  # a bundle's own label in the key, at most (folder names can be long)


def plot_unavailable() -> str | None:
    """Why compare cannot draw its plot, in one line; None when it can."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        return "no plot: matplotlib is not installed (pip install matplotlib, or vlmedge[compare])"
    except ImportError as e:
        return f"no plot: matplotlib cannot be imported ({first_line(e)})"
    return None


def short_labels(bundles: list[dict]) -> list[str]:
    """Each bundle's precision and method, as the manifest records them ("int8 minmax"); numbered
    "(1)", "(2)" where bundles share one."""
    names = []
    for b in bundles:
        p = b.get("precision_details") or {"dtype": b.get("precision", "?")}
        name = _DTYPES.get(p.get("dtype", "?"), p.get("dtype", "?"))
        method = p.get("method")
        names.append(f"{name} {method}" if method and method not in _NO_METHOD else name)
    return [n if names.count(n) == 1 else f"{n} ({names[:i + 1].count(n)})" for i, n in enumerate(names)]


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


def _accuracy_latency(ax, bundles: list[dict], short: dict[str, str], colors: dict[str, str]) -> list:
    """Draws the panel; returns the points' labels, to be stacked by `_stack_notes` once the layout is known."""
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
        text = f"{short[label]}\n{x:.1f} ms, " + (f"{100 * y:.1f}%" if percent else f"{y:.3f}")
        notes.append(ax.annotate(text, (x, y), xytext=(1.0, 0.5), textcoords="axes fraction", fontsize=8,
                                 ha="left", va="center", color=colors[label], in_layout=False,
                                 arrowprops={"arrowstyle": "-", "color": colors[label], "lw": 0.6,
                                             "shrinkA": 2, "shrinkB": 5}))
    lo, hi = min(p[2] for p in points), max(p[2] for p in points)
    pad = max((hi - lo) * 0.15, 0.02)  # accuracy zoomed in
    ax.set_ylim(max(0.0, lo - pad), hi + pad)
    ax.set_yticks([t for t in ax.get_yticks() if max(0.0, lo - pad) <= t <= min(1.0, hi + pad)])
    ax.set_xlabel("whole caption latency, p50 ms (batch 1)")
    ax.set_ylabel("VQA accuracy" if task == "vqa" else "caption BLEU-4")
    if percent:
        from matplotlib.ticker import PercentFormatter

        ticks = ax.get_yticks()
        step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
        decimals = 0 if step >= 0.01 else 1 if step >= 0.001 else 2  # no two ticks read alike
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=decimals))
    ax.grid(True, color="0.9")
    left_out = [short[b["label"]] for b in bundles if b["label"] not in {p[0] for p in points}]
    if left_out:
        ax.text(0.01, 0.01, f"not plotted: {', '.join(left_out)}", transform=ax.transAxes, fontsize=7, color="0.4")
    return notes


def _stack_notes(ax, notes: list, renderer) -> None:
    """The points' labels in one column at the right of the panel, top to bottom in the order of their
    points' heights, each as near its point's height as the labels above and below allow (1-D packing:
    a pass down pushing each label under the one above, a pass up lifting them off the bottom). The
    x-axis ends where the column begins, so that no point lies under a label."""
    if not notes:
        return
    from matplotlib.text import Text

    box = ax.get_window_extent(renderer)
    gap, margin = 4 / box.height, 4 / box.height  # axes fraction
    texts = [Text.get_window_extent(n, renderer) for n in notes]  # the text alone, without its line
    heights = [t.height / box.height for t in texts]
    width = max(t.width for t in texts) / box.width
    left = 1.0 - width - 6 / box.width  # the column's left edge, in axes fraction
    xs = [n.xy[0] for n in notes]
    ax.set_xlim(0, (max(xs) or 1.0) / max(left - 0.08, 0.2))  # from zero, so that distances show ratios
    to_axes = ax.transData + ax.transAxes.inverted()
    want = [to_axes.transform(n.xy)[1] for n in notes]
    order = sorted(range(len(notes)), key=lambda i: -want[i])
    ys: dict[int, float] = {}
    above = None
    for i in order:  # down: under the label above, and under the top edge
        top = 1.0 - margin if above is None else ys[above] - heights[above] / 2 - gap
        ys[i] = min(want[i], top - heights[i] / 2)
        above = i
    below = None
    for i in reversed(order):  # up: over the label below, and over the bottom edge
        floor = margin if below is None else ys[below] + heights[below] / 2 + gap
        ys[i] = max(ys[i], floor + heights[i] / 2)
        below = i
    for i, n in enumerate(notes):
        n.xyann = (left, ys[i])


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
        bars = ax.bar(xs, ms, width, color=colors[b["label"]], edgecolor="black", linewidth=0.5)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(range(len(STAGES)), [name for _, name in STAGES])
    ax.set_ylabel("p50 ms (batch 1)")
    ax.grid(True, axis="y", color="0.9")
    ax.set_axisbelow(True)


def _size(ax, bundles: list[dict], short: dict[str, str], colors: dict[str, str]) -> None:
    ax.set_title(PANELS[2])
    labels = [b["label"] for b in bundles]
    bars = ax.bar(range(len(bundles)), [b["size_bytes"] / 1e6 for b in bundles], 0.6,
                  color=[colors[label] for label in labels], edgecolor="black", linewidth=0.5)
    ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_xticks(range(len(bundles)), [short[label].replace(" ", "\n", 1) for label in labels], fontsize=9)
    ax.set_ylabel("MB (graph files and tokenizer)")
    ax.grid(True, axis="y", color="0.9")
    ax.set_axisbelow(True)


def _touching(texts: list, renderer) -> bool:
    boxes = [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def _bar_values(ax, renderer) -> bool:
    """Value labels of a bar panel: upright when side by side they touch; the y-axis from zero to the
    tallest bar plus its label's height and a margin. Returns whether the layout changed."""
    values = list(ax.texts)
    if not values or not ax.patches:
        return False
    changed = False
    if _touching(values, renderer):
        for t in values:
            t.set_rotation(90)
        changed = True
    box = ax.get_window_extent(renderer)
    pad = 2 * ax.figure.dpi / 72  # bar_label's padding, 2 pt, in pixels
    label = max(t.get_window_extent(renderer).height for t in values) + pad
    room = (label + 8) / box.height  # axes fraction the tallest bar's label needs above it, with a margin
    top = max(p.get_height() for p in ax.patches) / max(1.0 - room, 0.5)
    ax.set_ylim(0, top or 1.0)
    return changed


def _ticks_fit(ax, renderer) -> None:
    """Slants the x tick labels when even on two lines they touch."""
    if _touching(ax.get_xticklabels(), renderer):
        for t in ax.get_xticklabels():
            t.set_rotation(30)
            t.set_horizontalalignment("right")
            t.set_rotation_mode("anchor")


def _drift(b: dict) -> str:
    """", attention drift JS 0.012, top-5 94%": the bundle's attention against the reference's, over every task."""
    d = b.get("attention_drift")
    if not d:
        return ""
    n = sum(t["tokens"] for t in d.values())
    js = sum(t["js_divergence"] * t["tokens"] for t in d.values()) / n
    top = sum(t["top5_overlap"] * t["tokens"] for t in d.values()) / n
    return f", attention drift JS {js:.2g}, top-5 {top:.0%}"


def _key(fig, bundles: list[dict], short: dict[str, str], colors: dict[str, str]) -> None:
    """One key under the panels: colour, short label, and the bundle's own label."""
    from matplotlib.patches import Patch

    def own(label: str) -> str:
        return label if len(label) <= _KEY_CHARS else label[:_KEY_CHARS - 1] + "…"

    handles = [Patch(facecolor=colors[b["label"]], edgecolor="black", linewidth=0.5) for b in bundles]
    texts = [f"{short[b['label']]}: {own(b['label'])}" + (" (reference)" if b.get("reference") else _drift(b))
             for b in bundles]
    fig.legend(handles, texts, loc="outside lower center", ncols=min(len(bundles), 3), fontsize=8, frameon=False)


def comparison_figure(report: dict):
    """The three panels of a comparison report as a matplotlib Figure (not tied to any display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bundles = report["bundles"]
    palette = [f"C{i}" for i in range(10)]
    colors = {b["label"]: palette[i % len(palette)] for i, b in enumerate(bundles)}
    short = dict(zip((b["label"] for b in bundles), short_labels(bundles)))
    fig = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    acc, stages, size = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1.3, 0.8]})
    notes = _accuracy_latency(acc, bundles, short, colors)
    _stages(stages, bundles, colors)
    _size(size, bundles, short, colors)
    e = report["eval"]
    fig.suptitle(f"{len(bundles)} bundle{'s' if len(bundles) != 1 else ''} on {e['spec']}, device {report['device']}; "
                 f"reference {short.get(report['reference'], report['reference'])}")
    _key(fig, bundles, short, colors)

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # the layout, so that what follows measures text where it will be drawn
    renderer = canvas.get_renderer()
    _ticks_fit(size, renderer)
    if any([_bar_values(stages, renderer), _bar_values(size, renderer)]):
        canvas.draw()  # rotated values: measure the headroom again
        _bar_values(stages, renderer)
        _bar_values(size, renderer)
    canvas.draw()
    _stack_notes(acc, notes, renderer)
    return fig


def save_plot(report: dict, path: Path) -> None:
    """Write the comparison's figure to `path` as a PNG."""
    comparison_figure(report).savefig(path, format="png", dpi=DPI)
