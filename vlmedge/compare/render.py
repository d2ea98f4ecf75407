"""A comparison report as terminal tables and as Markdown; both show the same columns."""

from __future__ import annotations

from typing import Callable

from rich.console import Console
from rich.table import Table

ABSENT = "absent"  # the bundle lacks a task the reference has
NONE = "-"  # not measured: the evaluation set has no references for it, or not available here


def _task(b: dict, task: str, key: str, fmt: Callable[[float], str]) -> str:
    r = b[task]
    if r is None:
        return ABSENT if task in b["absent_tasks"] else NONE
    return fmt(r[key])


def _pct(x: float | None) -> str:
    return NONE if x is None else f"{100 * x:.1f}%"


def _num(fmt: str) -> Callable[[float | None], str]:
    return lambda x: NONE if x is None else format(x, fmt)


def _agreement(b: dict) -> str:
    a = b["agreement"]
    if a["overall"] is None:
        return ABSENT if b["absent_tasks"] else NONE
    return _pct(a["overall"]) + (f" ({', '.join(t for t in a if t != 'overall')})" if b["absent_tasks"] else "")


def _cosine(b: dict) -> str:
    s = b["graph_summary"]
    return f"non-finite ({s['nonfinite']})" if s["nonfinite"] else _num(".6f")(s["cosine"])


def _ms(stage: str, both: bool = False) -> Callable[[dict], str]:
    def cell(b: dict) -> str:
        lat = b["latency_ms"]
        p = lat and lat[stage]
        if not p:
            return NONE
        text = f"{p['p50']:.1f} / {p['p90']:.1f}" if both else f"{p['p50']:.2f}"
        return text + (" (vqa)" if lat["task"] != "caption" else "")
    return cell


def _size(b: dict) -> str:
    return f"{b['size_bytes'] / 1e6:.1f}"


def _peak(b: dict) -> str:
    peak, before = b["peak_rss_bytes"], b["rss_before_bytes"]
    if peak is None:
        return NONE
    return f"{peak / 1e6:.1f}" + (f" (+{(peak - before) / 1e6:.1f})" if before is not None else "")


def _drift(b: dict, key: str, fmt: str) -> str:
    """The attention drift's `key` over every task, weighted by tokens ("—" without explain graphs)."""
    d = b.get("attention_drift")
    if not d:
        return NONE
    n = sum(t["tokens"] for t in d.values())
    return format(sum(t[key] * t["tokens"] for t in d.values()) / n, fmt)


# (header, cell) of the two main tables; the same in the terminal and in report.md
_BUNDLE = ("bundle", lambda b: b["label"] + (" (ref)" if b["reference"] else ""))
ACCURACY: list[tuple[str, Callable[[dict], str]]] = [
    _BUNDLE,
    ("precision", lambda b: b["precision"]),
    ("caption EM", lambda b: _task(b, "caption", "exact_match", _pct)),
    ("BLEU-4", lambda b: _task(b, "caption", "bleu4", _num(".4f"))),
    ("CIDEr", lambda b: _task(b, "caption", "cider", _num(".3f"))),
    ("VQA acc", lambda b: _task(b, "vqa", "accuracy", _pct)),
    ("agreement", _agreement),
    ("min cos", _cosine),
    ("max err", lambda b: _num(".3g")(b["graph_summary"]["max_abs_error"])),
    ("attn JS", lambda b: _drift(b, "js_divergence", ".2g")),
    ("attn top5", lambda b: _drift(b, "top5_overlap", ".0%")),
]
SPEED: list[tuple[str, Callable[[dict], str]]] = [
    _BUNDLE,
    ("encoder ms", _ms("encoder")),
    ("1st tok ms", _ms("first_token")),
    ("per tok ms", _ms("per_token")),
    ("caption ms p50 / p90", _ms("whole", both=True)),
    ("size MB", _size),
    ("peak MB", _peak),
]
ACCURACY_LEGEND = ("Agreement: captions and answers whose token ids equal the reference's. Min cos, max err: the "
                   "worst graph output against the reference's on the same inputs. Attn JS, top5: each generated "
                   "token's cross-attention over the image (mean of layers and heads), forced along the reference's "
                   "tokens, against the reference's: mean Jensen-Shannon divergence (0: the same map, 1: disjoint) and "
                   "the share of its 5 most attended positions that are the reference's.")
SPEED_LEGEND = ("Latency: batch 1, p50 in ms unless marked p50 / p90. Size: graph files and tokenizer. Peak MB: the "
                "process's resident-set high-water mark while the bundle was loaded and run, and in brackets its rise "
                "over what was resident before (host memory only).")


def _title(report: dict) -> str:
    e = report["eval"]
    n = len(report["bundles"])
    return (f"{n} bundle{'s' if n != 1 else ''} on {e['spec']} ({e['captioned_images']} captions, {e['questions']} "
            f"questions), device {report['device']}; reference {report['reference']}")


