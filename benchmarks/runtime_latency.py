"""Caption latency on the CPU: the vlmedge ONNX Runtime pipeline against the model's own PyTorch generation.

What it measures, for two models:

- shapes-vlm: the shipped reference model (5-object test scenes, so captions run ~20+ tokens).
- vit-gpt2: a base-size VisionEncoderDecoder (ViT-B/16 224px + GPT-2 124M shapes with cross-attention),
  random weights from configs (torch.manual_seed(0)); 20 new tokens forced on both sides.

1. End to end, batch 1 and batch 8, greedy, max 20 new tokens: `Pipeline.caption` (preprocessing included)
   against vlmedge preprocessing + `adapter.reference_generate` (HF `generate` / ShapesVLM.generate, both
   with a KV cache) under torch.no_grad. The two contenders alternate in one process after a warm-up,
   and must produce the same tokens. Medians over repeats; per-stage times of both sides.
2. Per-token latency of the runtime at decoder steps 1, 16 and 64 (40 for shapes-vlm, whose positions
   end at 48): the step at position p is the p-th decoder_step call (Timings.tokens[p - 1]), with p
   tokens in the KV cache.
3. vit-gpt2 only: the physical floor of one decoder step, i.e. the float weights of decoder_step.onnx read
   once at the measured memory read bandwidth, and the measured step at position 16 as a multiple of it.

Run:  .venv/bin/python benchmarks/runtime_latency.py [--quick] [--model shapes|vit-gpt2|all] [--json PATH]

The random ViT-GPT2 model and both bundles are cached in --work (default benchmarks/.work, about 2.5 GB,
not tracked by git; delete it to rebuild). The first run exports the ViT-GPT2 bundle, which takes
several minutes on 2 cores. Absolute numbers depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from vlmedge import __version__  # noqa: E402
from vlmedge.data.scenes import scenes  # noqa: E402
from vlmedge.runtime.bundle import load_bundle  # noqa: E402
from vlmedge.runtime.decoding import Timings  # noqa: E402
from vlmedge.runtime.pipeline import Pipeline  # noqa: E402
from vlmedge.runtime.preprocess import pixel_values  # noqa: E402

MAX_NEW = 20  # new tokens per caption in the end-to-end comparison
PAUSE = 0.05  # seconds between contenders, so one's spinning worker threads do not steal the other's cores
GPT2_VOCAB = 50257
EOT = "<|endoftext|>"

# the targets, checked at the end
SHAPES_SPEEDUP = 3.0  # runtime vs shapes-vlm PyTorch generate, batch 1
HF_SPEEDUP = 1.4  # runtime vs HF generate, vit-gpt2 batch 1
FLAT_STEPS = 1.3  # step at position 64 / step at position 1
FLOOR_MULTIPLE = 1.5  # step at position 16 / physical floor


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# -- models and bundles ---------------------------------------------------------------------------------


@dataclass
class Model:
    name: str
    adapter: object
    bundle: Path
    images: list  # uint8 HxWx3 arrays; batch 1 cycles through them, batch 8 takes them all
    force_len: bool  # random weights: force MAX_NEW tokens on both sides (min_new_tokens)
    positions: tuple[int, ...]  # decoder steps whose latency is reported
    repeats: dict[int, int]  # batch size -> repeats
    warmup: int
    export_s: float | None = None  # seconds the export took in this run; None: the bundle was cached


def export(adapter, task: str, out: Path) -> float:
    from vlmedge.export.exporter import export_bundle

    log(f"exporting {adapter.source} -> {out} (validates itself; the base-size model takes several minutes)")
    t0 = time.perf_counter()
    export_bundle(adapter, task, out, on_graph=lambda g, state: log(f"  {g}: {state}"))
    seconds = time.perf_counter() - t0
    log(f"  exported in {seconds:.0f} s")
    return seconds


def five_object_images(n: int) -> list:
    picked = list(islice((s.image for s in scenes("test", 0, 500) if len(s.objects) == 5), n))
    assert len(picked) == n, "not enough 5-object scenes in the first 500 test scenes"
    return picked


def shapes_model(work: Path, quick: bool) -> Model:
    from vlmedge.models.registry import load_adapter
    from vlmedge.runtime.bundle import sha256_file

    adapter = load_adapter("shapes-vlm")
    digest = sha256_file(adapter.weight_files()[0])[:12]
    bundle = work / f"shapes-vlm-{digest}-bundle-v{__version__}"
    seconds = None if (bundle / "manifest.json").is_file() else export(adapter, "all", bundle)
    reps = 5 if quick else 20
    # positions end at max_target_len 48: 1 prompt token + 47 new at most, so step 40 is the last round one
    return Model("shapes-vlm", adapter, bundle, five_object_images(8), force_len=False, positions=(1, 16, 40),
                 repeats={1: reps, 8: reps}, warmup=1 if quick else 3, export_s=seconds)


def gpt2_tokenizer(out: Path) -> None:
    """A fast tokenizer with GPT-2's vocabulary size: 50256 dummy words and <|endoftext|> at 50256, as in GPT-2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(GPT2_VOCAB - 1)}
    vocab[EOT] = GPT2_VOCAB - 1
    core = Tokenizer(models.WordLevel(vocab, unk_token=EOT))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=EOT, eos_token=EOT, pad_token=EOT, unk_token=EOT)
    assert len(tok) == GPT2_VOCAB
    tok.save_pretrained(out)


