"""Decoder-only VLMs (II) on the CPU: export of the prefix families, and a Qwen2-VL against HF `generate`.

1. Export time and bundle size of the tiny random PaliGemma, Gemma 3, Qwen2-VL and Qwen2.5-VL of the test
   suite (tests/families.py), exported with the default options (validation on 8 scenes included).
2. A Qwen2-VL of Qwen/Qwen2-VL-2B-Instruct's shape scaled down to about 260 M parameters, random weights
   from configs (torch.manual_seed(0)): the vision tower at 14 px patches, temporal patch 2, 2x2 merging,
   but 8 layers of width 640 (the checkpoint: 32 of 1280); the Qwen2 LM with M-RoPE (mrope_section [8, 12,
   12] of a 64-wide head, as [16, 24, 24] of 128), 12 layers of width 768, 12 query heads over 2 KV heads,
   tied embeddings over the checkpoint's 151,936-token vocabulary (the checkpoint: 28 layers of 1536). The
   processor keeps the checkpoint's mean, std and patching; `--side` px square images (448 by default:
   32 x 32 patches, 256 image tokens).
   Batch 1, greedy, a VQA prompt and `--new-tokens` tokens (`min_new_tokens` forces the count on both
   sides): time to first token and per token of vlmedge (ONNX Runtime, CPU; `Timings`; the portable bundle
   and its ONNX Runtime target, `--target onnxruntime`: RotaryEmbedding and GroupQueryAttention) against HF
   `generate` on the same patches and prompt ids (one call, each step stamped by a logits processor), HF
   as vlmedge's export loads it (eager attention) and as transformers loads it by default (SDPA); and
   vlmedge INT4 weight-only (decoder MatMuls and LM head, block 32, MatMulNBits) per token against vlmedge
   FP32. As in benchmarks/decoder_only.py (its helpers): the contenders alternate round by round in one
   process after a warm-up, 2 threads each, medians; the FP32 contenders must give the same tokens.
   For a shared machine: ratios are also taken within each round (contenders seconds apart), and a fixed
   PyTorch probe before and after each round marks the quiet rounds (probe within 1.25x of the run's
   fastest), reported apart, since PyTorch's thread pool slows far more under contention than ONNX
   Runtime's and all-round figures then flatter vlmedge. The per-token floor (decoder weight bytes over
   the read bandwidth, measured at the end of the run) checks that no figure beats the memory; measured
   under load, the bandwidth reads low and the floor high. The first token's floor: the FLOPs PyTorch counts
   on HF's first-token pass over ONNX Runtime's best float32 MatMul rate at the vision MLP's shape.

Run:  .venv/bin/python benchmarks/prefix_families.py [--work /work/bench/pf] [--rounds 12] [--skip-tiny] [--json PATH]
The model, its bundle, its ONNX Runtime target and the INT4 variant are made once in --work and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from bundles_side_by_side import timed_vqa  # noqa: E402
from decoder_only import PAUSE, THREADS, floor, log, median_ms  # noqa: E402
from family_export import _size  # noqa: E402

TINY = ("paligemma", "gemma3", "qwen2-vl", "qwen2.5-vl")


def export_tiny(work: Path, families: dict | None = None) -> list[dict]:
    """Export time and size of each tiny family (default options), freshly exported each run: `families`
    (name -> (architecture, builder, task), as tests/families.py has them), by default the four of TINY."""
    from families import BLOCK_FAMILIES, MROPE_FAMILIES

    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.models.registry import load_adapter
    from vlmedge.outdir import OutputDir

    if families is None:
        families = {name: {**BLOCK_FAMILIES, **MROPE_FAMILIES}[name] for name in TINY}
    rows = []
    for name, (architecture, build, task) in families.items():
        model = work / "tiny" / "models" / name
        if not (model / "config.json").is_file():
            with OutputDir(model, force=True, label="model directory") as w:
                build(w.path)
                w.commit()
        bundle = work / "tiny" / "bundles" / name
        t0 = time.perf_counter()
        manifest = export_bundle(load_adapter(str(model)), task, bundle, ExportOptions(force=True))
        total = time.perf_counter() - t0
        traced = manifest.provenance["export_seconds"]
        rows.append({"family": name, "architecture": architecture, "graphs_s": {g: round(s, 1) for g, s in traced.items()},
                     "validation_s": round(total - sum(traced.values()), 1), "total_s": round(total, 1),
                     "bundle_kib": round(_size(bundle) / 1024), "passed": manifest.validation["passed"]})
        log(f"  {name}: {total:.1f} s, {rows[-1]['bundle_kib']} KiB")
    return rows


def build_qwen2_vl(out: Path, side: int) -> int:
    """Qwen2-VL-2B-Instruct's architecture scaled down (see the module docstring); returns its parameter count."""
    import torch
    from families import QWEN2_VL_TEMPLATE, _chat_tokenizer, _save_processor
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    special = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    _, vocab = _chat_tokenizer(out, "<|endoftext|>", "<|im_end|>", special + ["system", "user", "assistant", "You", "are", "a",
                                                                             "helpful", "assistant."], add_bos=False)
    patch, merge, width = 14, 2, 768
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=8, embed_dim=640, hidden_size=width, num_heads=10, mlp_ratio=4, patch_size=patch,
                           spatial_merge_size=merge, temporal_patch_size=2, hidden_act="quick_gelu"),
        text_config=dict(vocab_size=151936, hidden_size=width, intermediate_size=2816, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, hidden_act="silu",
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1_000_000.0},
                         bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|im_end|>"],
                         pad_token_id=vocab["<|endoftext|>"]),
        image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"], tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    model.save_pretrained(out)
    factor = patch * merge
    ip = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                  size={"shortest_edge": 4 * factor * factor, "longest_edge": side * side})
    _save_processor(out, "Qwen2VLProcessor", ip, QWEN2_VL_TEMPLATE)
    return sum(p.numel() for p in model.parameters())


