"""Decoder-only VLMs on the CPU: vlmedge's prefix-contract runtime against Hugging Face `generate`.

The model: SmolVLM-256M-Instruct's shape (a SigLIP-B/16 tower at 512 px, pixel shuffle x4 to 64
tokens per tile, a SmolLM2-135M Llama: 30 layers, width 576, 9 query heads over 3 KV heads, tied
embeddings, vocabulary 49,152) with random weights from configs (torch.manual_seed(0)), saved with a
SmolVLM processor. `--longest-edge` sets the processor's first resize: 512 (default) makes a test
scene one 512 px tile (64 image tokens), 2048 (the published processor's) 4 x 4 tiles plus the
global image (17 tiles, 1,088 image tokens).

1. Batch 1, greedy, a VQA prompt (chat template, image tokens) and `--new-tokens` generated tokens
   (`min_new_tokens` forces the count on both sides: the weights are random): time to first token
   (preprocessing, vision encoder, prompt, first token) and per token, vlmedge (`vlmedge.load(...).vqa`
   with Timings) against HF `generate` on the same frames and prompt ids (time to first token:
   `generate(max_new_tokens=1)`; per token: the rest of a full run over the remaining tokens). The two
   alternate round by round in one process after a warm-up, 2 threads each, and must give the same tokens.
   The bundle's ONNX Runtime target (`--target onnxruntime`: fused attention and layer norms) runs
   beside them. The first token's floor: its arithmetic (PyTorch's FLOP counter on HF's first-token
   pass) over ONNX Runtime's best float32 MatMul rate on this machine.
2. vlmedge INT4 weight-only (the decoder's MatMuls and the LM head, block 32, ONNX Runtime's
   MatMulNBits) per token against vlmedge FP32, alternating.
3. Per token against the weight-bandwidth floor: the decoder graph's weight bytes read once at the
   machine's read bandwidth (benchmarks/bandwidth.py: a STREAM-style read with every core, best of
   7, cross-checked with sysbench).
4. Peak RSS of a fresh process loading each bundle and answering one question (VmHWM, minus the
   interpreter's after `import vlmedge`).

Run:  .venv/bin/python benchmarks/decoder_only.py [--work /work/bench/decoder-only] [--rounds 5] [--json PATH]
The model, its bundle and the INT4 variant are made once in --work (about 1.5 GB); the first run
exports and quantizes (several minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

THREADS = 2
PAUSE = 0.05  # between contenders, so one's spinning workers do not steal the other's cores


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_model(out: Path, longest_edge: int) -> None:
    """SmolVLM-256M-Instruct's architecture with random weights, saved as transformers 5 saves it."""
    import torch
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil

    sys.path.insert(0, str(ROOT / "tests"))
    from families import SMOLVLM_TEMPLATE, _chat_tokenizer, _save_processor

    special = ["<fake_token_around_image>", "<image>", "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    _, vocab = _chat_tokenizer(out, "<|im_start|>", "<end_of_utterance>", special, add_bos=False)
    cfg = SmolVLMConfig(
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=512, patch_size=16),
        text_config=dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=vocab["<|im_start|>"],
                         eos_token_id=vocab["<end_of_utterance>"], pad_token_id=vocab["<unk>"]),
        image_token_id=vocab["<image>"], scale_factor=4, tie_word_embeddings=True, pad_token_id=vocab["<unk>"])
    torch.manual_seed(0)
    model = SmolVLMForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = [vocab["<end_of_utterance>"]]
    model.save_pretrained(out)
    ip = SmolVLMImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": 512})
    _save_processor(out, "SmolVLMProcessor", ip, SMOLVLM_TEMPLATE, image_seq_len=64)


def prepare(work: Path, longest_edge: int) -> tuple[Path, Path, Path]:
    from vlmedge.calibration.quantize import QuantizeOptions, quantize_bundle
    from vlmedge.export.exporter import ExportOptions, export_bundle
    from vlmedge.models.registry import load_adapter
    from vlmedge.outdir import OutputDir

    model, bundle, int4 = work / f"smolvlm-256m-{longest_edge}", work / f"bundle-{longest_edge}", work / f"bundle-{longest_edge}-int4"
    fused = work / f"bundle-{longest_edge}-ort"
    if not (model / "config.json").is_file():
        log(f"building the model in {model}")
        with OutputDir(model, force=True, label="model directory") as w:
            build_model(w.path, longest_edge)
            w.commit()
    if not (bundle / "manifest.json").is_file():
        log(f"exporting {bundle} (validation on 2 images)")
        t0 = time.perf_counter()
        export_bundle(load_adapter(str(model)), "vqa", bundle, ExportOptions(validate_images=2, force=True, max_batch=4))
        log(f"  {time.perf_counter() - t0:.0f} s")
    if not (int4 / "manifest.json").is_file():
        log(f"quantizing {int4}")
        quantize_bundle(bundle, int4, QuantizeOptions("int4-wo", calib="synthetic:8", held_out=2, method="rtn", lm_head=True,
                                                       format="matmulnbits", force=True, budget_vqa=1.0, budget_bleu=1.0))
    if not (fused / "manifest.json").is_file():
        from vlmedge.export.ort_target import retarget

        log(f"writing the ONNX Runtime target {fused}")
        retarget(bundle, fused, force=True, validate_images=2)
    return model, bundle, int4, fused