def build_vit_gpt2(out: Path) -> None:
    """ViT-B/16 (224 px) + GPT-2 124M with cross-attention, random weights, as a save_pretrained directory."""
    from transformers import GPT2Config, VisionEncoderDecoderConfig, VisionEncoderDecoderModel, ViTConfig, ViTImageProcessor

    log(f"building the random base-size ViT-GPT2 in {out}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        gpt2_tokenizer(tmp)
        eot = GPT2_VOCAB - 1
        enc = ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        image_size=224, patch_size=16)
        dec = GPT2Config(vocab_size=GPT2_VOCAB, n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                         add_cross_attention=True, bos_token_id=eot, eos_token_id=eot)
        cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = eot, eot, eot
        torch.manual_seed(0)
        VisionEncoderDecoderModel(cfg).eval().save_pretrained(tmp)
        ViTImageProcessor(size={"height": 224, "width": 224}).save_pretrained(tmp)
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def vit_gpt2_model(work: Path, quick: bool) -> Model:
    from vlmedge.models.registry import load_adapter

    model_dir = work / "vit-gpt2-base"
    if not (model_dir / "config.json").is_file():
        build_vit_gpt2(model_dir)
    adapter = load_adapter(str(model_dir))
    bundle = work / f"vit-gpt2-base-bundle-v{__version__}"
    seconds = None if (bundle / "manifest.json").is_file() else export(adapter, "caption", bundle)
    return Model("vit-gpt2", adapter, bundle, five_object_images(8), force_len=True, positions=(1, 16, 64),
                 repeats={1: 2, 8: 1} if quick else {1: 5, 8: 3}, warmup=1, export_s=seconds)


def onnxruntime_target(bundle: Path) -> Path:
    """The onnxruntime target of a cached bundle, made beside it once."""
    from vlmedge.export.ort_target import retarget

    out = bundle.with_name(bundle.name + "-ort")
    if not (out / "manifest.json").is_file():
        log(f"making the onnxruntime target {out}")
        retarget(bundle, out, log=log)
    return out


# -- the two contenders ---------------------------------------------------------------------------------


def run_vlmedge(pipe: Pipeline, images: list, **generation) -> tuple[float, Timings, list[list[int]]]:
    t = Timings()
    t0 = time.perf_counter()
    out = pipe.caption(images, return_ids=True, timings=t, **generation)
    return time.perf_counter() - t0, t, [list(g.ids) for g in out]