def prepare(work: Path, side: int) -> dict:
    """The model, its bundle and its INT4 variant in `work` (made once); the seconds each took when made."""
    from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.models.registry import load_adapter
    from vlmedge.outdir import OutputDir

    from vlmedge.export.ort_target import retarget

    model, bundle, int4 = work / f"qwen2-vl-260m-{side}", work / f"bundle-{side}", work / f"bundle-{side}-int4"
    ort = work / f"bundle-{side}-ort"
    made_file = work / f"made-{side}.json"
    made = json.loads(made_file.read_text()) if made_file.is_file() else {}
    if not (model / "config.json").is_file():
        log(f"building the model in {model}")
        with OutputDir(model, force=True, label="model directory") as w:
            made["parameters"] = build_qwen2_vl(w.path, side)
            w.commit()
    if not (bundle / "manifest.json").is_file():
        log(f"exporting {bundle} (validation on 2 images)")
        t0 = time.perf_counter()
        m = export_bundle(load_adapter(str(model)), "vqa", bundle, ExportOptions(validate_images=2, force=True, max_batch=4))
        made["export_s"] = round(time.perf_counter() - t0, 1)
        made["export_graphs_s"] = {g: round(s, 1) for g, s in m.provenance["export_seconds"].items()}
        made["validation_passed"] = m.validation["passed"]
        log(f"  {made['export_s']:.0f} s")
    if not (int4 / "manifest.json").is_file():
        log(f"quantizing {int4}")
        t0 = time.perf_counter()
        quantize_bundle(bundle, int4, QuantizeOptions("int4-wo", calib="synthetic:8", held_out=2, method="rtn", lm_head=True,
                                                       format="matmulnbits", force=True, budget_vqa=1.0, budget_bleu=1.0))
        made["quantize_s"] = round(time.perf_counter() - t0, 1)
    if not (ort / "manifest.json").is_file():
        log(f"writing the ONNX Runtime target {ort} (validation on 2 images)")
        t0 = time.perf_counter()
        entry = retarget(bundle, ort, force=True, validate_images=2)
        made["ort_target_s"] = round(time.perf_counter() - t0, 1)
        made["ort_target_fused"] = entry["fused_nodes"]["decoder"]
    made_file.write_text(json.dumps(made, indent=2) + "\n")
    made["bundle_mb"], made["int4_mb"] = round(_size(bundle) / 1e6, 1), round(_size(int4) / 1e6, 1)
    return {"model": model, "bundle": bundle, "int4": int4, "ort": ort, **made}


