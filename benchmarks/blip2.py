"""BLIP-2 with OPT on the CPU: export of the tiny BLIP-2 / InstructBLIP, and a BLIP-2-OPT against HF `generate`.

1. Export time (per graph, from the manifest's provenance) and bundle size of the tiny random `blip2-opt` and
   `instructblip-opt` of the test suite (tests/families.py BLIP2_FAMILIES), default options (validation on 8
   scenes included).
2. A BLIP-2 of Salesforce/blip2-opt-2.7b's shape scaled down to under 300 M parameters, random weights from
   configs (torch.manual_seed(0)): the ViT at 224 px and 14 px patches (257 rows) with q/k/v bias, but 12
   layers of width 768 (the checkpoint: 39 of 1408); the Q-Former with 32 queries cross-attending every 2nd
   layer, 6 layers of width 768 (the checkpoint: 12 of 768); the OPT LM of OPT-125m's size (12 layers of
   768, the checkpoint: 32 of 2560) over OPT's real 50,272-token vocabulary, tied embeddings. The tokenizer
   and processor are the test suite's (`_opt_tokenizer`, BLIP's image processor).
   Batch 1, greedy, a VQA question and `--new-tokens` tokens (`min_new_tokens` forces the count on both
   sides): time to first token and per token of vlmedge (ONNX Runtime, CPU) against HF `generate` (eager
   and SDPA) on the same pixels and prompt ids, and vlmedge INT4 weight-only against FP32: the measuring
   loop is benchmarks/prefix_families.py's `against_hf` (rounds alternate the contenders after a warm-up,
   2 threads each; a PyTorch probe marks the quiet rounds; the per-token floor from the read bandwidth).

Run:  .venv/bin/python benchmarks/blip2.py [--work /work/bench/b2] [--rounds 8] [--skip-tiny] [--json PATH]
The model, its bundle and the INT4 variant are made once in --work and reused.
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

from decoder_only import THREADS, log  # noqa: E402
from family_export import _size  # noqa: E402
from prefix_families import against_hf, export_tiny as export_prefix_tiny  # noqa: E402

SIDE = 224  # the checkpoint's image size; the processor resizes to it whatever the input


def build_blip2_opt(out: Path) -> int:
    """Salesforce/blip2-opt-2.7b's architecture scaled down (see the module docstring); returns its parameter count."""
    import torch
    from families import _opt_tokenizer
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    tok, vocab = _opt_tokenizer(out)
    queries, width = 32, 768
    cfg = Blip2Config(
        vision_config=dict(hidden_size=width, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=SIDE, patch_size=14, qkv_bias=True),
        qformer_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=6, num_attention_heads=12,
                            cross_attention_frequency=2, encoder_hidden_size=width),
        text_config=dict(model_type="opt", vocab_size=50272, hidden_size=768, ffn_dim=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=2048, word_embed_proj_dim=768, pad_token_id=1,
                         bos_token_id=2, eos_token_id=vocab["\n"], tie_word_embeddings=True),
        num_query_tokens=queries, image_token_index=vocab["<image>"], use_decoder_only_language_model=True)
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(cfg).eval()
    model.save_pretrained(out)
    Blip2Processor(BlipImageProcessorPil(size={"height": SIDE, "width": SIDE}), tok, num_query_tokens=queries).save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def prepare(work: Path, name: str = "blip2-opt-scaled", build=build_blip2_opt) -> dict:
    """The model (`build(dir)` makes it, returning its parameter count), its bundle and its INT4 variant in `work`
    (made once); the seconds each took when made."""
    from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.models.registry import load_adapter
    from vlmedge.outdir import OutputDir

    model, bundle, int4 = work / name, work / "bundle", work / "bundle-int4"
    made_file = work / "made.json"
    made = json.loads(made_file.read_text()) if made_file.is_file() else {}
    if not (model / "config.json").is_file():
        log(f"building the model in {model}")
        with OutputDir(model, force=True, label="model directory") as w:
            made["parameters"] = build(w.path)
            w.commit()
        log(f"  {made['parameters'] / 1e6:.1f} M parameters")
    if not (bundle / "manifest.json").is_file():
        log(f"exporting {bundle} (validation on 2 images)")
        t0 = time.perf_counter()
        m = export_bundle(load_adapter(str(model)), "all", bundle, ExportOptions(validate_images=2, force=True, max_batch=4))
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
    made_file.write_text(json.dumps(made, indent=2) + "\n")
    made["bundle_mb"], made["int4_mb"] = round(_size(bundle) / 1e6, 1), round(_size(int4) / 1e6, 1)
    return {"model": model, "bundle": bundle, "int4": int4, **made}