def pipelines_round(pipes: dict[str, Pipeline], image, gen: dict, record: bool, times: dict, steps: dict,
                    encoders: dict | None = None) -> dict[str, list[list[int]]]:
    """One round of pipelines taking turns on `image` (a pause after each); when `record`, each one's
    caption seconds, median step (and encoder seconds) are appended under its name. The ids, by name."""
    ids = {}
    for name, pipe in pipes.items():
        seconds, t, ids[name] = run_vlmedge(pipe, [image], **gen)
        if record:
            times[name].append(seconds)
            steps[name].append(median(t.tokens))
            if encoders is not None:
                encoders[name].append(t.encoder)
        time.sleep(PAUSE)
    return ids


class TorchSide:
    """vlmedge's preprocessing into a torch tensor, then the family's own PyTorch generation."""

    def __init__(self, model: Model):
        self.adapter = model.adapter
        self.prep = model.adapter.info.preprocessing.__dict__
        self.encoder = model.adapter.vision_encoder()
        self.extra = {"min_new_tokens": MAX_NEW} if model.force_len else {}

    def run(self, images: list) -> tuple[float, dict, list[list[int]]]:
        with torch.no_grad():
            t0 = time.perf_counter()
            px = torch.from_numpy(pixel_values(images, self.prep))
            t1 = time.perf_counter()
            ids = self.adapter.reference_generate("caption", px, max_new_tokens=MAX_NEW, **self.extra)
            t2 = time.perf_counter()
        return t2 - t0, {"preprocess": t1 - t0, "generate": t2 - t1}, ids

    def encoder_seconds(self, images: list) -> float:
        """The vision encoder alone, as a separate call (generate runs it again inside)."""
        px = torch.from_numpy(pixel_values(images, self.prep))
        with torch.no_grad():
            t0 = time.perf_counter()
            self.encoder(px)
            return time.perf_counter() - t0


# -- measurements ---------------------------------------------------------------------------------------


def compare(model: Model, pipe: Pipeline, side: TorchSide, batch: int) -> dict:
    """Alternate vlmedge and PyTorch (ABAB...) after a warm-up; medians of every stage."""
    imgs = model.images
    batches = [[im] for im in imgs] if batch == 1 else [imgs[:batch]]
    gen = {"max_new_tokens": MAX_NEW, **({"min_new_tokens": MAX_NEW} if model.force_len else {})}
    repeats = model.repeats[batch]
    log(f"{model.name} batch {batch}: {model.warmup} warm-up + {repeats} repeats")
    for i in range(model.warmup):
        run_vlmedge(pipe, batches[i % len(batches)], **gen)
        side.run(batches[i % len(batches)])
        side.encoder_seconds(batches[i % len(batches)])
    v = {"total": [], "preprocess": [], "encoder": [], "first_token": [], "per_token": [], "mean_token": [], "tokens": []}
    p = {"total": [], "preprocess": [], "encoder": [], "generate": [], "per_token": [], "tokens": []}
    mismatch = None
    for r in range(repeats):
        images = batches[r % len(batches)]
        total, t, v_ids = run_vlmedge(pipe, images, **gen)
        v["total"].append(total)
        v["preprocess"].append(t.preprocess)
        v["encoder"].append(t.encoder)
        v["first_token"].append(t.first_token)
        v["per_token"].append(median(t.tokens))
        v["mean_token"].append(float(np.mean(t.tokens)) if t.tokens else float("nan"))
        v["tokens"].append(float(np.mean([len(x) for x in v_ids])))
        time.sleep(PAUSE)
        total, stages, p_ids = side.run(images)
        time.sleep(PAUSE)
        enc = side.encoder_seconds(images)
        time.sleep(PAUSE)
        n_tok = float(np.mean([len(x) for x in p_ids]))
        p["total"].append(total)
        p["preprocess"].append(stages["preprocess"])
        p["generate"].append(stages["generate"])
        p["encoder"].append(enc)
        # derived: the decoding part of generate (without the encoder) spread over the longest row
        p["per_token"].append((stages["generate"] - enc) / max(max(len(x) for x in p_ids), 1))
        p["tokens"].append(n_tok)
        if v_ids != p_ids and mismatch is None:
            row = next(i for i in range(max(len(v_ids), len(p_ids))) if v_ids[i:i + 1] != p_ids[i:i + 1])
            mismatch = {"repeat": r, "row": row, "vlmedge": v_ids[row:row + 1], "pytorch": p_ids[row:row + 1]}
    v_med = {k: median(x) for k, x in v.items()}
    p_med = {k: median(x) for k, x in p.items()}
    v_med["tokens"], p_med["tokens"] = float(np.mean(v["tokens"])), float(np.mean(p["tokens"]))
    if mismatch:
        log(f"WARNING {model.name} batch {batch}: vlmedge and PyTorch tokens differ: {mismatch}")
    return {"batch": batch, "repeats": repeats, "warmup": model.warmup, "vlmedge": v_med, "pytorch": p_med,
            "speedup": p_med["total"] / v_med["total"], "same_tokens": mismatch is None, "mismatch": mismatch,
            "raw": {"vlmedge": v, "pytorch": p}}