def median_ms(xs) -> float:
    return round(statistics.median(xs) * 1000, 2)


def run(args) -> dict:
    import torch
    from PIL import Image

    import vlmedge
    from vlmedge.data.scenes import pick_questions, scenes
    from vlmedge.models.registry import load_adapter
    from vlmedge.runtime.decoding import Timings
    from vlmedge.runtime.prefix import user_turn

    torch.set_num_threads(THREADS)
    work = Path(args.work)
    model_dir, bundle, int4, fused = prepare(work, args.longest_edge)
    scene = next(scenes("test", 0, 1))
    image = Image.fromarray(scene.image).resize((512, 512), Image.Resampling.BICUBIC)
    question = pick_questions(scene)[0].text
    N = args.new_tokens
    fp32, q4 = vlmedge.load(bundle, threads=THREADS), vlmedge.load(int4, threads=THREADS)
    ort = vlmedge.load(fused, threads=THREADS)
    adapter = load_adapter(str(model_dir))
    hf = adapter.model
    inputs, rows = fp32.prompt_inputs([[image]], [[user_turn(question)]])
    hf_inputs = dict(input_ids=torch.tensor(rows), attention_mask=torch.ones(1, len(rows[0]), dtype=torch.long),
                     **adapter.pixel_inputs(inputs))

    def ours(pipe):
        t = Timings()
        t0 = time.perf_counter()
        g = pipe.vqa(image, question, return_ids=True, max_new_tokens=N, min_new_tokens=N, timings=t)
        whole = time.perf_counter() - t0
        return whole - sum(t.tokens), statistics.median(t.tokens), list(g.ids)

    # HF as vlmedge's export loads it (eager attention, the reference for token equality) and as
    # transformers loads it by default (PyTorch's scaled_dot_product_attention)
    sdpa = type(hf).from_pretrained(str(model_dir), attn_implementation="sdpa").eval()
    sdpa.generation_config = hf.generation_config

    @torch.no_grad()
    def theirs(model=hf):
        t0 = time.perf_counter()
        model.generate(**hf_inputs, max_new_tokens=1, do_sample=False)
        first = time.perf_counter() - t0  # preprocessing is shared (done once above): HF's TTFT is model time
        t0 = time.perf_counter()
        out = model.generate(**hf_inputs, max_new_tokens=N, min_new_tokens=N, do_sample=False)
        whole = time.perf_counter() - t0
        return first, (whole - first) / (N - 1), out[0, len(rows[0]):].tolist()

    log(f"prompt: {len(rows[0])} tokens ({len(inputs[0][0].frames)} tiles); {N} new tokens; {args.rounds} rounds")
    contenders = (("vlmedge", lambda: ours(fp32)), ("hf", theirs), ("vlmedge-ort-target", lambda: ours(ort)),
                  ("hf-sdpa", lambda: theirs(sdpa)), ("vlmedge-int4", lambda: ours(q4)))
    for _, fn in contenders:  # warm-up
        fn()
    times = {name: [] for name, _ in contenders}
    tokens = {}
    for r in range(args.rounds):
        for name, fn in contenders:
            first, per, ids = fn()
            times[name].append((first, per))
            tokens[name] = ids
            time.sleep(PAUSE)
        log(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1][0] * 1000:.0f} / {v[-1][1] * 1000:.1f} ms" for k, v in times.items()))
    res = {k: {"first_token_ms": median_ms([a for a, _ in v]), "per_token_ms": median_ms([b for _, b in v])} for k, v in times.items()}
    res["same_tokens_as_hf"] = {k: tokens[k] == tokens["hf"] for k in ("vlmedge", "vlmedge-ort-target", "hf-sdpa")}
    res["ratios"] = {
        "hf / vlmedge first token": round(res["hf"]["first_token_ms"] / res["vlmedge"]["first_token_ms"], 2),
        "hf / vlmedge per token": round(res["hf"]["per_token_ms"] / res["vlmedge"]["per_token_ms"], 2),
        "hf / vlmedge-ort-target first token": round(res["hf"]["first_token_ms"] / res["vlmedge-ort-target"]["first_token_ms"], 2),
        "hf / vlmedge-ort-target per token": round(res["hf"]["per_token_ms"] / res["vlmedge-ort-target"]["per_token_ms"], 2),
        "hf-sdpa / vlmedge-ort-target first token": round(res["hf-sdpa"]["first_token_ms"] / res["vlmedge-ort-target"]["first_token_ms"], 2),
        "hf-sdpa / vlmedge-ort-target per token": round(res["hf-sdpa"]["per_token_ms"] / res["vlmedge-ort-target"]["per_token_ms"], 2),
        "int4 / fp32 per token": round(res["vlmedge-int4"]["per_token_ms"] / res["vlmedge"]["per_token_ms"], 3),
    }
    res["floor"] = floor(bundle, res["vlmedge"]["per_token_ms"])
    res["first_token_floor"] = compute_floor(hf, hf_inputs, res)
    res["peak_rss_mb"] = {name: peak_rss(path, question) for name, path in (("fp32", bundle), ("int4-wo", int4))}
    res["prompt_tokens"], res["tiles"], res["new_tokens"] = len(rows[0]), len(inputs[0][0].frames), N
    return res


