"""Image embeddings per second of a CLIP ViT-B/32-shaped dual encoder (random weights) on the CPU, batch 1
and batch 32: a vlmedge bundle against the model's own PyTorch and against Optimum on ONNX Runtime.

What a user of `vlmedge index` or `pipe.embed_images` waits for is the image tower: pixels in, a
projected, L2-normalised embedding out. Three contenders take turns in every round (the order rotated
per round, a short pause after each), on the same pixel values, 2 threads each (--threads):

1. vlmedge: the bundle from `vlmedge export MODEL_DIR --out BUNDLE --max-batch 32` (32 so that batch 32 is
   one graph call), opened with `vlmedge.load(BUNDLE, threads=2, batch_size=32)`. Timed twice:
   - graph: `pipe.backend.run("image_encoder", {"pixel_values": px})`, the same pixel values in and
     embeddings out as the other two; **the ratios use this one**;
   - embed_images: `pipe.embed_images(images)` on the scene images, vlmedge's preprocessing included,
     which is what a user calls; the difference is vlmedge's preprocessing, reported per image.
2. HF PyTorch: `CLIPModel.get_image_features(pixel_values)`, L2-normalised as the bundle's image_embeds
   are, under torch.inference_mode with torch.set_num_threads(2).
3. Optimum: optimum-onnx pins transformers < 4.58, so it lives in a venv of its own (--optimum-python,
   default /work/optvenv/bin/python) and runs as a worker subprocess of this script, as in
   benchmarks/vs_optimum.py. It exports the same saved model directory once (cached beside it) with
   `ORTModelForZeroShotImageClassification.from_pretrained(..., export=True)`: Optimum's CLIP export
   (task zero-shot-image-classification, the same graph as feature-extraction) is the whole CLIPModel,
   text tower included, and it requires input_ids. Optimum's only vision-only CLIP export
   (`clip_vision_model`) is for CLIPVisionModel and outputs `pooler_output` without the projection,
   which is not an image embedding, so it is not used. Optimum is therefore fed the smallest text
   there is: one text of 2 tokens ("" -> start and end token), so its graph also runs the text tower
   once per call; what that costs is estimated in every round with the bundle's text_encoder on the
   same 2 ids, and printed. Pixel values are handed over as .npy files; one ORT session with 2
   intra-op threads. The venv, if missing (the torch wheel is the CPU build the project's venv has):
     python3.11 -m venv /work/optvenv && /work/optvenv/bin/pip install TORCH_CPU_WHEEL \
         optimum-onnx==0.1.0 optimum==2.1.0 transformers==4.57.6 onnxruntime==1.32.0

Batch 1 is timed over --b1-calls back-to-back calls per turn, batch 32 over one call; images per second
per turn, medians over --rounds rounds after one warm-up round. The warm-up round also collects every
contender's embeddings of the same pixel values, and their largest absolute difference is checked
against 1e-4.

The model (CLIP ViT-B/32 shapes: vision 768 wide, 12 layers, 12 heads, 32 px patches at 224; text 512
wide, 12 layers, 8 heads, 77 positions; projection 512; quick_gelu) has random weights
(torch.manual_seed(0)) and the byte-level BPE tokenizer that tests/encoders/tiny.py trains offline (a
vocabulary of a few hundred tokens instead of 49,408: the text tower's embedding table is smaller,
the image tower is untouched). It, the bundle and Optimum's export are cached in --work (about 1.5 GB;
delete to rebuild). The first run builds and exports them (about 2 minutes on 2 cores); the default 20
rounds then take about 2-3 minutes on an idle 2-core machine (4-5 minutes in all on a first run).

Run:  .venv/bin/python benchmarks/encoder_throughput.py [--rounds 20] [--threads 2] [--work DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from json_worker import JsonWorker  # (benchmarks/, this script's folder)

ROOT = Path(__file__).resolve().parent.parent
BATCHES = (1, 32)
TOLERANCE = 1e-4  # max abs difference between any two contenders' normalised embeddings
MIN_TEXT = ""  # the smallest text Optimum's CLIP graph can be fed: start and end token only


# -- the Optimum side (runs in its own venv; imports nothing from vlmedge) ------------------------------


def worker(model_dir: Path, export_dir: Path, threads: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from optimum.onnxruntime import ORTModelForZeroShotImageClassification

    if not (export_dir / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=f".{export_dir.name}.tmp-", dir=export_dir.parent))
        try:
            ORTModelForZeroShotImageClassification.from_pretrained(str(model_dir), export=True).save_pretrained(str(tmp))
            tmp.chmod(0o755)
            os.replace(tmp, export_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    import onnxruntime

    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = threads
    model = ORTModelForZeroShotImageClassification.from_pretrained(str(export_dir), session_options=so,
                                                                   provider="CPUExecutionProvider")
    from importlib.metadata import version

    import transformers

    print(json.dumps({"ready": True, "optimum_onnx": version("optimum-onnx"), "optimum": version("optimum"),
                      "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
                      "torch": torch.__version__, "class": type(model).__name__,
                      "inputs": [i.name for i in model.session.get_inputs()],
                      "outputs": [o.name for o in model.session.get_outputs()],
                      "io_binding": bool(model.use_io_binding)}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        px = torch.from_numpy(np.load(req["pixel_values"]))
        ids = torch.tensor(req["input_ids"], dtype=torch.int64)
        mask = torch.tensor(req["attention_mask"], dtype=torch.int64)
        seconds = []
        for _ in range(req["calls"]):
            t0 = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, pixel_values=px)
            seconds.append(time.perf_counter() - t0)
        if req.get("embeds"):
            np.save(req["embeds"], np.asarray(out.image_embeds, dtype=np.float32))
        print(json.dumps({"seconds": seconds}), flush=True)


class OptimumSide(JsonWorker):
    def __init__(self, python: str, model_dir: Path, export_dir: Path, threads: int):
        super().__init__([python, str(Path(__file__).resolve()), "--worker", str(model_dir), str(export_dir), str(threads)],
                         cwd=tempfile.gettempdir())

    def run(self, pixel_file: Path, ids, mask, calls: int, embeds: Path | None = None) -> list[float]:
        return self.ask({"pixel_values": str(pixel_file), "input_ids": ids.tolist(), "attention_mask": mask.tolist(),
                         "calls": calls, "embeds": str(embeds) if embeds else None})["seconds"]


# -- the model and its bundle ---------------------------------------------------------------------------


def build_clip(out: Path, log) -> None:
    """CLIP ViT-B/32's shapes with random weights, the offline tokenizer of tests/encoders/tiny.py and
    CLIP's image processor at 224, as a save_pretrained directory (written aside, then moved in place)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel

    sys.path.insert(0, str(ROOT / "tests" / "encoders"))
    from tiny import clip_tokenizer

    log(f"building the random CLIP ViT-B/32-shaped model in {out}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        V = len(clip_tokenizer(tmp))
        cfg = CLIPConfig(
            text_config=dict(vocab_size=V, hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                             max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=V - 2, eos_token_id=2, pad_token_id=1),
            vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                               image_size=224, patch_size=32, hidden_act="quick_gelu"),
            projection_dim=512, logit_scale_init_value=2.6592,
        )
        torch.manual_seed(0)
        CLIPModel(cfg).eval().save_pretrained(tmp)
        CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}).save_pretrained(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export_bundle(model_dir: Path, bundle: Path, max_batch: int, log) -> float:
    """`vlmedge export` as a user runs it (it validates the bundle against PyTorch and writes it atomically)."""
    cli = Path(sys.executable).parent / "vlmedge"
    cmd = [str(cli), "export", str(model_dir), "--out", str(bundle), "--max-batch", str(max_batch)]
    log("exporting with vlmedge: " + " ".join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    seconds = time.perf_counter() - t0
    log(f"  exported in {seconds:.0f} s")
    return seconds


# -- the main side ----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work", help="cache of the model, bundle and Optimum export")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds after the warm-up round")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of every contender")
    ap.add_argument("--b1-calls", type=int, default=8, help="back-to-back batch-1 calls per turn")
    ap.add_argument("--optimum-python", default="/work/optvenv/bin/python")
    ap.add_argument("--json", type=Path, help="write medians, raw rounds, agreement and versions here")
    ap.add_argument("--variant", type=Path, action="append", default=[],
                    help="a variant of the bundle (vlmedge quantize ... --precision int8) timed beside it, its graph "
                         "call like the bundle's; reported with its cosine to FP32, outside the 1e-4 agreement")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or args.b1_calls < 1:
        sys.exit("--rounds, --threads and --b1-calls must be 1 or more")
    if not Path(args.optimum_python).is_file():
        sys.exit(f"{args.optimum_python}: no such Python; make Optimum's venv as this script's docstring says, or pass --optimum-python")
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import numpy as np
    import onnxruntime
    import runtime_latency as rl
    import torch
    import transformers

    import vlmedge
    from vlmedge.data.scenes import scenes

    log, median = rl.log, rl.median
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / "clip-vit-b32-random"
    if not (model_dir / "config.json").is_file():
        build_clip(model_dir, log)
    bundle = args.work / f"clip-vit-b32-random-bundle-v{vlmedge.__version__}"
    export_s = None
    if not (bundle / "manifest.json").is_file():
        export_s = export_bundle(model_dir, bundle, max(BATCHES), log)

    pipe = vlmedge.load(str(bundle), threads=args.threads, shared_threads=True, batch_size=max(BATCHES))
    if pipe.manifest.axes["batch"].max < max(BATCHES):
        sys.exit(f"{bundle}: its batch axis ends at {pipe.manifest.axes['batch'].max}; delete it to export again with --max-batch {max(BATCHES)}")
    hf = transformers.CLIPModel.from_pretrained(str(model_dir)).eval()

    log("starting the Optimum worker (exports the model with Optimum on its first run)")
    opt = OptimumSide(args.optimum_python, model_dir, args.work / "clip-vit-b32-random-optimum", args.threads)
    log(f"Optimum worker ready: {opt.info}")

    tmp = Path(tempfile.mkdtemp(prefix="encoder-throughput-"))
    images = {b: [s.image for s in scenes("test", 0, b)] for b in BATCHES}
    px = {b: pipe.pixel_values(images[b]) for b in BATCHES}  # vlmedge's preprocessing, the input all three get
    px_file = {}
    for b in BATCHES:
        px_file[b] = tmp / f"px{b}.npy"
        np.save(px_file[b], px[b])
    ids, mask = pipe.text_ids([MIN_TEXT])  # (1, 2): start and end token

    def hf_embed(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            e = hf.get_image_features(pixel_values=torch.from_numpy(x))
            e = getattr(e, "pooler_output", e)  # transformers 5: an output whose pooler_output is projected; 4.x: the tensor
            return (e / e.pow(2).sum(-1, keepdim=True).sqrt()).numpy()

    def graph(x: np.ndarray) -> np.ndarray:
        return pipe.backend.run("image_encoder", {"pixel_values": x})["image_embeds"]

    def timed(fn, arg, calls: int) -> tuple[float, np.ndarray]:
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(arg)
        return time.perf_counter() - t0, np.array(out, dtype=np.float32)

    names = ("vlmedge graph", "vlmedge embed_images", "HF PyTorch", "Optimum")
    ips: dict[str, dict[int, list[float]]] = {n: {b: [] for b in BATCHES} for n in names}  # images per second, per round
    embeds: dict[str, dict[int, np.ndarray]] = {n: {} for n in names}

    def turn_vlmedge(b: int, calls: int, record: bool) -> None:
        s, e = timed(graph, px[b], calls)
        s2, e2 = timed(pipe.embed_images, images[b], calls)
        for name, sec, emb in (("vlmedge graph", s, e), ("vlmedge embed_images", s2, e2)):
            if record:
                ips[name][b].append(b * calls / sec)
            embeds[name].setdefault(b, emb)

    def turn_hf(b: int, calls: int, record: bool) -> None:
        s, e = timed(hf_embed, px[b], calls)
        if record:
            ips["HF PyTorch"][b].append(b * calls / s)
        embeds["HF PyTorch"].setdefault(b, e)

    def turn_optimum(b: int, calls: int, record: bool) -> None:
        out = tmp / f"optimum{b}.npy" if b not in embeds["Optimum"] else None
        seconds = opt.run(px_file[b], ids, mask, calls, out)
        if record:
            ips["Optimum"][b].append(b * calls / sum(seconds))
        if out:
            embeds["Optimum"][b] = np.load(out)

    text_feeds = {"input_ids": ids, "attention_mask": mask}
    text_tower: list[float] = []  # per round: the text tower Optimum's graph also runs, as the bundle's text_encoder

    def turn_text(record: bool) -> None:
        seconds = []
        for _ in range(5):
            t0 = time.perf_counter()
            pipe.backend.run("text_encoder", text_feeds)
            seconds.append(time.perf_counter() - t0)
        if record:
            text_tower.append(median(seconds))

    variants = {f"vlmedge {vlmedge.load(str(v)).manifest.precision.get('dtype')} ({v.name})":
                vlmedge.load(str(v), threads=args.threads, shared_threads=True, batch_size=max(BATCHES)) for v in args.variant}
    for vname in variants:
        ips[vname], embeds[vname] = {b: [] for b in BATCHES}, {}

    def turn_variants(b: int, calls: int, record: bool) -> None:
        for vname, vpipe in variants.items():
            s, e = timed(lambda x: vpipe.backend.run("image_encoder", {"pixel_values": x})["image_embeds"], px[b], calls)
            if record:
                ips[vname][b].append(b * calls / s)
            embeds[vname].setdefault(b, e)

    turns = {"vlmedge": turn_vlmedge, "hf": turn_hf, "optimum": turn_optimum}
    if variants:
        turns["variants"] = turn_variants
    order = list(turns)
    busy_start = rl.busy_elsewhere()
    t_start = time.perf_counter()
    for r in range(args.rounds + 1):  # round 0 is the warm-up
        k = r % len(order)
        this = order[k:] + order[:k]
        for name in this:
            for b in BATCHES:
                turns[name](b, args.b1_calls if b == 1 else 1, record=r > 0)
            time.sleep(rl.PAUSE)
        turn_text(record=r > 0)
        time.sleep(rl.PAUSE)
        if r:
            log(f"round {r} ({', '.join(this)}): " + "; ".join(
                f"{n} " + "/".join(f"{ips[n][b][-1]:.1f}" for b in BATCHES) for n in names) + " images/s (batch 1/32)")
        else:
            log(f"warm-up round done in {time.perf_counter() - t_start:.0f} s")
    opt.close()
    busy_end = rl.busy_elsewhere()
    run_s = time.perf_counter() - t_start

    text_tower_s = median(text_tower)

    # agreement: every pair of contenders on the same pixel values
    agree = {}
    for i, a in enumerate(names):
        for c in names[i + 1:]:
            agree[f"{a} vs {c}"] = max(float(np.abs(embeds[a][b] - embeds[c][b]).max()) for b in BATCHES)
    worst = max(agree.values())
    shapes_ok = all(embeds[n][b].shape == (b, pipe.dim) for n in names for b in BATCHES)
    norms = max(float(np.abs(np.linalg.norm(embeds[n][b], axis=1) - 1).max()) for n in names for b in BATCHES)

    med = {n: {b: median(ips[n][b]) for b in ips[n]} for n in ips}
    ref = med["vlmedge graph"]
    print(f"\nCLIP ViT-B/32 shapes (random weights), image embeddings per second, {args.threads} threads each, "
          f"{args.rounds} rounds after 1 warm-up, contenders in rotated order (median images/s; batch 1 over "
          f"{args.b1_calls} calls per turn, batch 32 one call)")
    print(f"other work on the machine: {busy_start:.0%} of all cores busy at start, {busy_end:.0%} at end; "
          f"timed part {run_s:.0f} s" + (f"; bundle exported in {export_s:.0f} s" if export_s else ""))
    print(f"vlmedge {vlmedge.__version__} ({pipe.backend.name} {onnxruntime.__version__}, bundle {bundle.name}, "
          f"target {pipe.manifest.target}); HF: torch {torch.__version__}, transformers {transformers.__version__}")
    o = opt.info
    print(f"Optimum: optimum-onnx {o['optimum_onnx']}, optimum {o['optimum']}, transformers {o['transformers']}, "
          f"onnxruntime {o['onnxruntime']}; {o['class']} with inputs {', '.join(o['inputs'])}")
    print(f"\n{'contender':<44}" + "".join(f"{'batch ' + str(b):>11}" for b in BATCHES)
          + "".join(f"{'vlmedge/this b' + str(b):>17}" for b in BATCHES))
    labels = {"vlmedge graph": "vlmedge graph (pixel_values -> embeddings)",
              "vlmedge embed_images": "vlmedge embed_images (+ its preprocessing)",
              "HF PyTorch": "HF PyTorch get_image_features, normalised",
              "Optimum": "Optimum ORT (image + 2-token text tower)"}
    for n in [*names, *variants]:
        print(f"{labels.get(n, n):<44}" + "".join(f"{med[n][b]:>11.2f}" for b in BATCHES)
              + "".join(f"{ref[b] / med[n][b]:>16.2f}x" for b in BATCHES))
    print("\nratios (vlmedge = the graph row: the same pixel_values in and normalised embeddings out as HF and Optimum):")
    for other in ("Optimum", "HF PyTorch"):
        print(f"  vlmedge/{other.split()[0]}: " + ", ".join(f"batch {b} {ref[b] / med[other][b]:.2f}x" for b in BATCHES))
    pre = {b: (1 / med["vlmedge embed_images"][b] - 1 / ref[b]) * 1e3 for b in BATCHES}
    print("vlmedge's preprocessing (embed_images minus graph): " + ", ".join(f"batch {b} {pre[b]:.1f} ms per image" for b in BATCHES)
          + f" of {images[1][0].shape[1]}x{images[1][0].shape[0]} scene images")
    def without_text(b: int) -> str:
        per_call = b / med["Optimum"][b] - text_tower_s
        return f"batch {b} {b / per_call:.2f}" if per_call > 0 else f"batch {b} n/a (noise)"

    print(f"Optimum's graph also runs the text tower on 1 text of {ids.shape[1]} tokens each call: about {text_tower_s * 1e3:.1f} ms "
          f"(the bundle's text_encoder on the same ids, median over rounds); Optimum with that taken out would be about "
          + ", ".join(without_text(b) for b in BATCHES) + " images/s")
    cosine = {v: min(float((embeds[v][b].astype(np.float64) * embeds["vlmedge graph"][b]).sum(-1).min()) for b in BATCHES)
              for v in variants}
    for vname, c in cosine.items():
        print(f"{vname}: lowest cosine of its embeddings to the FP32 bundle's: {c:.5f} (not part of the agreement check)")
    ok = worst <= TOLERANCE and shapes_ok
    print(f"\nembeddings of the same pixel values (batch 1 and 32, max abs difference; all L2 norms within {norms:.1e} of 1):")
    for k, v in agree.items():
        print(f"  {k:<48}{v:.2e}")
    print(f"{'PASS' if ok else 'FAIL'}  all contenders agree within {TOLERANCE:g} (worst {worst:.2e})")
    if args.json:
        args.json.write_text(json.dumps({
            "model": "CLIP ViT-B/32 shapes, random weights", "bundle": str(bundle), "threads": args.threads, "rounds": args.rounds,
            "b1_calls": args.b1_calls, "median_images_per_s": med, "raw_images_per_s": ips,
            "ratios": {"vlmedge/optimum": {b: ref[b] / med["Optimum"][b] for b in BATCHES},
                       "vlmedge/hf": {b: ref[b] / med["HF PyTorch"][b] for b in BATCHES},
                       "uses": "vlmedge graph (pixel_values -> embeddings)"},
            "preprocessing_ms_per_image": pre, "optimum_text_tower_s": text_tower_s, "raw_text_tower_s": text_tower, "agreement_max_abs": agree,
            "agree": ok, "variant_cosine_to_fp32": cosine, "optimum": opt.info, "busy": [busy_start, busy_end], "export_s": export_s,
            "versions": {"vlmedge": vlmedge.__version__, "torch": torch.__version__, "transformers": transformers.__version__},
        }, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        sys.exit(main())