def per_token(model: Model, pipe: Pipeline) -> dict:
    """Runtime step latency by position, batch 1; min_new_tokens makes every call reach the last position."""
    n_new = max(model.positions) + 1  # the first token comes from decoder_init, then one step per token
    repeats = model.repeats[1]
    log(f"{model.name} per-token latency: {n_new} new tokens, {model.warmup} warm-up + {repeats} repeats")
    steps: list[list[float]] = []
    for r in range(model.warmup + repeats):
        _, t, _ = run_vlmedge(pipe, [model.images[r % len(model.images)]], max_new_tokens=n_new, min_new_tokens=n_new)
        assert len(t.tokens) >= max(model.positions), f"{len(t.tokens)} steps, expected {max(model.positions)}"
        if r >= model.warmup:
            steps.append(t.tokens)
    by_pos = {p: median([s[p - 1] for s in steps]) for p in model.positions}
    first, last = model.positions[0], model.positions[-1]
    return {"new_tokens": n_new, "repeats": repeats, "seconds": by_pos, "last_over_first": by_pos[last] / by_pos[first],
            "last": last, "raw": steps}


def decoder_weight_bytes(bundle: Path) -> tuple[int, int]:
    """Bytes of the float initializers of decoder_step.onnx, each counted once; and how many there are."""
    import onnx

    m = onnx.load(str(bundle / "decoder_step.onnx"), load_external_data=False)
    sizes = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2, onnx.TensorProto.BFLOAT16: 2, onnx.TensorProto.DOUBLE: 8}
    seen: dict[str, int] = {}
    for init in m.graph.initializer:
        if init.data_type in sizes and init.name not in seen:
            seen[init.name] = int(np.prod(init.dims, dtype=np.int64)) * sizes[init.data_type]
    return sum(seen.values()), len(seen)


def floor(model: Model, tokens: dict, threads: int) -> dict:
    # the read bandwidth as the field measures it: a STREAM-style read with every core, best of 7,
    # cross-checked with sysbench (benchmarks/bandwidth.py); a numpy sum per thread under-read it
    from bandwidth import stream_read, sysbench_read

    weight_bytes, count = decoder_weight_bytes(model.bundle)
    bw, sb = stream_read(threads), sysbench_read(threads)
    floor_s = weight_bytes / bw
    step16 = tokens["seconds"][16]
    return {"weight_bytes": weight_bytes, "initializers": count, "bandwidth_bytes_per_s": bw,
            "sysbench_bytes_per_s": sb, "floor_s": floor_s, "step16_s": step16, "multiple": step16 / floor_s}


# -- report ---------------------------------------------------------------------------------------------


