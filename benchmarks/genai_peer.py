"""Peer measurement of the decoder-only runtime: vlmedge's `decoder` graph against onnxruntime-genai on
the same language-model weights (a SmolVLM's Llama), decode step per token at batch 1, on the CPU.

What it does:

1. Extracts the SmolVLM's language model (`model.model.text_model` + `model.lm_head`) as a plain
   `LlamaForCausalLM` directory in WORK/llama (same config values, the weights copied, tied embeddings
   kept tied where lm_head and embed_tokens are the same weights) with the SmolVLM directory's tokenizer
   files, and checks that its logits equal the SmolVLM text path's on random ids.
2. Creates once WORK/genai-venv (onnxruntime-genai from PyPI, which pulls its own onnxruntime, plus what
   its model builder imports: onnx, onnx-ir, transformers, torch CPU, tqdm) and runs the builder there:
   `-p fp32 -e cpu` -> WORK/genai-fp32, `-p int4 -e cpu` -> WORK/genai-int4 (the builder's defaults:
   MatMulNBits, block 32, symmetric RTN, accuracy_level 4 on the CPU EP, LM head included; the JSON
   reports what the graph holds).
3. Times the decode step: a prompt of --prompt-tokens random ids, then --new-tokens generated greedily
   at batch 1 (exactly that many: EOS masked until then on both sides, the same EOS ids on both sides).
   - genai: og.Generator, search options do_sample False, min_length = max_length = prompt + new; the
     session's intra_op_num_threads set through Config.overlay. It runs in ONE PERSISTENT SUBPROCESS
     (this file with --genai-worker, in the genai venv) that loads both models once and generates on
     request, so no model load is in any round.
   - vlmedge: `vlmedge.load(bundle, threads=T, shared_threads=True)` (as the CLI opens bundles: one
     process-wide pool of T intra-op threads) in its own persistent subprocess too (--vlmedge-worker,
     this venv, no torch imported), the prompt's embeddings from the bundle's `embed` graph,
     then vlmedge's own loop: `decode(pipe.decoder(...))` (the prompt call with the masked one-slot
     past, then one `embed` + `decoder` call per token, IOBinding, cache kept as OrtValues).
   Per token = one decode step: the model run on the previous token plus choosing the next one
   (vlmedge: Timings.tokens; genai: each generate_next_token call after the first, which only picks the
   token the prompt's logits give). N new tokens give N-1 steps. Per contender: the median over rounds of
   each round's mean step, and the median over all steps pooled. Contenders alternate within every round
   (their order rotated each round), after --warmup rounds, with a short pause between them so one's
   spinning pool threads do not take the other's cores.
4. Token agreement: the FP32 contenders' greedy tokens on the timed prompt and on --check-prompts more
   random prompts (genai fed the ids, vlmedge the `embed` graph's embeddings of the same ids), and the
   INT4 contenders' against each other (informational: two different INT4 quantizations).

The vlmedge bundles are made beforehand (the decoder's positions must hold prompt + new + 1):
    .venv/bin/vlmedge export SMOLVLM --out BUNDLE
    .venv/bin/vlmedge quantize BUNDLE --precision int4-wo --format matmulnbits --target onnxruntime \\
        --method rtn --lm-head --block-size 32 --out BUNDLE-int4
(quantize records calibration inputs and runs a held-out check; `--calib synthetic:16 --held-out 8`
shortens that on a large model; RTN does not use the calibration data.)

Run:  .venv/bin/python benchmarks/genai_peer.py --smolvlm DIR --work DIR --bundle BUNDLE
      [--bundle-int4 BUNDLE-int4] [--prompt-tokens 100] [--new-tokens 32] [--rounds 10] [--warmup 1]
      [--threads 2] [--check-prompts 2] [--json PATH]
The JSON goes to stdout (and --json); progress to stderr. WORK caches the Llama, the venv and the
genai models (delete a folder to rebuild it). Without --bundle-int4 only FP32 is compared.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from json_worker import JsonWorker  # (benchmarks/, this script's folder)

ROOT = Path(__file__).resolve().parent.parent
GENAI_PACKAGE = "onnxruntime-genai==0.18.0"  # the newest on PyPI that installed here (Python 3.11, x86_64)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
PAUSE = 0.05  # seconds between contenders


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# -- the genai worker (runs in the genai venv: onnxruntime_genai and numpy only) ---------------------------


def genai_worker(models: list[str], threads: int) -> None:
    """JSON lines on stdin -> JSON lines on stdout. Request: {"model", "ids", "new"}; reply: {"tokens" (new
    ones), "prefill_s" (append_tokens), "first_s" (first generate_next_token), "steps_s" (the others)}."""
    import importlib.metadata as md

    import numpy as np
    import onnxruntime_genai as og

    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol stream; anything else printed (Python or
    os.dup2(2, 1)  # onnxruntime's native logs) goes to stderr
    sys.stdout = sys.stderr
    loaded, configs = {}, {}
    for spec in models:
        name, path = spec.split("=", 1)
        cfg = og.Config(path)
        cfg.clear_providers()  # CPU
        overlay = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
        cfg.overlay(json.dumps(overlay))
        loaded[name] = og.Model(cfg)
        configs[name] = json.loads((Path(path) / "genai_config.json").read_text())
    hello = {"ready": True, "onnxruntime_genai": og.__version__, "onnxruntime": md.version("onnxruntime"),
             "session_options": {n: {**c["model"]["decoder"].get("session_options", {}), **overlay["model"]["decoder"]["session_options"]}
                                 for n, c in configs.items()},
             "eos_token_id": {n: c["model"].get("eos_token_id") for n, c in configs.items()},
             "search": {n: c.get("search") for n, c in configs.items()}}
    out.write(json.dumps(hello) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        model = loaded[req["model"]]
        ids = np.asarray(req["ids"], dtype=np.int32)
        total = len(ids) + int(req["new"])
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=total, min_length=total, batch_size=1)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)
        prefill = time.perf_counter() - t0
        times = []
        while not gen.is_done():
            t0 = time.perf_counter()
            gen.generate_next_token()
            times.append(time.perf_counter() - t0)
        seq = np.asarray(gen.get_sequence(0)).tolist()
        del gen
        out.write(json.dumps({"tokens": seq[len(ids):], "prefill_s": prefill, "first_s": times[0] if times else None,
                              "steps_s": times[1:]}) + "\n")
        out.flush()


def vlmedge_worker(bundles: list[str], threads: int, shared: bool) -> None:
    """The same protocol as genai_worker, for vlmedge bundles (request: {"model", "ids", "new", "eos"})."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    sys.path.insert(0, str(ROOT))
    loaded = {}
    for spec in bundles:
        name, path = spec.split("=", 1)
        loaded[name] = VlmedgeContender(Path(path), threads, shared)
    hello = {"ready": True, "bundles": {n: {"pool": c.pool, "backend": c.pipe.backend.summary, "target": c.pipe.manifest.target,
                                            "precision": c.pipe.manifest.precision.get("dtype"), "dims": c.pipe.manifest.dims,
                                            "task": c.task} for n, c in loaded.items()}}
    out.write(json.dumps(hello) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        if req.get("quit"):
            break
        c = loaded[req["model"]]
        if "room" in req:
            out.write(json.dumps({"room": c.pipe.max_new_tokens(c.task, int(req["room"]))}) + "\n")
            continue
        out.write(json.dumps(c.generate(req["ids"], int(req["new"]), req["eos"])) + "\n")


class Worker(JsonWorker):
    """A persistent contender subprocess (this file with --genai-worker or --vlmedge-worker)."""

    def __init__(self, python: Path, args: list[str]):
        super().__init__([str(python), str(Path(__file__).resolve()), *args])

    def generate(self, model: str, ids: list[int], new: int, eos: list[int] | None = None) -> dict:
        return self.ask({"model": model, "ids": ids, "new": new, "eos": eos})


# -- the Llama out of the SmolVLM ----------------------------------------------------------------------------

CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                 "intermediate_size", "rms_norm_eps", "vocab_size", "max_position_embeddings", "hidden_act",
                 "attention_bias", "mlp_bias", "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id")


