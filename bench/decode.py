"""Prefill and decode speed on the `mid` preset against the memory-bandwidth roofline (and against
llama.cpp on the same weights when llama-cpp-python and the GGUF exporter are available).

    python bench/decode.py [--workdir /tmp/grok1-bench] [--threads 2] [--rounds 3] [--profile]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import mid_models, save, table  # noqa: E402

import grok1  # noqa: E402
from grok1.config import PRESETS  # noqa: E402
from grok1.generate import GenerationStats, SamplingParams, stream_batch  # noqa: E402


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> float:
    """Best of several reads of a buffer far larger than the caches (GB/s)."""
    torch.set_num_threads(threads)
    buf = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        buf.sum()
        best = max(best, buf.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(b.numel() * b.element_size() for b in value.buffers())


def active_bytes(model) -> int:
    """Weight bytes one decoded token reads: attention, router, norms, the chosen experts' share of
    each expert stack, and the output head (the bf16 embedding table, or its quantised copy) — as
    stored."""
    cfg = model.config
    total = 0
    for path, value in model.named_official_weights():
        if path.endswith("in_out_embed/embeddings"):
            total += tensor_bytes(value if model.head is None else model.head)
        elif "/moe/linear" in path:
            total += tensor_bytes(value) * cfg.num_selected_experts // cfg.num_experts
        else:
            total += tensor_bytes(value)
    return total


def run_grok1(model, prompt: list[int], new_tokens: int, profile: bool = False) -> dict:
    greedy = SamplingParams(temperature=0)
    list(stream_batch(model, [prompt[:16]], max_new_tokens=4, sampling=greedy, ignore_eos=True))  # warm-up
    stats = GenerationStats()
    tokens = [t for _, t in stream_batch(model, [prompt], max_new_tokens=new_tokens, sampling=greedy,
                                         ignore_eos=True, stats=stats)]
    result = {"prefill_tok_s": stats.prefill_tokens_per_s, "decode_tok_s": stats.decode_tokens_per_s,
              "active_bytes": active_bytes(model), "tokens": tokens}
    if profile:
        result["profile"] = profile_decode(model, prompt)
    return result


def profile_decode(model, prompt: list[int], steps: int = 64) -> str:
    """Where a decode step's time goes, per function (the kernels are single calls from Python, so a
    Python-level profile attributes all their time; torch.profiler sees only the tensor operations)."""
    import cProfile
    import pstats

    cache = model.new_cache(1, len(prompt) + steps + 1)
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), cache, torch.tensor([0]), logits_index=torch.tensor([len(prompt) - 1]))
        token = logits[:, -1].argmax(-1, keepdim=True)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        for i in range(steps):
            logits = model(token, cache, torch.tensor([len(prompt) + i]))
            token = logits[:, -1].argmax(-1, keepdim=True)
        profiler.disable()
        per_step = (time.perf_counter() - started) / steps
    stats = pstats.Stats(profiler).stats
    rows = sorted(((v[2], v[1], k) for k, v in stats.items()), reverse=True)[:12]  # (own time, calls, where)
    lines = [f"decode step: {per_step * 1e3:.2f} ms under the profiler ({steps} steps)",
             f"{'own time per step':>18}  {'share':>6}  {'calls/step':>10}  function"]
    for own, calls, (file, line, name) in rows:
        where = name if file == "~" else f"{os.path.basename(file)}:{line}({name})"
        lines.append(f"{own / steps * 1e3:>15.3f} ms  {100 * own / steps / per_step:>5.1f} %  {calls / steps:>10.1f}  {where}")
    return "\n".join(lines)


def run_llama_cpp(llm, prompt: list[int], new_tokens: int) -> dict:
    """The same prompt through llama.cpp: prefill, then greedy decode one token at a time."""
    import numpy as np

    llm.reset()
    llm.eval(prompt[:16])  # warm-up
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - start
    token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    tokens = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        tokens.append(token)
    decode_s = time.perf_counter() - start
    return {"prefill_tok_s": len(prompt) / prefill_s, "decode_tok_s": (new_tokens - 1) / decode_s, "tokens": tokens}


def best_of(runs: list[dict]) -> dict:
    """The fastest prefill and the fastest decode of repeated runs (the machine's other load only ever
    slows a run down), with every run's figures kept."""
    best = dict(runs[0])
    best["prefill_tok_s"] = max(r["prefill_tok_s"] for r in runs)
    best["decode_tok_s"] = max(r["decode_tok_s"] for r in runs)
    best["runs"] = [{"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"]} for r in runs]
    return best