QUIET = 1.25  # a round is quiet when its probe ran within this of the run's fastest probe


def probe() -> float:
    """Seconds of a fixed piece of work on THREADS threads (best of 3 float32 1024^2 products in PyTorch): how
    much of the cores this process gets at the moment."""
    import torch

    a = torch.ones(1024, 1024)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(4):
            a @ a
        best = min(best, time.perf_counter() - t0)
    return best


def against_hf(args, paths: dict) -> dict:
    import statistics

    import torch
    from PIL import Image

    import vlmedge
    from vlmedge.data.scenes import pick_questions, scenes
    from vlmedge.models.registry import load_adapter
    from vlmedge.runtime.prefix import user_turn

    torch.set_num_threads(THREADS)
    scene = next(scenes("test", 0, 1))
    image = Image.fromarray(scene.image).resize((args.side, args.side), Image.Resampling.BICUBIC)
    question = pick_questions(scene)[0].text
    N = args.new_tokens
    fp32, q4 = vlmedge.load(paths["bundle"], threads=THREADS), vlmedge.load(paths["int4"], threads=THREADS)
    fused = vlmedge.load(paths["ort"], threads=THREADS)
    adapter = load_adapter(str(paths["model"]))
    hf = adapter.model  # eager attention: as the export traced it
    inputs, rows = fp32.prompt_inputs([[image]], [[user_turn(question)]])
    ids = torch.tensor(rows)
    mask = torch.ones_like(ids)
    hf_inputs = dict(input_ids=ids, attention_mask=mask, **adapter.pixel_inputs(inputs), **adapter.reference_inputs(ids, mask))
    sdpa = type(hf).from_pretrained(str(paths["model"]), attn_implementation="sdpa").eval()
    sdpa.generation_config = hf.generation_config

    def ours(pipe):
        return timed_vqa(pipe, image, question, N)

    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        """The time of each step's logits: the first after the prompt, then one per generated token."""

        def __init__(self):
            self.at: list[float] = []

        def __call__(self, input_ids, scores):
            self.at.append(time.perf_counter())
            return scores

    @torch.no_grad()
    def theirs(model):
        # one generate call, stamped at every step (as vlmedge's Timings are), rather than the difference of
        # two calls (max_new_tokens=1 and N), which a change of load between them skews either way
        stamp = Stamp()
        t0 = time.perf_counter()
        out = model.generate(**hf_inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                             logits_processor=LogitsProcessorList([stamp]))
        steps = [b - a for a, b in zip(stamp.at, stamp.at[1:])]
        # the patches are made once above: HF's TTFT is model time (vlmedge's includes its preprocessing)
        return stamp.at[0] - t0, statistics.median(steps), out[0, len(rows[0]):].tolist()

    log(f"prompt: {len(rows[0])} tokens (grid {inputs[0][0].grid}); {N} new tokens; {args.rounds} rounds")
    contenders = (("vlmedge", lambda: ours(fp32)), ("vlmedge-ort", lambda: ours(fused)), ("hf-eager", lambda: theirs(hf)),
                  ("hf-sdpa", lambda: theirs(sdpa)), ("vlmedge-int4", lambda: ours(q4)))
    for _, fn in contenders:  # warm-up
        fn()
    times = {name: [] for name, _ in contenders}
    probes = []  # per round: the slower of the probes before and after it
    tokens = {}
    for r in range(args.rounds):
        before = probe()
        for name, fn in contenders:
            first, per, got = fn()
            times[name].append((first, per))
            tokens[name] = got
            time.sleep(PAUSE)
        probes.append(max(before, probe()))
        log(f"  round {r + 1} (probe {probes[-1] * 1000:.1f} ms): "
            + ", ".join(f"{k} {v[-1][0] * 1000:.0f} / {v[-1][1] * 1000:.1f} ms" for k, v in times.items()))
    res = {k: {"first_token_ms": median_ms([a for a, _ in v]), "per_token_ms": median_ms([b for _, b in v]),
               "best_first_token_ms": round(min(a for a, _ in v) * 1000, 2),
               "best_per_token_ms": round(min(b for _, b in v) * 1000, 2),
               "first_token_ms_rounds": [round(a * 1000) for a, _ in v],
               "per_token_ms_rounds": [round(b * 1000, 1) for _, b in v]} for k, v in times.items()}
    res["same_tokens_as_hf_eager"] = {k: tokens[k] == tokens["hf-eager"] for k in ("vlmedge", "vlmedge-ort", "hf-sdpa",
                                                                                  "vlmedge-int4")}
    res["tokens_generated"] = {k: len(v) for k, v in tokens.items()}

    # On a shared machine another process's load comes and goes within a run: a round's contenders ran
    # seconds apart, so the ratio within each round is the paired figure; its median over the rounds is
    # the headline, beside the ratio of the medians and of the best rounds.
    def ratio(a: str, b: str, i: int) -> dict:
        paired = [x[i] / y[i] for x, y in zip(times[a], times[b])]
        return {"median_of_rounds": round(statistics.median(paired), 3), "rounds": [round(r, 2) for r in paired],
                "of_medians": round(statistics.median(x[i] for x in times[a]) / statistics.median(y[i] for y in times[b]), 3),
                "of_best": round(min(x[i] for x in times[a]) / min(y[i] for y in times[b]), 3)}

    res["ratios"] = {f"{h} / {v} {what}": ratio(h, v, i) for v in ("vlmedge", "vlmedge-ort")
                     for h in ("hf-eager", "hf-sdpa") for i, what in enumerate(("first token", "per token"))}
    res["ratios"]["int4 / fp32 per token"] = ratio("vlmedge-int4", "vlmedge", 1)

    # quiet rounds: the fixed probe before and after ran within QUIET of its fastest in the run, so no
    # other process held the cores for long; under contention PyTorch's thread pool slows far more than
    # ONNX Runtime's, and all-round figures favour vlmedge
    fastest = min(probes)
    quiet = [i for i, p in enumerate(probes) if p <= QUIET * fastest]
    res["probe_ms_rounds"] = [round(p * 1000, 1) for p in probes]
    res["quiet_rounds"] = [i + 1 for i in quiet]
    if quiet:
        kept = {k: [v[i] for i in quiet] for k, v in times.items()}
        res["quiet"] = {k: {"first_token_ms": median_ms([a for a, _ in v]), "per_token_ms": median_ms([b for _, b in v])}
                        for k, v in kept.items()}
        res["quiet"]["ratios"] = {
            f"{h} / {v} {what}": round(statistics.median(x[i] / y[i] for x, y in zip(kept[h], kept[v])), 3)
            for v in ("vlmedge", "vlmedge-ort") for h in ("hf-eager", "hf-sdpa", "vlmedge-int4")
            for i, what in enumerate(("first token", "per token"))}
    res["floor"] = floor(paths["bundle"], res["vlmedge"]["per_token_ms"])
    # the fused graph reads the same weights (its merged projections are the same bytes)
    res["floor"]["ort_per_token_over_floor"] = round(res["vlmedge-ort"]["per_token_ms"] / res["floor"]["floor_ms"], 2)
    res["first_token_floor"] = first_token_floor(sdpa, hf_inputs, res)
    res["prompt_tokens"], res["grid"], res["new_tokens"] = len(rows[0]), list(inputs[0][0].grid), N
    return res