def _by_type(report: dict) -> tuple[list[str], list[list[str]]]:
    """Rows of VQA accuracy per question type (types of every bundle, in first-seen order)."""
    bundles = report["bundles"]
    types = list(dict.fromkeys(t for b in bundles if b["vqa"] for t in b["vqa"]["by_type"]))
    rows = []
    for t in types:
        cells = []
        for b in bundles:
            r = b["vqa"] and b["vqa"]["by_type"].get(t)
            cells.append(_pct(r["accuracy"]) if r else ABSENT if "vqa" in b["absent_tasks"] else NONE)
        rows.append([t, str(next(b["vqa"]["by_type"][t]["n"] for b in bundles if b["vqa"] and t in b["vqa"]["by_type"])),
                     *cells])
    return ["question type", "questions", *(b["label"] for b in bundles)], rows


def _graph_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """Per graph and bundle: the worst cosine and max abs error over its outputs."""
    bundles = report["bundles"]
    graphs = list(dict.fromkeys(g for b in bundles for g in b["graphs"]))
    rows = []
    for g in graphs:
        cells = []
        for b in bundles:
            outs = b["graphs"].get(g, {}).get("outputs", {})
            cos = [e["cosine"] for e in outs.values()]
            err = [e["max_abs_error"] for e in outs.values()]
            if not outs:
                cells.append(ABSENT)
            elif None in cos:
                cells.append("non-finite")
            else:
                cells.append(f"{min(cos):.6f} / {max(err):.3g}")
        rows.append([g, *cells])
    return ["graph (min cosine / max abs err)", *(b["label"] for b in bundles)], rows


def _rich_table(title: str, head: list[str], rows: list[list[str]], caption: str = "", left: int = 1) -> Table:
    """A table whose first `left` columns are text, the others numbers."""
    t = Table(title=title, caption=caption or None, caption_justify="left")
    for i, h in enumerate(head):
        t.add_column(h, justify="left" if i < left else "right", no_wrap=i == 0)
    for r in rows:
        t.add_row(*r)
    return t


def print_comparison(report: dict, console: Console) -> None:
    bundles = report["bundles"]
    for title, cols, legend, left in ((_title(report), ACCURACY, ACCURACY_LEGEND, 2),
                                      ("latency, size and memory", SPEED, SPEED_LEGEND, 1)):
        console.print(_rich_table(title, [h for h, _ in cols], [[cell(b) for _, cell in cols] for b in bundles],
                                  legend, left))
    head, rows = _by_type(report)
    if rows:
        console.print(_rich_table("VQA accuracy by question type", head, rows))


def _md_table(head: list[str], rows: list[list[str]], left: int = 1) -> list[str]:
    esc = lambda s: s.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |",
             "|" + "|".join("---" if i < left else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return lines + [""]


def comparison_markdown(report: dict, no_plot: str | None = None) -> str:
    """report.md: the tables, and the plot beside it (or `no_plot`, the line saying why there is none)."""
    from vlmedge.compare.plot import PANELS, PLOT

    bundles = report["bundles"]
    lines = ["# Bundle comparison", "", _title(report) + ".", ""]
    lines += [f"No plot: {no_plot.removeprefix('no plot: ')}." if no_plot else f"![{', '.join(PANELS)}]({PLOT})", ""]
    for cols, legend, left in ((ACCURACY, ACCURACY_LEGEND, 2), (SPEED, SPEED_LEGEND, 1)):
        lines += _md_table([h for h, _ in cols], [[cell(b) for _, cell in cols] for b in bundles], left)
        lines += [legend, ""]
    head, rows = _by_type(report)
    if rows:
        lines += ["## VQA accuracy by question type", ""] + _md_table(head, rows)
    head, rows = _graph_rows(report)
    if rows:
        s = report["graph_samples"]
        lines += ["## Graph outputs against the reference", "",
                  f"Inputs recorded from the reference bundle on {s['items']} images / questions per task "
                  f"(decoder steps {', '.join(map(str, s['steps']))}); worst output of each graph.", ""]
        lines += _md_table(head, rows)
    lines += ["## Bundles", ""]
    runs = next((b["latency_ms"]["runs"] for b in bundles if b["latency_ms"]), 0)
    lines += _md_table(["bundle", "path", "backend", "tasks", "latency task", "mean tokens"],
                       [[b["label"], f"`{b['path']}`", b["backend"], ", ".join(b["tasks"]),
                         b["latency_ms"]["task"] if b["latency_ms"] else NONE,
                         f"{b['latency_ms']['mean_tokens']:.1f}" if b["latency_ms"] else NONE] for b in bundles],
                       left=5)
    lines += [f"Latency over {runs} calls per bundle after warm-up.", ""]
    return "\n".join(lines)