def export_gguf(release: str, dst: str, quant: str) -> str | None:
    try:
        from grok1.formats.gguf import write_gguf
        from grok1.loader import read_weights
    except ImportError:
        return None
    if not os.path.isfile(dst):
        config, items, _ = read_weights(release)
        write_gguf(items, config, dst, quant=quant, force=True, progress=False)
    return dst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/grok1-bench")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the best of each is reported")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = PRESETS["mid"]
    release, paths = mid_models(args.workdir)
    bandwidth = read_bandwidth(args.threads)
    prompt = torch.randint(3, config.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    results: dict = {"threads": args.threads, "read_bandwidth_gb_s": bandwidth, "config": "mid", "rounds": args.rounds}
    rows = [("machine read bandwidth", f"{bandwidth:.1f} GB/s (best of 5 reads of 1 GiB, {args.threads} threads)")]
    try:
        import llama_cpp

        have_llama = True
    except ImportError:
        have_llama = False
        rows.append(("llama.cpp", "not installed (pip install -e '.[dev]' brings llama-cpp-python)"))
    gguf_types = {"int8": "q8_0", "int4": "q4_0"}
    for quant, path in paths.items():
        # The output head as llama.cpp's file of the same type stores it (Q8_0 / Q4_0 token_embd), the
        # like-for-like comparison; and as bfloat16, the exact head.
        models = {head: grok1.load(path, head=head) for head in (quant, "bf16")}
        llm = None
        if have_llama:
            gguf = export_gguf(release, os.path.join(args.workdir, f"mid-{gguf_types[quant]}.gguf"), gguf_types[quant])
            llm = llama_cpp.Llama(gguf, n_ctx=len(prompt) + args.new_tokens + 8, n_batch=512, n_threads=args.threads,
                                  n_threads_batch=args.threads, verbose=False)
        runs: dict[str, list[dict]] = {head: [] for head in models}
        llama_runs: list[dict] = []
        for round_ in range(args.rounds):  # interleaved, so both engines see the same machine
            for head, model in models.items():
                runs[head].append(run_grok1(model, prompt, args.new_tokens, args.profile and round_ == 0))
            if llm is not None:
                llama_runs.append(run_llama_cpp(llm, prompt, args.new_tokens))
        for head, head_runs in runs.items():
            r = best_of(head_runs)
            roofline = bandwidth * 1e9 / r["active_bytes"]
            r["roofline_tok_s"] = roofline
            r["roofline_fraction"] = r["decode_tok_s"] / roofline
            key = f"grok1_{quant}" if head == quant else f"grok1_{quant}_bf16_head"
            results[key] = {k: v for k, v in r.items() if k != "profile"}
            label = f"grok1 {quant}, {head} head"
            rows += [
                (f"{label}: active bytes per token", f"{r['active_bytes'] / 1e6:.1f} MB (output head included)"),
                (f"{label}: prefill ({args.prompt_tokens} tokens)", f"{r['prefill_tok_s']:.1f} tok/s"),
                (f"{label}: decode ({args.new_tokens} tokens)", f"{r['decode_tok_s']:.1f} tok/s = "
                 f"{100 * r['roofline_fraction']:.0f} % of the roofline ({roofline:.1f} tok/s)"),
            ]
            if args.profile:
                print(f"profile of decode steps, {label}:\n{head_runs[0]['profile']}")
        if llama_runs:
            r = best_of(llama_runs)
            ours = results[f"grok1_{quant}"]
            results[f"llama_cpp_{gguf_types[quant]}"] = r
            rows += [
                (f"llama.cpp {gguf_types[quant]}: prefill", f"{r['prefill_tok_s']:.1f} tok/s; grok1 {quant} / llama.cpp = "
                 f"{ours['prefill_tok_s'] / r['prefill_tok_s']:.2f}x"),
                (f"llama.cpp {gguf_types[quant]}: decode", f"{r['decode_tok_s']:.1f} tok/s; grok1 {quant} / llama.cpp = "
                 f"{ours['decode_tok_s'] / r['decode_tok_s']:.2f}x"),
            ]
    print(table(rows, f"decode on the mid preset, {args.threads} threads"))
    print(f"wrote {save('decode', results)}")


if __name__ == "__main__":
    main()