def digest(folder: Path, names) -> str:
    h = hashlib.sha256()
    for name in sorted(names):
        p = folder / name
        if p.is_file():
            h.update(name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def extract_llama(smolvlm: Path, out: Path) -> dict:
    """WORK/llama: the SmolVLM's LM as a LlamaForCausalLM directory, checked against the SmolVLM text path."""
    weights = [p.name for p in smolvlm.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")]
    source = digest(smolvlm, ["config.json", *weights])
    stamp = out / "extracted-from.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("source") == source:
        return json.loads(stamp.read_text())
    import torch
    import transformers
    from transformers import GenerationConfig, LlamaForCausalLM

    log(f"extracting the language model of {smolvlm} -> {out}")
    cfg = transformers.AutoConfig.from_pretrained(smolvlm)
    arch = (cfg.architectures or ["SmolVLMForConditionalGeneration"])[0]
    vlm = getattr(transformers, arch).from_pretrained(smolvlm, dtype=torch.float32).eval()
    text, head = vlm.model.text_model, vlm.lm_head
    emb = text.get_input_embeddings().weight
    tied = head.weight.data_ptr() == emb.data_ptr() or (head.weight.shape == emb.shape and torch.equal(head.weight, emb))
    tc = cfg.text_config
    if tc.model_type != "llama":
        raise SystemExit(f"{smolvlm}: the text model is {tc.model_type}, not llama")
    lcfg = transformers.LlamaConfig(**{k: v for k, v in tc.to_dict().items()
                                       if k not in ("architectures", "model_type", "transformers_version", "tie_word_embeddings")})
    lcfg.architectures = ["LlamaForCausalLM"]
    lcfg.tie_word_embeddings = bool(tied)
    lcfg.dtype = "float32"
    torch.manual_seed(0)
    llama = LlamaForCausalLM(lcfg).eval()
    missing = llama.model.load_state_dict(text.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys, missing
    with torch.no_grad():
        llama.lm_head.weight.copy_(head.weight)
    try:
        llama.generation_config = GenerationConfig.from_pretrained(smolvlm)
    except OSError:
        pass
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    llama.save_pretrained(tmp)
    copied = [n for n in TOKENIZER_FILES if (smolvlm / n).is_file()]
    for n in copied:
        shutil.copy2(smolvlm / n, tmp / n)
    # the check: the saved directory's logits against the SmolVLM text path
    back = LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, tc.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        ref = vlm.lm_head(vlm.model.text_model(input_ids=ids).last_hidden_state)
        got = back(input_ids=ids).logits
    err = float((ref - got).abs().max())
    scale = float(ref.abs().max())
    if not err <= 1e-5 * max(1.0, scale):
        raise SystemExit(f"extracted Llama differs from the SmolVLM text path: max abs error {err:.3g} (logits up to {scale:.3g})")
    fields = {k: getattr(tc, k, None) for k in CONFIG_FIELDS}
    saved = json.loads((tmp / "config.json").read_text())
    for k, v in fields.items():
        if k in saved and saved[k] != v:
            raise SystemExit(f"extracted config.{k} = {saved[k]!r}, SmolVLM text_config.{k} = {v!r}")
    info = {"source": source, "smolvlm": str(smolvlm), "architecture": arch, "tie_word_embeddings": bool(tied),
            "tokenizer_files": copied, "check": {"ids": list(ids.shape), "max_abs_error": err, "logits_max_abs": scale},
            "params": sum(p.numel() for p in back.parameters()), "config": {k: saved.get(k) for k in CONFIG_FIELDS}}
    (tmp / stamp.name).write_text(json.dumps(info, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"  logits equal (max abs error {err:.2e}); tied embeddings: {tied}; tokenizer: {', '.join(copied)}")
    return info


# -- onnxruntime-genai: its venv and its builder ---------------------------------------------------------------


def ensure_venv(venv: Path, package: str) -> Path:
    """WORK/genai-venv, created once: onnxruntime-genai (with its own onnxruntime) and the builder's imports."""
    python = venv / "bin" / "python"
    ready = venv / ".genai-peer-ready"
    if ready.is_file():
        return python
    from importlib import metadata

    log(f"creating {venv} with {package} (a few minutes)")
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", "--clear", str(venv)], check=True)
    pins = [package, "onnx", "onnx-ir", "tqdm", f"torch=={metadata.version('torch').split('+')[0]}",
            f"transformers=={metadata.version('transformers')}", "safetensors", "numpy"]
    subprocess.run([str(python), "-m", "pip", "install", "-q", *pins], check=True)
    listed = subprocess.run([str(python), "-m", "pip", "list", "--format", "json"], check=True, capture_output=True, text=True)
    ready.write_text(listed.stdout)
    return python


def build_genai(python: Path, llama: Path, out: Path, precision: str, cache: Path, source: str) -> Path:
    """Run the builder (once per source and precision); the CPU EP, its defaults otherwise."""
    stamp = out / "built-from.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("source") == source:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(llama), "-o", str(tmp), "-p", precision,
           "-e", "cpu", "-c", str(cache)]
    log(f"builder: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.stderr.write(run.stdout[-4000:] + run.stderr[-4000:])
        raise SystemExit(f"the onnxruntime-genai builder failed ({precision}), exit status {run.returncode}")
    (tmp / "builder.log").write_text(run.stdout + run.stderr)
    (tmp / stamp.name).write_text(json.dumps({"source": source, "command": [str(out) if c == str(tmp) else c for c in cmd[1:]], "seconds": round(time.perf_counter() - t0, 1)}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def graph_facts(path: Path) -> dict:
    """Op histogram and MatMulNBits settings of an ONNX file (weights not loaded)."""
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    nbits = []
    for n in m.graph.node:
        key = f"{n.domain}:{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        ops[key] = ops.get(key, 0) + 1
        if n.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            nbits.append((a.get("bits"), a.get("block_size"), a.get("accuracy_level", 0)))
    facts = {"ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}
    if nbits:
        kinds = {}
        for b in nbits:
            kinds[b] = kinds.get(b, 0) + 1
        facts["matmulnbits"] = [{"bits": b, "block_size": s, "accuracy_level": a, "nodes": c} for (b, s, a), c in kinds.items()]
    return facts


def genai_file(folder: Path) -> str:
    return json.loads((folder / "genai_config.json").read_text())["model"]["decoder"].get("filename", "model.onnx")


def folder_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}


# -- vlmedge --------------------------------------------------------------------------------------------------


class VlmedgeContender:
    """A bundle opened as vlmedge opens it; one call = one greedy generation through PrefixDecoder."""

    def __init__(self, bundle: Path, threads: int, shared: bool):
        import vlmedge
        from vlmedge.runtime.backends import onnxruntime as ortb

        self.pipe = vlmedge.load(bundle, threads=threads, shared_threads=shared)
        self.bundle = bundle
        self.task = "vqa" if "vqa" in self.pipe.manifest.tasks else next(iter(self.pipe.manifest.tasks))
        self.pool = "shared" if ortb._shared_pool.get("size") is not None else "per-session"

    def generate(self, ids: list[int], new: int, eos: list[int]) -> dict:
        import numpy as np

        from vlmedge.runtime.decoding import GenerationConfig, Timings, decode

        pipe = self.pipe
        prompt = np.asarray([ids], dtype=np.int64)
        mask = np.ones_like(prompt)
        settings = pipe.settings(self.task, GenerationConfig(max_new_tokens=new, min_new_tokens=new, num_beams=1,
                                                         eos_token_id=eos), prompt.shape[1])
        t0 = time.perf_counter()
        embeds = np.array(pipe.backend.to_host(pipe.backend.run("embed", {"input_ids": prompt})["inputs_embeds"]))
        t_embed = time.perf_counter() - t0
        timings = Timings()
        rows = decode(pipe.decoder(embeds, mask), prompt, settings, timings)  # as the pipeline decodes
        return {"tokens": rows[0], "prefill_s": t_embed + timings.first_token, "steps_s": list(timings.tokens)}


# -- the run --------------------------------------------------------------------------------------------------


def summarise(rounds: list[dict]) -> dict:
    steps = [s for r in rounds for s in r["steps_s"]]
    per_round = [sum(r["steps_s"]) / len(r["steps_s"]) for r in rounds if r["steps_s"]]
    return {"per_token_ms": 1e3 * median(per_round), "per_token_ms_pooled_median": 1e3 * median(steps),
            "per_token_ms_rounds": [round(1e3 * x, 4) for x in per_round], "steps_per_round": len(rounds[0]["steps_s"]),
            "prefill_ms": 1e3 * median([r["prefill_s"] for r in rounds]),
            # genai: the first generate_next_token only picks the token of the prompt's logits (a check that
            # append_tokens ran the prompt and that the N-1 later calls are the decode steps)
            **({"first_call_ms": 1e3 * median([r["first_s"] for r in rounds])} if "first_s" in rounds[0] else {})}


def agreement(a: list[int], b: list[int]) -> dict:
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return {"match": a == b, "common_prefix": same, "length": [len(a), len(b)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smolvlm", type=Path, help="save_pretrained directory of a SmolVLMForConditionalGeneration")
    ap.add_argument("--work", type=Path, help="cache: llama/, genai-venv/, genai-fp32/, genai-int4/")
    ap.add_argument("--bundle", type=Path, help="vlmedge FP32 bundle of the same SmolVLM (vlmedge export)")
    ap.add_argument("--bundle-int4", type=Path, help="its weight-only INT4 MatMulNBits variant (vlmedge quantize)")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of both runtimes")
    ap.add_argument("--vlmedge-pool", choices=("shared", "per-session"), default="shared",
                    help="vlmedge: one process-wide pool (as the CLI) or one per session (vlmedge.load's default)")
    ap.add_argument("--check-prompts", type=int, default=2, help="extra random prompts for the token agreement check")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--genai-package", default=GENAI_PACKAGE)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--genai-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--genai-models", nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--vlmedge-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--vlmedge-bundles", nargs="*", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.genai_worker:
        return genai_worker(args.genai_models, args.threads)
    if args.vlmedge_worker:
        return vlmedge_worker(args.vlmedge_bundles, args.threads, args.vlmedge_pool == "shared")
    for name in ("smolvlm", "work", "bundle"):
        if getattr(args, name) is None:
            ap.error(f"--{name.replace('_', '-')} is required")
    if args.new_tokens < 2 or args.prompt_tokens < 1 or args.rounds < 1:
        ap.error("--new-tokens >= 2, --prompt-tokens >= 1, --rounds >= 1")

    sys.path.insert(0, str(ROOT))
    import numpy as np
    import onnxruntime

    import vlmedge

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    llama_info = extract_llama(args.smolvlm.resolve(), work / "llama")
    python = ensure_venv(work / "genai-venv", args.genai_package)
    precisions = ["fp32"] + (["int4"] if args.bundle_int4 else [])
    genai_dirs = {p: build_genai(python, work / "llama", work / f"genai-{p}", p, work / "genai-cache", llama_info["source"])
                  for p in precisions}

    # each runtime in its own fresh process, loaded once: neither shares its process (its allocator, its
    # pages, the other's imports) with the other or with this script's torch
    bundles = {"fp32": args.bundle.resolve(), **({"int4": args.bundle_int4.resolve()} if args.bundle_int4 else {})}
    log(f"starting the vlmedge worker ({', '.join(bundles)})")
    vworker = Worker(Path(sys.executable), ["--vlmedge-worker", "--threads", str(args.threads), "--vlmedge-pool", args.vlmedge_pool,
                                            "--vlmedge-bundles", *(f"{n}={p}" for n, p in bundles.items())])
    dims = vworker.info["bundles"]["fp32"]["dims"]
    cfg = llama_info["config"]
    if int(dims["vocab_size"]) != cfg["vocab_size"] or int(dims["decoder_layers"]) != cfg["num_hidden_layers"]:
        raise SystemExit(f"{args.bundle}: vocab {dims['vocab_size']} / layers {dims['decoder_layers']} are not the "
                         f"SmolVLM's ({cfg['vocab_size']} / {cfg['num_hidden_layers']}): another model's bundle?")
    for p, b in bundles.items():
        room = vworker.ask({"model": p, "room": args.prompt_tokens})["room"]
        if room < args.new_tokens:
            raise SystemExit(f"{b}: {args.prompt_tokens} prompt tokens leave {room} new tokens "
                             f"(axes.total_len); export with a larger --max-length")

    log(f"starting the genai worker ({', '.join(genai_dirs)})")
    worker = Worker(python, ["--genai-worker", "--threads", str(args.threads), "--genai-models", *(f"{n}={p}" for n, p in genai_dirs.items())])
    eos = worker.info["eos_token_id"]["fp32"]
    eos = [int(e) for e in (eos if isinstance(eos, list) else [eos])]

    rng = np.random.default_rng(args.seed)
    vocab = cfg["vocab_size"]
    prompt = rng.integers(0, vocab, args.prompt_tokens).tolist()
    contenders = []
    for p in precisions:
        contenders.append((f"vlmedge-{p}", lambda ids, p=p: vworker.generate(p, ids, args.new_tokens, eos)))
        contenders.append((f"genai-{p}", lambda ids, p=p: worker.generate(p, ids, args.new_tokens)))
    results: dict[str, list[dict]] = {name: [] for name, _ in contenders}
    tokens: dict[str, list[list[int]]] = {name: [] for name, _ in contenders}
    try:
        for r in range(args.warmup + args.rounds):
            k = r % len(contenders)
            for name, run in contenders[k:] + contenders[:k]:
                time.sleep(PAUSE)
                out = run(prompt)
                if len(out["tokens"]) != args.new_tokens:
                    raise SystemExit(f"{name}: {len(out['tokens'])} new tokens, not {args.new_tokens}")
                tokens[name].append(out["tokens"])
                if r >= args.warmup:
                    results[name].append(out)
            if r < args.warmup:
                log(f"round {r + 1}/{args.warmup + args.rounds} (warm-up) done")
            else:
                log(f"round {r + 1}/{args.warmup + args.rounds}: " + ", ".join(
                    f"{n} {1e3 * sum(results[n][-1]['steps_s']) / len(results[n][-1]['steps_s']):.3f} ms/token"
                    for n, _ in contenders))
        # token agreement: the timed prompt plus more random prompts
        checks: dict[str, list] = {p: [] for p in precisions}
        extra = [rng.integers(0, vocab, args.prompt_tokens).tolist() for _ in range(args.check_prompts)]
        for i, ids in enumerate([prompt, *extra]):
            for p in precisions:
                a = tokens[f"vlmedge-{p}"][0] if i == 0 else vworker.generate(p, ids, args.new_tokens, eos)["tokens"]
                b = tokens[f"genai-{p}"][0] if i == 0 else worker.generate(p, ids, args.new_tokens)["tokens"]
                checks[p].append({"prompt": i, **agreement(a, b), **({"vlmedge": a, "genai": b} if i == 0 else {})})
    finally:
        worker.close()
        vworker.close()
    stable = {n: all(t == ts[0] for t in ts) for n, ts in tokens.items()}

    summary = {n: summarise(rs) for n, rs in results.items()}
    report = {
        "what": "decode step per token (model run on the previous token + choice of the next), batch 1, greedy, CPU",
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rounds": args.rounds, "warmup": args.warmup,
        "threads": args.threads,
        "per_token_ms": {n: round(s["per_token_ms"], 4) for n, s in summary.items()},
        "ratios": {f"vlmedge_{p} / genai_{p}": round(summary[f"vlmedge-{p}"]["per_token_ms"] / summary[f"genai-{p}"]["per_token_ms"], 4)
                   for p in precisions},
        "contenders": summary,
        "tokens": {"fp32_vlmedge_equals_genai": all(c["match"] for c in checks["fp32"]), "checks": checks,
                   "same_tokens_every_round": stable, "eos_token_id_masked": eos},
        "versions": {"onnxruntime_genai": worker.info["onnxruntime_genai"], "genai_onnxruntime": worker.info["onnxruntime"],
                     "vlmedge": vlmedge.__version__, "vlmedge_onnxruntime": onnxruntime.__version__,
                     "python": sys.version.split()[0]},
        "setup": {
            "genai": {"process": "one persistent subprocess (both models loaded once), JSON lines over pipes",
                      "session_options": worker.info["session_options"], "search": "do_sample False, min_length = max_length = prompt + new",
                      "models": {p: {"dir": str(d), "files": folder_files(d), "builder": json.loads((d / "built-from.json").read_text())["command"],
                                     **graph_facts(d / genai_file(d))} for p, d in genai_dirs.items()}},
            "vlmedge": {p: {"bundle": str(b), "process": "one persistent subprocess (its bundles loaded once), JSON lines over pipes",
                            **{k: v for k, v in vworker.info["bundles"][p].items() if k != "dims"},
                            "decoder": {"bytes": (b / "decoder.onnx").stat().st_size, **graph_facts(b / "decoder.onnx")}}
                        for p, b in bundles.items()},
        },
        "model": {"source": llama_info["smolvlm"], "params_lm": llama_info["params"], **llama_info["config"],
                  "tie_word_embeddings": llama_info["tie_word_embeddings"], "extraction_check": llama_info["check"]},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