def table(res: dict, key: str = "blip2_opt", label: str = "BLIP-2-OPT-shaped") -> str:
    lines = ["| tiny model | graph export (s) | validation (s) | total (s) | bundle (KiB) | validation passed |",
             "|---|---|---:|---:|---:|---|"]
    for r in res["tiny"]:
        graphs = ", ".join(f"{g} {s}" for g, s in r["graphs_s"].items())
        lines.append(f"| {r['family']} ({r['architecture']}) | {graphs} | {r['validation_s']} | {r['total_s']} | "
                     f"{r['bundle_kib']} | {r['passed']} |")
    q = res[key]
    graphs = ", ".join(f"{g} {s} s" for g, s in q.get("export_graphs_s", {}).items())
    lines += ["", f"{label}, {q.get('parameters', 0) / 1e6:.0f} M parameters: export {q.get('export_s', '?')} s "
                  f"({graphs}), bundle {q['bundle_mb']} MB (INT4-wo {q['int4_mb']} MB, quantize {q.get('quantize_s', '?')} s); "
                  f"prompt {q['prompt_tokens']} tokens, {q['new_tokens']} new tokens; same tokens as HF eager: "
                  f"{q['same_tokens_as_hf_eager']}", "",
              "| all rounds | time to first token (ms) | per token (ms) |", "|---|---:|---:|"]
    for k in ("vlmedge", "hf-eager", "hf-sdpa", "vlmedge-int4"):
        lines.append(f"| {k}, median (best) | {q[k]['first_token_ms']} ({q[k]['best_first_token_ms']}) | "
                     f"{q[k]['per_token_ms']} ({q[k]['best_per_token_ms']}) |")
    lines += ["", "| ratio | median of per-round ratios | of medians | of best rounds |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['median_of_rounds']} | {v['of_medians']} | {v['of_best']} |" for k, v in q["ratios"].items()]
    lines += ["", f"Quiet rounds {q['quiet_rounds']} of {len(q['probe_ms_rounds'])} (probe ms {q['probe_ms_rounds']})"]
    if "quiet" in q:
        lines += ["", "| quiet rounds | time to first token (ms) | per token (ms) |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['first_token_ms']} | {v['per_token_ms']} |" for k, v in q["quiet"].items() if k != "ratios"]
        lines += [f"| {k} (median of rounds) | | {v} |" for k, v in q["quiet"]["ratios"].items()]
    f = q["floor"]
    lines += ["", f"Per-token floor: decoder weights {f['decoder_weight_mb']} MB over {f['stream_read_gbps']} GB/s read = "
                  f"{f['floor_ms']} ms; vlmedge FP32 per token / floor = {f['per_token_over_floor']}"]
    return "\n".join(lines)


def measure(argv, doc: str, work: str, families: dict, name: str, build, key: str, label: str) -> int:
    """The run of a scaled model against HF (this file's, benchmarks/idefics.py's): the tiny `families` exported,
    the model `build` makes (in WORK/`name`) prepared, measured, printed as JSON and as a table under `key`/`label`."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--work", default=work)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--skip-tiny", action="store_true", help="only the scaled model's measurements")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.side = SIDE  # against_hf resizes the scene to it
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(THREADS)
    res: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": THREADS,
                             "load_average_before": os.getloadavg()}}
    t0 = time.perf_counter()
    res["tiny"] = [] if args.skip_tiny else export_prefix_tiny(work, families)
    paths = prepare(work, name, build)
    q = against_hf(args, paths)
    res[key] = {**{k: v for k, v in paths.items() if not isinstance(v, Path)}, **q}
    res["machine"]["load_average_after"] = os.getloadavg()
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(res, indent=2)
    print(text)
    print(table(res, key, label))
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


def main(argv=None) -> int:
    from families import BLIP2_FAMILIES

    return measure(argv, __doc__, "/work/bench/b2", BLIP2_FAMILIES, "blip2-opt-scaled", build_blip2_opt, "blip2_opt",
                   "BLIP-2-OPT-shaped")


if __name__ == "__main__":
    sys.exit(main())