def floor(bundle: Path, per_token_ms: float) -> dict:
    import numpy as np
    import onnx

    from bandwidth import stream_read, sysbench_read

    m = onnx.load(str(bundle / "decoder.onnx"), load_external_data=False)
    sizes = {onnx.TensorProto.FLOAT: 4, onnx.TensorProto.FLOAT16: 2}
    weight_bytes = sum(int(np.prod(i.dims)) * sizes[i.data_type] for i in m.graph.initializer if i.data_type in sizes)
    bw, sb = stream_read(THREADS), sysbench_read(THREADS)
    return {"decoder_weight_mb": round(weight_bytes / 1e6, 1), "stream_read_gbps": round(bw / 1e9, 2),
            "sysbench_read_gbps": round(sb / 1e9, 2) if sb else None, "floor_ms": round(weight_bytes / bw * 1000, 2),
            "per_token_over_floor": round(per_token_ms / (weight_bytes / bw * 1000), 2)}


def gemm_rate(m: int, k: int, n: int, repeats: int = 7) -> float:
    """ONNX Runtime's sustained float32 MatMul rate (FLOP/s) on THREADS threads, best of `repeats`, at
    one shape: the vision tower's MLP (its largest product)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
                              [numpy_helper.from_array(rng.random((k, n), dtype=np.float32), "w")])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
                                so, providers=["CPUExecutionProvider"])
    x = rng.random((m, k), dtype=np.float32)
    sess.run(None, {"x": x})
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"x": x})
        best = min(best, time.perf_counter() - t0)
    return 2 * m * k * n / best


def compute_floor(hf, hf_inputs: dict, res: dict) -> dict:
    """The first token's arithmetic, counted by PyTorch on HF's own first-token pass (vision tower,
    connector, prompt, LM head), over the machine's best float32 MatMul rate: no FP32 runtime computes
    the first token faster than that."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        hf.generate(**hf_inputs, max_new_tokens=1, do_sample=False)
    flops = counter.get_total_flops()
    vision = hf.config.vision_config
    tokens = (vision.image_size // vision.patch_size) ** 2
    rate = gemm_rate(tokens, vision.hidden_size, vision.intermediate_size)
    floor_ms = flops / rate * 1000
    return {"gflop": round(flops / 1e9, 1), "matmul_gflops": round(rate / 1e9, 1), "floor_ms": round(floor_ms, 1),
            "vlmedge_over_floor": round(res["vlmedge"]["first_token_ms"] / floor_ms, 2),
            "hf_over_floor": round(res["hf"]["first_token_ms"] / floor_ms, 2),
            "hf_sdpa_over_floor": round(res["hf-sdpa"]["first_token_ms"] / floor_ms, 2),
            "first_token_for_1_5x_ms": round(res["hf"]["first_token_ms"] / 1.5, 1)}


def peak_rss(bundle: Path, question: str) -> dict:
    """A fresh process: RSS after `import vlmedge`, and the high-water mark after load + one answer."""
    code = (
        "import re, vlmedge; from vlmedge.data.scenes import scenes; s = next(scenes('test', 0, 1))\n"
        "rss = lambda f: int(re.search(f + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
        f"base = rss('VmRSS'); p = vlmedge.load({str(bundle)!r}, threads=2); p.vqa(s.image, {question!r}, max_new_tokens=8)\n"
        "print(base, rss('VmHWM'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    base, peak = int(out[-2]), int(out[-1])
    files = sum(f.stat().st_size for f in bundle.iterdir() if f.suffix in (".onnx", ".data"))
    return {"after_import_mb": base, "peak_mb": peak, "rise_mb": peak - base, "bundle_mb": round(files / 1e6, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".work" / "decoder-only"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=20)
    ap.add_argument("--longest-edge", type=int, default=512, choices=(512, 1024, 2048))
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    res = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "threads": THREADS,
                       "load_average_before": os.getloadavg()}, **run(args)}
    res["machine"]["load_average_after"] = os.getloadavg()
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