def first_token_floor(hf, hf_inputs: dict, res: dict) -> dict:
    """The first token's arithmetic, counted by PyTorch on HF's own first-token pass (vision tower, merger,
    prompt, one row of the LM head), over ONNX Runtime's best float32 MatMul rate at the tower's MLP shape:
    no FP32 runtime makes the first token faster than that on this machine."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from decoder_only import gemm_rate

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        hf.generate(**hf_inputs, max_new_tokens=1, do_sample=False)
    flops = counter.get_total_flops()
    vision = hf.config.vision_config
    patches = int(hf_inputs["image_grid_thw"].prod(-1).sum())
    rate = gemm_rate(patches, vision.embed_dim, int(vision.embed_dim * vision.mlp_ratio))
    floor_ms = flops / rate * 1000
    return {"gflop": round(flops / 1e9, 1), "matmul_gflops": round(rate / 1e9, 1), "floor_ms": round(floor_ms, 1),
            **{f"{k}_over_floor": round(res[k]["first_token_ms"] / floor_ms, 2)
               for k in ("vlmedge", "vlmedge-ort", "hf-eager", "hf-sdpa")},
            "first_token_for_1_5x_hf_sdpa_ms": round(res["hf-sdpa"]["first_token_ms"] / 1.5, 1)}


def table(res: dict) -> str:
    lines = ["| tiny model | vision / embed / decoder export (s) | validation (s) | total (s) | bundle (KiB) |",
             "|---|---|---:|---:|---:|"]
    for r in res["tiny"]:
        g = r["graphs_s"]
        lines.append(f"| {r['family']} ({r['architecture']}) | {' / '.join(str(g[k]) for k in g)} | {r['validation_s']} | "
                     f"{r['total_s']} | {r['bundle_kib']} |")
    q = res["qwen2_vl"]
    lines += ["", f"Qwen2-VL-shaped, {q.get('parameters', 0) / 1e6:.0f} M parameters: export {q.get('export_s', '?')} s, "
                  f"bundle {q['bundle_mb']} MB (INT4-wo {q['int4_mb']} MB); prompt {q['prompt_tokens']} tokens, "
                  f"{q['new_tokens']} new tokens", "",
              "| | time to first token (ms) | per token (ms) |", "|---|---:|---:|"]
    for k in ("vlmedge", "vlmedge-ort", "hf-eager", "hf-sdpa", "vlmedge-int4"):
        lines.append(f"| {k}, median (best) | {q[k]['first_token_ms']} ({q[k]['best_first_token_ms']}) | "
                     f"{q[k]['per_token_ms']} ({q[k]['best_per_token_ms']}) |")
    lines += ["", "| ratio | median of per-round ratios | of medians | of best rounds |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['median_of_rounds']} | {v['of_medians']} | {v['of_best']} |" for k, v in q["ratios"].items()]
    if "quiet" in q:
        lines += ["", f"Quiet rounds {q['quiet_rounds']} of {len(q['probe_ms_rounds'])} (probe ms {q['probe_ms_rounds']}):", "",
                  "| quiet rounds | time to first token (ms) | per token (ms) |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['first_token_ms']} | {v['per_token_ms']} |" for k, v in q["quiet"].items() if k != "ratios"]
        lines += [f"| {k} (median of rounds) | | {v} |" for k, v in q["quiet"]["ratios"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/work/bench/pf")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--side", type=int, default=448, help="image side in px (a multiple of 28)")
    ap.add_argument("--skip-tiny", action="store_true", help="only the Qwen2-VL measurements")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(THREADS)
    res: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": THREADS,
                             "load_average_before": os.getloadavg()}}
    t0 = time.perf_counter()
    res["tiny"] = [] if args.skip_tiny else export_tiny(work)
    paths = prepare(work, args.side)
    q = against_hf(args, paths)
    res["qwen2_vl"] = {**{k: v for k, v in paths.items() if not isinstance(v, Path)}, **q}
    res["machine"]["load_average_after"] = os.getloadavg()
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(res, indent=2)
    print(text)
    print(table(res))
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
