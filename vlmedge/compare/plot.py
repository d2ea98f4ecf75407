"""Accuracy against latency, one labelled point per bundle, drawn with Pillow (no plotting library).

x: whole-caption latency p50 (batch 1). y: VQA accuracy when every bundle has it, else caption
BLEU-4 when every bundle has it, else VQA accuracy of the bundles that have it.
"""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 960, 640
LEFT, RIGHT, TOP, BOTTOM = 100, 40, 70, 90  # margins around the plot area
COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _metric(bundles: list[dict]) -> tuple[str, str, bool]:
    """(task, key, as percent) of the y axis."""
    if all(b["vqa"] for b in bundles):
        return "vqa", "accuracy", True
    if all(b["caption"] for b in bundles):
        return "caption", "bleu4", False
    return ("vqa", "accuracy", True) if any(b["vqa"] for b in bundles) else ("caption", "bleu4", False)


def ticks(lo: float, hi: float, bounds: tuple[float, float] = (-math.inf, math.inf),
          n: int = 6) -> tuple[float, float, list[float], int]:
    """An axis range around [lo, hi], padded but within `bounds`, with round tick values:
    (lo, hi, ticks, decimals)."""
    pad = (hi - lo) * 0.12 if hi - lo > 1e-12 else max(abs(lo) * 0.05, 1e-3)
    lo, hi = max(lo - pad, bounds[0]), min(hi + pad, bounds[1])
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(s * mag for s in (1, 2, 2.5, 5, 10) if s * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    values = [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if round(step / mag, 3) == 2.5 else 0)
    return lo, hi, values, decimals


def _overlaps(a, b, gap: float = 3) -> bool:
    return a[0] < b[2] + gap and b[0] < a[2] + gap and a[1] < b[3] + gap and b[1] < a[3] + gap


def _place_label(tb, cx: float, cy: float, taken: list, area) -> tuple[float, float, float, float]:
    """A box for a label of text box `tb` beside the point (cx, cy), clear of `taken` boxes and inside
    `area`: right or left of the point, level with it or further above / below."""
    w, h = tb[2] - tb[0], tb[3] - tb[1]
    fallback = None
    for k in range(0, 12):
        for dy in ((-h / 2,) if k == 0 else (-h / 2 - k * (h + 4), -h / 2 + k * (h + 4))):
            for tx in (cx + 12, cx - 12 - w):
                box = (tx, cy + dy, tx + w, cy + dy + h)
                if box[0] < area[0] + 4 or box[2] > area[2] - 4 or box[1] < area[1] + 4 or box[3] > area[3] - 4:
                    continue
                fallback = fallback or box
                if not any(_overlaps(box, t) for t in taken):
                    return box
    return fallback or (cx + 12, cy - h / 2, cx + 12 + w, cy + h / 2)


def accuracy_latency_plot(report: dict) -> Image.Image:
    bundles = [b for b in report["bundles"] if b["latency_ms"] and b["latency_ms"]["whole"]]
    task, key, percent = _metric(bundles)
    points = [(b["label"], b["latency_ms"]["whole"]["p50"], b[task][key]) for b in bundles if b[task]]
    left_out = [b["label"] for b in report["bundles"] if b["label"] not in {p[0] for p in points}]

    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(img)
    title, label, small = _font(22), _font(18), _font(15)
    x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, TOP, HEIGHT - BOTTOM  # plot area in pixels
    d.text((WIDTH / 2, 24), f"accuracy vs latency ({report['device']}, {report['eval']['spec']})", font=title,
           fill="black", anchor="mm")
    ylabel = "VQA accuracy" if task == "vqa" else "caption BLEU-4"
    d.text((WIDTH / 2, HEIGHT - 22), "whole caption latency, p50 ms (batch 1)", font=label, fill="black", anchor="mm")
    if not points:
        d.rectangle((x0, y0, x1, y1), outline="black", width=2)
        d.text(((x0 + x1) / 2, (y0 + y1) / 2), "no bundle has both latency and accuracy", font=label, fill="black",
               anchor="mm")
        return img

    # latency from zero, so that distances show ratios; accuracy zoomed in, within [0, 1]
    xlo, xhi, xt, xdec = ticks(0.0, max(p[1] for p in points), (0.0, math.inf))
    ylo, yhi, yt, ydec = ticks(min(p[2] for p in points), max(p[2] for p in points), (0.0, 1.0))

    inset = 24  # pixels between the frame and the data range: points on a bound stay off the frame

    def px(x: float) -> float:
        return x0 + inset + (x - xlo) / (xhi - xlo) * (x1 - x0 - 2 * inset)

    def py(y: float) -> float:
        return y1 - inset - (y - ylo) / (yhi - ylo) * (y1 - y0 - 2 * inset)

    grid = (225, 225, 225)
    for v in xt:
        d.line((px(v), y0, px(v), y1), fill=grid)
        d.line((px(v), y1, px(v), y1 + 6), fill="black", width=2)
        d.text((px(v), y1 + 10), f"{v:.{xdec}f}", font=small, fill="black", anchor="mt")
    for v in yt:
        d.line((x0, py(v), x1, py(v)), fill=grid)
        d.line((x0 - 6, py(v), x0, py(v)), fill="black", width=2)
        text = f"{100 * v:.{max(0, ydec - 2)}f}%" if percent else f"{v:.{ydec}f}"
        d.text((x0 - 10, py(v)), text, font=small, fill="black", anchor="rm")
    d.rectangle((x0, y0, x1, y1), outline="black", width=2)

    # the y-axis title, rotated
    bbox = d.textbbox((0, 0), ylabel, font=label)
    side = Image.new("RGB", (bbox[2] - bbox[0] + 8, bbox[3] - bbox[1] + 8), "white")
    ImageDraw.Draw(side).text((4 - bbox[0], 4 - bbox[1]), ylabel, font=label, fill="black")
    side = side.rotate(90, expand=True)
    img.paste(side, (14, int((y0 + y1) / 2 - side.height / 2)))

    # markers first, then each label at the first free place around its marker
    r = 7
    centres = [(px(x), py(y)) for _, x, y in points]
    taken = [(cx - r, cy - r, cx + r, cy + r) for cx, cy in centres]
    for i, ((name, x, y), (cx, cy)) in enumerate(zip(points, centres)):
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[i % len(COLORS)], outline="black")
    for i, ((name, x, y), (cx, cy)) in enumerate(zip(points, centres)):
        text = f"{name} ({x:.1f} ms, {100 * y:.1f}%)" if percent else f"{name} ({x:.1f} ms, {y:.3f})"
        box = _place_label(d.textbbox((0, 0), text, font=small), cx, cy, taken, (x0, y0, x1, y1))
        taken.append(box)
        tb = d.textbbox((0, 0), text, font=small)
        d.text((box[0] - tb[0], box[1] - tb[1]), text, font=small, fill=COLORS[i % len(COLORS)])
    if left_out:
        d.text((x0, HEIGHT - 48), f"not plotted (no {ylabel} or latency): {', '.join(left_out)}", font=small,
               fill=(90, 90, 90))
    return img