def busy_elsewhere(seconds: float = 1.0) -> float | None:
    """Fraction of all cores busy over `seconds` while this process sleeps: other work on the machine."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        (t0, i0), _, (t1, i1) = sample(), time.sleep(seconds), sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (i1 - i0) / max(t1 - t0, 1)


def machine(threads: int) -> dict:
    import onnxruntime
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "vlmedge": __version__, "busy_elsewhere_at_start": busy_elsewhere()}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def report(info: dict, results: dict) -> list[tuple[str, bool | None]]:
    """Print the tables; return the targets as (line, passed or None when not measured)."""
    m = info["machine"]
    print()
    print("vlmedge runtime latency, CPU" + (" (quick run)" if info["quick"] else ""))
    print(f"machine: {m['cpu']}, {m['cores']} cores; {m['threads']} threads for both ONNX Runtime and torch")
    for when in ("start", "end"):
        busy = info["machine"].get(f"busy_elsewhere_at_{when}")
        if busy is not None:
            note = "  <-- other work is running: timings are not reliable" if busy > 0.1 else ""
            print(f"CPU busy with other work at {when}: {busy:.0%} of all cores{note}")
    print(f"versions: python {m['python']}, onnxruntime {m['onnxruntime']}, torch {m['torch']}, "
          f"transformers {m['transformers']}, vlmedge {m['vlmedge']}")
    for name, r in results.items():
        print(f"{name}: bundle {r['bundle']}" + (f" (exported in this run in {r['export_s']:.0f} s)" if r["export_s"] else " (cached)"))

    print(f"\nEnd to end, greedy caption, max {MAX_NEW} new tokens (median ms over repeats; tokens: mean new per row)")
    head = f"{'model':<11}{'batch':>6}{'reps':>6}{'tokens v/pt':>13}{'vlmedge':>10}{'pytorch':>10}{'pt/vlmedge':>12}  same tokens"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        for c in r["compare"]:
            v, p = c["vlmedge"], c["pytorch"]
            print(f"{name:<11}{c['batch']:>6}{c['repeats']:>6}{v['tokens']:>7.1f}/{p['tokens']:<5.1f}{ms(v['total']):>10}"
                  f"{ms(p['total']):>10}{c['speedup']:>11.2f}x  {'yes' if c['same_tokens'] else 'NO  <-- see warning'}")

    print("\nStages (median ms). vlmedge: preprocess | vision encoder | first token (decoder_init) | per token "
          "(decoder_step; median and mean of the steps of a call)")
    print("                    PyTorch: preprocess | vision encoder (separate call) | generate | per token "
          "(derived: (generate - encoder) / tokens)")
    head = (f"{'model':<11}{'batch':>6}  {'side':<8}{'preproc':>9}{'encoder':>9}{'1st tok':>9}{'generate':>10}"
            f"{'per tok':>9}{'mean':>7}")
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        for c in r["compare"]:
            v, p = c["vlmedge"], c["pytorch"]
            print(f"{name:<11}{c['batch']:>6}  {'vlmedge':<8}{ms(v['preprocess']):>9}{ms(v['encoder']):>9}"
                  f"{ms(v['first_token']):>9}{'':>10}{ms(v['per_token']):>9}{ms(v['mean_token']):>7}")
            print(f"{'':<11}{'':>6}  {'pytorch':<8}{ms(p['preprocess']):>9}{ms(p['encoder']):>9}{'':>9}"
                  f"{ms(p['generate']):>10}{ms(p['per_token']):>9}")

    print("\nRuntime step latency by position, batch 1 (median ms; step p = the p-th decoder_step, p tokens cached)")
    for name, r in results.items():
        t = r["per_token"]
        cells = "  ".join(f"pos {p}: {ms(s)}" for p, s in t["seconds"].items())
        print(f"{name:<11}{cells}   pos{t['last']}/pos1 = {t['last_over_first']:.2f}, "
              f"pos{t['last']}/pos16 = {t['seconds'][t['last']] / t['seconds'][16]:.2f}  "
              f"({t['new_tokens']} new tokens, {t['repeats']} repeats)")

    if "vit-gpt2" in results:
        f = results["vit-gpt2"]["floor"]
        print(f"\nPhysical floor, vit-gpt2 decoder step: {f['weight_bytes'] / 1e6:.1f} MB of float initializers "
              f"({f['initializers']}) / {f['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s read bandwidth (STREAM-style, best of 7, "
              f"{m['threads']} threads) = {ms(f['floor_s'])} ms; step at pos 16 = {ms(f['step16_s'])} ms = "
              f"{f['multiple']:.2f}x floor")

    def b1(name):
        r = results.get(name)
        return None if r is None else next(c for c in r["compare"] if c["batch"] == 1)

    targets: list[tuple[str, bool | None]] = []
    s, g = b1("shapes-vlm"), b1("vit-gpt2")
    targets.append((f"shapes-vlm batch 1: runtime >= {SHAPES_SPEEDUP}x faster than PyTorch generate"
                    + (f" (measured {s['speedup']:.2f}x)" if s else ""), None if s is None else s["speedup"] >= SHAPES_SPEEDUP))
    targets.append((f"vit-gpt2 batch 1: runtime >= {HF_SPEEDUP}x faster than HF generate"
                    + (f" (measured {g['speedup']:.2f}x)" if g else ""), None if g is None else g["speedup"] >= HF_SPEEDUP))
    t = results.get("vit-gpt2", {}).get("per_token")
    targets.append((f"vit-gpt2: step at pos 64 <= {FLAT_STEPS}x step at pos 1"
                    + (f" (measured {t['last_over_first']:.2f}x)" if t else ""), None if t is None else t["last_over_first"] <= FLAT_STEPS))
    f = results.get("vit-gpt2", {}).get("floor")
    targets.append((f"vit-gpt2: step at pos 16 <= {FLOOR_MULTIPLE}x physical floor"
                    + (f" (measured {f['multiple']:.2f}x)" if f else ""), None if f is None else f["multiple"] <= FLOOR_MULTIPLE))
    print("\nTargets")
    for line, ok in targets:
        print(f"{'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}  {line}")
    if any(not c["same_tokens"] for r in results.values() for c in r["compare"]):
        print("WARNING: some rows produced different tokens on the two sides (marked NO above)")
    return targets


# -- main -----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=("shapes", "vit-gpt2", "all"), default="all", help="which model (default: all)")
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer warm-ups and repeats")
    ap.add_argument("--repeats", type=int, help="repeats for every measurement (default: 20 for shapes-vlm; "
                    "5 at batch 1 and 3 at batch 8 for vit-gpt2; fewer with --quick)")
    ap.add_argument("--work", type=Path, default=ROOT / "benchmarks" / ".work",
                    help="cache of the random ViT-GPT2 model and the bundles (default: benchmarks/.work)")
    ap.add_argument("--threads", type=int, default=2, help="threads for ONNX Runtime and torch (default 2)")
    ap.add_argument("--json", type=Path, help="also write every number (raw repeats included) here")
    ap.add_argument("--target", choices=("tensorrt-portable", "onnxruntime"), default="tensorrt-portable",
                    help="which bundle the runtime runs: the portable one (default) or its onnxruntime target "
                         "(ONNX Runtime's fused kernels; made beside it once)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # e.g. generate's note on attention masks; errors still show
    transformers.logging.disable_progress_bar()
    info = {"quick": args.quick, "max_new_tokens": MAX_NEW, "machine": machine(args.threads)}

    builders = {"shapes": shapes_model, "vit-gpt2": vit_gpt2_model}
    names = list(builders) if args.model == "all" else [args.model]
    results: dict[str, dict] = {}
    for key in names:
        model = builders[key](args.work, args.quick)
        if args.repeats:
            model.repeats = {b: args.repeats for b in model.repeats}
        if args.target == "onnxruntime":
            model.bundle = onnxruntime_target(model.bundle)
        pipe = Pipeline(load_bundle(model.bundle), "cpu", threads=args.threads, shared_threads=True)
        side = TorchSide(model)
        r = results[model.name] = {"bundle": str(model.bundle), "export_s": model.export_s, "target": args.target}
        r["compare"] = [compare(model, pipe, side, b) for b in (1, 8)]
        r["per_token"] = per_token(model, pipe)
        if model.name == "vit-gpt2":
            r["floor"] = floor(model, r["per_token"], args.threads)
        del pipe, side, model  # free one model's memory before loading the next

    info["machine"]["busy_elsewhere_at_end"] = busy_elsewhere()
    targets = report(info, results)
    info["seconds"] = time.perf_counter() - started
    print(f"\n(whole run {info['seconds']:.0f} s)")
    if args.json:
        out = {**info, "results": results, "targets": [{"target": line, "passed": ok} for line, ok in targets]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
