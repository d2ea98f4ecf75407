"""Rendering an evaluation report as terminal tables and as Markdown."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def print_report(report: dict, console: Console, title: str = "") -> None:
    cap, vqa = report["caption"], report["vqa"]
    t = Table(title=f"{title} captioning, {report['split']} split".strip())
    for col in ("captions", "exact match", "BLEU-4", "CIDEr"):
        t.add_column(col, justify="right")
    t.add_row(str(cap["n"]), _pct(cap["exact_match"]), f"{cap['bleu4']:.4f}", f"{cap['cider']:.3f}")
    console.print(t)

    t = Table(title=f"{title} VQA accuracy, {report['split']} split".strip())
    t.add_column("question type")
    t.add_column("questions", justify="right")
    t.add_column("accuracy", justify="right")
    for qtype, r in vqa["by_type"].items():
        t.add_row(qtype, str(r["n"]), _pct(r["accuracy"]))
    t.add_row("non-relational", str(vqa["non_relational"]["n"]), _pct(vqa["non_relational"]["accuracy"]))
    t.add_row("[b]overall[/b]", str(vqa["n"]), f"[b]{_pct(vqa['accuracy'])}[/b]")
    console.print(t)

    hard = vqa["relational_hard"]
    t = Table(title="relational questions on scenes of 3+ objects (not answerable by elimination)")
    for col in ("objects", "questions", "accuracy", "blind guess"):
        t.add_column(col, justify="right")
    for n, r in hard["by_objects"].items():
        t.add_row(str(n), str(r["n"]), _pct(r["accuracy"]), _pct(r["chance"]))
    t.add_row("[b]3-5[/b]", str(hard["n"]), f"[b]{_pct(hard['accuracy'])}[/b]", _pct(hard["chance"]))
    console.print(t)


def report_markdown(report: dict) -> str:
    cap, vqa, hard = report["caption"], report["vqa"], report["vqa"]["relational_hard"]
    lines = [
        "| captions | exact match | BLEU-4 | CIDEr |", "|---:|---:|---:|---:|",
        f"| {cap['n']} | {_pct(cap['exact_match'])} | {cap['bleu4']:.4f} | {cap['cider']:.3f} |", "",
        "| question type | questions | accuracy |", "|---|---:|---:|",
    ]
    for qtype, r in vqa["by_type"].items():
        lines.append(f"| {qtype} | {r['n']} | {_pct(r['accuracy'])} |")
    lines.append(f"| non-relational | {vqa['non_relational']['n']} | {_pct(vqa['non_relational']['accuracy'])} |")
    lines.append(f"| **overall** | {vqa['n']} | **{_pct(vqa['accuracy'])}** |")
    lines += ["", "| relational, objects in scene | questions | accuracy | blind guess |", "|---:|---:|---:|---:|"]
    for n, r in hard["by_objects"].items():
        lines.append(f"| {n} | {r['n']} | {_pct(r['accuracy'])} | {_pct(r['chance'])} |")
    lines.append(f"| **3-5** | {hard['n']} | **{_pct(hard['accuracy'])}** | {_pct(hard['chance'])} |")
    return "\n".join(lines) + "\n"
