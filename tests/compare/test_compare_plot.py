"""The comparison's figure at 2 and at 6 bundles: short labels, and no text overlapping another or
leaving the figure (measured with matplotlib's own renderer on synthetic report entries)."""

import pytest

pytest.importorskip("matplotlib")
from matplotlib.text import Text  # noqa: E402

from vlmedge.compare.plot import PANELS, comparison_figure, save_plot, short_labels  # noqa: E402

# (folder, precision as the manifest records it, whole ms, VQA accuracy, size MB): the 6 bundles sit close
# together on the scatter (two pairs almost on one point) and the sizes span 30x, as variants of one model do
VARIANTS = [
    ("smolvlm-256m-instruct-fp32-portable", {"dtype": "float32", "method": "export"}, 1412.0, 0.874, 1029.4),
    ("smolvlm-256m-instruct-fp16-cast", {"dtype": "float16", "method": "cast"}, 1398.0, 0.872, 515.2),
    ("smolvlm-256m-instruct-int8-minmax", {"dtype": "int8", "method": "minmax"}, 1180.5, 0.861, 262.1),
    ("smolvlm-256m-instruct-int8-entropy", {"dtype": "int8", "method": "entropy"}, 1179.8, 0.862, 262.1),
    ("smolvlm-256m-instruct-int4-wo", {"dtype": "int4-wo", "method": "gptq", "bits": 4}, 655.0, 0.870, 575.3),
    ("smolvlm-256m-instruct-int4-wo-again", {"dtype": "int4-wo", "method": "gptq", "bits": 4}, 652.0, 0.870, 33.0),
]


def _entry(i: int, folder: str, precision: dict, whole: float, vqa: float, mb: float) -> dict:
    def p(ms: float) -> dict:
        return {"p50": ms, "p90": ms * 1.1}

    return {
        "label": folder, "path": f"/bundles/{folder}", "reference": i == 0, "precision": precision["dtype"],
        "precision_details": precision, "caption": {"bleu4": 0.9 - 0.01 * i, "exact_match": 0.8, "cider": 5.0},
        "vqa": {"accuracy": vqa, "by_type": {}}, "size_bytes": int(mb * 1e6),
        "attention_drift": None if i == 0 else {"caption": {"tokens": 300, "js_divergence": 0.004 * i, "top5_overlap": 1 - 0.03 * i},
                                                "vqa": {"tokens": 60, "js_divergence": 0.01 * i, "top5_overlap": 0.9}},
        "latency_ms": {"task": "caption", "runs": 5, "batch": 1, "mean_tokens": 20.0,
                       # the encoder towers over the per-token bar, as on a real model
                       "preprocess": p(4.2), "encoder": p(whole * 0.55), "first_token": p(whole * 0.1),
                       "per_token": p(whole * 0.016), "whole": p(whole)},
    }


def _report(n: int) -> dict:
    bundles = [_entry(i, *v) for i, v in enumerate(VARIANTS[:n])]
    return {"reference": bundles[0]["label"], "device": "cpu", "bundles": bundles,
            "eval": {"spec": "synthetic:500", "images": 500, "captioned_images": 500, "questions": 2500}}


def _texts(fig, renderer) -> dict[str, list]:
    """Every drawn, non-empty text of the figure, by the axes it belongs to ('figure': title and key)."""
    groups: dict[str, list] = {}
    for ax in fig.axes:
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis, lo_hi in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = sorted(lo_hi)
            texts += [t for tick, t in zip(axis.get_majorticklocs(), axis.get_ticklabels()) if lo <= tick <= hi]
        groups[ax.get_title()] = texts
    groups["figure"] = [fig._suptitle, *(t for legend in fig.legends for t in legend.get_texts())]
    return {k: [t for t in v if t is not None and t.get_visible() and t.get_text()] for k, v in groups.items()}


@pytest.mark.parametrize("n", [2, 6])
def test_no_text_overlaps_another_or_leaves_the_figure(n, tmp_path):
    fig = comparison_figure(_report(n))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    page = fig.bbox
    groups = _texts(fig, renderer)
    everything = []
    for group, texts in groups.items():
        boxes = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in texts]  # a label without its line
        everything += boxes
        for text, box in boxes:
            assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, \
                f"{group}: {text!r} leaves the figure"
    for i, (a, box_a) in enumerate(everything):  # within each axes, and across them
        for b, box_b in everything[i + 1:]:
            assert not box_a.overlaps(box_b), f"{a!r} overlaps {b!r}"
    save_plot(_report(n), tmp_path / "plot.png")  # and it saves


@pytest.mark.parametrize("n", [2, 6])
def test_values_and_point_labels_stay_inside_their_panels(n):
    fig = comparison_figure(_report(n))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    acc, stages, size = fig.axes
    for ax in fig.axes:
        inside = ax.get_window_extent(renderer)
        for t in ax.texts:  # bar values (the tallest bar's too) and the points' labels
            box = Text.get_window_extent(t, renderer)
            assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, \
                f"{ax.get_title()}: {t.get_text()!r} outside the panel"
    bundles = _report(n)["bundles"]
    assert len(stages.texts) == 4 * n and len(size.texts) == n  # every bar has its value
    assert [t.get_text() for t in size.texts] == [f"{b['size_bytes'] / 1e6:.1f}" for b in bundles]
    inside = acc.get_window_extent(renderer)
    for t in acc.texts:  # no point under a label
        for x, y in [c.get_offsets()[0] for c in acc.collections]:
            px, py = acc.transData.transform((x, y))
            assert not Text.get_window_extent(t, renderer).contains(px, py), t.get_text()
        assert inside.contains(*acc.transData.transform(t.xy))


def test_bundles_are_named_by_precision_and_method():
    bundles = _report(6)["bundles"]
    assert short_labels(bundles) == ["fp32", "fp16", "int8 minmax", "int8 entropy", "int4-wo gptq (1)",
                                     "int4-wo gptq (2)"]
    fig = comparison_figure(_report(6))
    acc, _, size = fig.axes
    assert [ax.get_title() for ax in fig.axes] == list(PANELS)
    assert [t.get_text().splitlines()[0] for t in acc.texts] == short_labels(bundles)
    assert [t.get_text() for t in size.get_xticklabels()] == [s.replace(" ", "\n", 1) for s in short_labels(bundles)]
    key = [t.get_text() for t in fig.legends[0].get_texts()]
    assert key[0] == "fp32: smolvlm-256m-instruct-fp32-portable (reference)"
    assert key[3] == "int8 entropy: smolvlm-256m-instruct-int8-entropy, attention drift JS 0.015, top-5 91%"


def test_a_bundle_without_precision_details_is_named_by_its_dtype():
    assert short_labels([{"precision": "float16"}, {"precision": "int8-wo"}]) == ["fp16", "int8-wo"]
