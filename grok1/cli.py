"""The `grok1` command: a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Sequence

from .config import PRESETS, Grok1Config, preset
from .errors import Grok1Error
from .units import human, parse_size

DEMO_PROMPT = "The model reads a sequence of tokens and"


def peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _token_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise Grok1Error(f"--token-ids must be comma-separated integers, got {text!r}") from None


def _world() -> tuple[int, int]:
    """(rank, world size) when launched by torchrun (or with RANK/WORLD_SIZE set), else (0, 1)."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise Grok1Error("RANK and WORLD_SIZE must be integers") from None


def _load_for_generate(args: argparse.Namespace, progress: bool, max_memory: int | None = None):
    """The model, on one device or (under torchrun) this rank's part of it across the process group."""
    from .loader import load

    _, world = _world()
    devices = args.devices or args.device
    if world == 1:
        if args.devices:
            from .parallel import rank_device

            devices = rank_device(args.devices, 0, 1)
        return load(args.model, dtype=args.dtype, device=devices, progress=progress, exact=args.exact, head=args.head,
                    max_memory=max_memory)
    from . import parallel

    if args.head != "bf16":
        raise Grok1Error("--head int8 is not available across several processes yet")
    parallel.check(args.model, world)  # refuse sizes that do not split before waiting for the other ranks
    group = parallel.init(devices)
    model = parallel.load(args.model, group, dtype=args.dtype, exact=args.exact)
    args.seed = group.shared_seed(args.seed)  # every rank samples from the same logits with the same seed
    return model


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import GenerationStats, StopStringFilter, stream
    from .tokenizer import Tokenizer, find_tokenizer

    if args.max_new_tokens < 0:
        raise Grok1Error(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    tokenizer_path = args.tokenizer or find_tokenizer(args.model)
    tokenizer = Tokenizer(tokenizer_path) if tokenizer_path else None
    if args.prompt is not None:
        if tokenizer is None:
            raise Grok1Error(
                f"--prompt needs a tokenizer: none found in {args.model}; pass --tokenizer PATH or use --token-ids"
            )
        prompt_ids = tokenizer.encode(args.prompt, add_bos=args.add_bos)
        if not prompt_ids:
            raise Grok1Error("--prompt encodes to no tokens")
    else:
        prompt_ids = _token_ids(args.token_ids)
        if not prompt_ids:
            raise Grok1Error("--token-ids is empty")

    rank, world = _world()
    weights_budget = None
    if args.max_memory is not None:
        if world > 1:
            raise Grok1Error("--max-memory is not available across several processes yet")
        weights_budget = _weights_budget(args, len(prompt_ids))
    started = time.perf_counter()
    model = _load_for_generate(args, progress=not args.json and rank == 0, max_memory=weights_budget)
    load_s = time.perf_counter() - started
    store = getattr(model, "expert_store", None)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise Grok1Error(
            f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} ids, the model only {model.config.vocab_size}"
        )

    stats = GenerationStats()
    new_ids: list[int] = []
    pieces: list[str] = []
    decoder = tokenizer.stream_decoder(at_start=False) if tokenizer else None
    stops = StopStringFilter(args.stop or [])
    out = sys.stdout if rank == 0 else open(os.devnull, "w")  # every rank generates, rank 0 prints
    if not args.json and tokenizer is not None and args.prompt is not None:
        out.write(args.prompt)
        out.flush()
    finish_reason = "length"
    after_prefill: tuple[dict, int | None] | None = None
    for token in stream(
        model,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        stats=stats,
    ):
        new_ids.append(token)
        if after_prefill is None:  # decode counters start after the prompt has been processed
            after_prefill = (store.snapshot() if store is not None else {}, io_read_bytes())
        if token == model.config.eos_token and not args.ignore_eos:
            finish_reason = "stop"
        if decoder is None:
            if not args.json:
                out.write(f"{token} ")
                out.flush()
            continue
        text = stops.push(decoder.push(token))
        pieces.append(text)
        if not args.json:
            out.write(text)
            out.flush()
        if stops.stopped:
            finish_reason = "stop"
            break
    if decoder is not None:
        tail = stops.push(decoder.flush()) + stops.flush()
        pieces.append(tail)
        if not args.json:
            out.write(tail)
    stats_obj = {
        "load_s": round(load_s, 4),
        "prefill_tokens_per_s": round(stats.prefill_tokens_per_s, 2),
        "decode_tokens_per_s": round(stats.decode_tokens_per_s, 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "prompt_tokens": len(prompt_ids),
        "new_tokens": len(new_ids),
        **_memory_stats(store, after_prefill, stats.decode_steps),
    }
    if world > 1:
        stats_obj["ranks"] = world
    if args.json:
        json.dump(
            {
                "prompt_token_ids": prompt_ids,
                "token_ids": new_ids,
                "text": "".join(pieces) if decoder is not None else None,
                "finish_reason": finish_reason,
                "stats": stats_obj,
            },
            out,
        )
        out.write("\n")
    elif rank == 0:
        out.write("\n")
        print(
            f"[{len(prompt_ids)} prompt tokens, {len(new_ids)} new; load {load_s:.2f} s, "
            f"prefill {stats.prefill_tokens_per_s:.1f} tok/s, decode {stats.decode_tokens_per_s:.1f} tok/s, "
            f"peak RSS {stats_obj['peak_rss_mb']:.0f} MB{_memory_summary(stats_obj)}]",
            file=sys.stderr,
        )
    return 0


def io_read_bytes() -> int | None:
    """Bytes this process has read from storage (Linux /proc/self/io), None where unavailable."""
    try:
        with open("/proc/self/io", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _weights_budget(args: argparse.Namespace, prompt_tokens: int) -> int:
    """--max-memory less this run's KV cache: what the weights may use (checked against the model)."""
    from .loader import resolve_dtype
    from .memory import check_max_memory, kv_cache_bytes, native_needs

    limit = parse_size(args.max_memory, "--max-memory")
    if args.model.lower().endswith(".gguf") or not os.path.isdir(args.model):
        raise Grok1Error(f"{args.model}: --max-memory needs a model in the native format (convert it with `grok1 convert`)")
    act = resolve_dtype(args.dtype)
    config, needs = native_needs(args.model, act)
    tokens = min(config.sequence_len, prompt_tokens + args.max_new_tokens)
    kv = kv_cache_bytes(config, tokens, act)
    return check_max_memory(limit, needs, act, "--max-memory", kv, f"the KV cache of {tokens} tokens")


def _memory_stats(store, after_prefill: tuple[dict, int | None] | None, decode_steps: int) -> dict:
    """Disk reads and expert cache hits per decoded token (the prompt's excluded)."""
    out: dict = {"bytes_read_per_token": None, "expert_cache_hit_rate": None}
    if after_prefill is None or decode_steps == 0:
        return out
    start, io_start = after_prefill
    io_now = io_read_bytes()
    if store is not None:
        now = store.snapshot()
        requests = (now["hits"] - start["hits"]) + (now["misses"] - start["misses"])
        out["bytes_read_per_token"] = round((now["bytes_read"] - start["bytes_read"]) / decode_steps)
        out["expert_cache_hit_rate"] = round((now["hits"] - start["hits"]) / requests, 4) if requests else None
        out["expert_reads_per_token"] = round((now["reads"] - start["reads"]) / decode_steps, 2)
        out["expert_stall_s"] = round(now["stall_s"] - start["stall_s"], 3)
        out["expert_budget_bytes"] = store.budget
    elif io_now is not None and io_start is not None:
        out["bytes_read_per_token"] = round((io_now - io_start) / decode_steps)  # page faults on the mapping
    if io_now is not None and io_start is not None:
        out["io_read_bytes_per_token"] = round((io_now - io_start) / decode_steps)
    return out


def _memory_summary(stats: dict) -> str:
    if stats.get("expert_cache_hit_rate") is None:
        return ""
    return (f"; {human(stats['bytes_read_per_token'])} read per decoded token, "
            f"expert cache hit rate {100 * stats['expert_cache_hit_rate']:.0f} %")


def _synth_config(args: argparse.Namespace) -> Grok1Config:
    base = preset(args.preset)
    overrides = {
        "emb_size": args.emb,
        "num_layers": args.layers,
        "num_experts": args.experts,
        "num_selected_experts": args.top_k,
        "num_q_heads": args.q_heads,
        "num_kv_heads": args.kv_heads,
        "key_size": args.key_size,
        "widening_factor": args.widening_factor,
        "vocab_size": args.vocab,
        "sequence_len": args.sequence_len,
    }
    changes = {k: v for k, v in overrides.items() if v is not None}
    name = base.name if not changes else f"{base.name}-custom"
    return base.replace(name=name, **changes)


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import write_release

    config = _synth_config(args)
    if args.tokenizer is not None and not os.path.isfile(args.tokenizer):
        raise Grok1Error(f"{args.tokenizer}: no such tokenizer file")
    write_release(args.dst, config, seed=args.seed, tokenizer=args.tokenizer, force=args.force)
    print(
        f"wrote {args.dst}: {config.num_layers} layers, emb {config.emb_size}, {config.num_experts} experts "
        f"(top-{config.num_selected_experts}), {config.num_q_heads}/{config.num_kv_heads} heads of {config.key_size}, "
        f"ffn {config.ffn_size}, vocab {config.vocab_size}; {config.num_parameters() / 1e6:.1f}M parameters, random weights"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .synth import train_demo_tokenizer, write_release

    print("grok1 demo: a miniature Grok-1 with RANDOM weights, so its text is noise shaped like language.")
    print("It runs every part of the engine on the real release layout: checkpoint reader, model, KV cache, sampler.\n")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_demo_tokenizer(tmp)
        from .tokenizer import Tokenizer

        vocab = Tokenizer(tokenizer).vocab_size
        config = PRESETS["tiny"].replace(name="demo", vocab_size=vocab)
        write_release(args.dir, config, seed=args.seed, tokenizer=tokenizer, force=True)
    print(f"1. wrote {args.dir}/ (config.json, tokenizer.model, ckpt-0/ with {config.num_layers * 12 + 2} tensor files)")
    print(f"2. generating from: {DEMO_PROMPT!r}\n")
    gen_args = build_parser().parse_args(
        ["generate", "--model", args.dir, "--prompt", DEMO_PROMPT, "--max-new-tokens", str(args.max_new_tokens),
         "--temperature", "0.8", "--seed", str(args.seed)]
    )
    cmd_generate(gen_args)
    print("\nThe weights are random: the text above is noise. Point --model at a real checkpoint for real text.")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    fmt = args.format or ("gguf" if args.dst.lower().endswith(".gguf") else "native")
    if fmt == "gguf":
        return convert_gguf(args)
    from .convert import convert_to_native

    quant = args.quant or "int8"
    if args.split_max_size:
        raise Grok1Error("--split-max-size is for GGUF output; native shards are sized with --shard-size")
    shard_bytes = parse_size(args.shard_size)
    figures = convert_to_native(args.src, args.dst, quant=quant, tokenizer=args.tokenizer, force=args.force,
                                shard_bytes=shard_bytes, progress=not args.quiet)
    resumed = f", {figures['resumed_shards']} resumed" if figures["resumed_shards"] else ""
    print(
        f"wrote {args.dst}: {quant}, {figures['bytes'] / 1e9:.3f} GB in {figures['shards']} shard(s){resumed}; "
        f"{figures['total_s']:.1f} s, verified"
    )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    report = verify(args.path, progress=not args.quiet)
    for problem in report.problems:
        print(f"FAIL {problem}")
    status = "OK" if report.ok else f"{len(report.problems)} problem(s)"
    print(f"{report.path}: {report.kind} model, {report.tensors} tensors, {report.bytes_checked / 1e9:.3f} GB checked: {status}")
    return 0 if report.ok else 1


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .loader import load
    from .perplexity import evaluate
    from .tokenizer import Tokenizer, find_tokenizer

    try:
        with open(args.text_file, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise Grok1Error(f"{args.text_file}: cannot read the text ({exc})") from None
    tokenizer_path = args.tokenizer or find_tokenizer(args.model)
    if tokenizer_path is None:
        raise Grok1Error(f"no tokenizer found in {args.model}; pass --tokenizer PATH")
    ids = Tokenizer(tokenizer_path).encode(text)
    model = load(args.model, dtype=args.dtype, device=args.device, exact=args.exact)
    reference = None
    if args.reference is not None:
        reference = load(args.reference, dtype=args.reference_dtype, device=args.device, exact=args.reference_exact)
        if reference.config.vocab_size != model.config.vocab_size:
            raise Grok1Error(f"{args.reference}: vocabulary {reference.config.vocab_size} differs from the model's")
    result = evaluate(model, ids, args.context, reference)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['tokens']} tokens in windows of {result['context']}: perplexity {result['perplexity']:.4f}")
    if reference is not None:
        print(
            f"reference perplexity {result['reference_perplexity']:.4f}; mean KL(reference || model) "
            f"{result['mean_kl']:.5f} nats; top-1 agreement {100 * result['top1_agreement']:.2f} %"
        )
    return 0


def _gpu_spec(text: str) -> list[tuple[str, int]]:
    """'80GB' -> one GPU, '80GBx8' -> eight, 'none' or '0' -> none."""
    if text.strip().lower() in ("none", "0", ""):
        return []
    size, _, count = text.lower().partition("x")
    try:
        n = int(count) if count else 1
    except ValueError:
        raise Grok1Error(f"--gpu: cannot read {text!r} (examples: 80GB, 80GBx8, none)") from None
    if n <= 0:
        raise Grok1Error(f"--gpu: the count must be positive, got {text!r}")
    return [("GPU", parse_size(size, "--gpu size"))] * n


def _rate_arg(text: str, what: str) -> float:
    try:
        value = float(text.strip().upper().removesuffix("GB/S"))
    except ValueError:
        raise Grok1Error(f"{what}: cannot read {text!r} as GB/s (e.g. 2.5)") from None
    if not value > 0:
        raise Grok1Error(f"{what} must be positive, got {text!r}")
    return value * 1e9


def cmd_plan(args: argparse.Namespace) -> int:
    from . import plan

    if args.model is not None:
        config, quant, files = plan.describe_model(args.model)
    else:
        config, quant, files = preset(args.preset), None, []
    machine = plan.describe_machine(
        ram=parse_size(args.ram, "--ram") if args.ram is not None else None,
        gpus=_gpu_spec(args.gpu) if args.gpu is not None else None,
        ram_bandwidth=_rate_arg(args.ram_bandwidth, "--ram-bandwidth") if args.ram_bandwidth else None,
        gpu_bandwidth=_rate_arg(args.gpu_bandwidth, "--gpu-bandwidth") if args.gpu_bandwidth else None,
        disk_read=_rate_arg(args.disk_read, "--disk-read") if args.disk_read else None,
        disk_files=files,
    )
    result = plan.report(config, args.quant or quant or "int8", machine, args.context)
    print(json.dumps(result) if args.json else plan.format_report(result))
    return 0


def convert_gguf(args: argparse.Namespace) -> int:
    from .formats import gguf
    from .loader import read_weights

    args.quant = args.quant or "bf16"
    if args.quant not in gguf.EXPORT_TYPES:
        raise Grok1Error(f"unknown GGUF type {args.quant!r}; choose one of {', '.join(gguf.EXPORT_TYPES)}")
    split = gguf.parse_size(args.split_max_size) if args.split_max_size else None
    tokenizer = args.tokenizer
    if tokenizer is None and os.path.isfile(os.path.join(args.src, "tokenizer.model")):
        tokenizer = os.path.join(args.src, "tokenizer.model")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise Grok1Error(f"{tokenizer}: no such tokenizer file")
    config, weights, _ = read_weights(args.src)
    plan = gguf.write_gguf(
        weights, config, args.dst, quant=args.quant, tokenizer=tokenizer, split_max_size=split, force=args.force,
        progress=not args.quiet,
    )
    size = sum(os.path.getsize(f) for f in plan.files)
    print(f"wrote {', '.join(plan.files)}: {len(plan.tensors)} tensors, {args.quant}, {size / 1e6:.1f} MB")
    if plan.fallbacks:
        names = ", ".join(t.name for t in plan.fallbacks)
        print(f"  as F16, their rows not being whole {args.quant} blocks: {names}")
    if tokenizer is None:
        print("  no tokenizer.model (pass --tokenizer): the file holds a placeholder vocabulary, ids only")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(
        args.model,
        tokenizer_path=args.tokenizer,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("GROK1_API_KEY") or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        context_len=args.context_len,
        dtype=args.dtype,
        device=args.device,
        model_name=args.served_model_name,
        log_level=args.log_level,
        threads=args.threads,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grok1", description="Run xAI's Grok-1 anywhere.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text or token ids from a prompt")
    g.add_argument("--model", required=True,
                   help="model directory (release layout: ckpt-0/, optional config.json) or GGUF file (grok architecture)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    src.add_argument("--token-ids", help="prompt as comma-separated token ids")
    g.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default: found in or beside the model)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="activation dtype")
    g.add_argument("--device", default=None, help="torch device (default: cuda, then mps, then cpu)")
    g.add_argument("--devices", default=None,
                   help="under torchrun, each rank's device: cpu, cuda (cuda:LOCAL_RANK), or a comma-separated "
                   "list indexed by the local rank (default: cuda when the host has a GPU per rank, else cpu)")
    g.add_argument("--exact", action="store_true",
                   help="bfloat16 with the official arithmetic instead of the fast kernels (float32 always is exact)")
    g.add_argument("--head", choices=["bf16", "int8", "int4"], default="bf16",
                   help="fast path: logits from the bf16 embedding (exact) or an int8 copy (lossy, fewer bytes)")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="run to --max-new-tokens even after EOS")
    g.add_argument("--add-bos", action="store_true", help="prepend BOS (the official runner does not)")
    g.add_argument("--max-memory", metavar="SIZE",
                   help="cap on the memory for weights and this run's KV cache, e.g. 8GB (native models): "
                   "attention, router, norm and embedding weights stay in memory, experts are read from the "
                   "files as tokens select them, the most used ones kept in the rest")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("synth", help="write a random-weight model in the release layout")
    s.add_argument("dst")
    s.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    s.add_argument("--emb", type=int)
    s.add_argument("--layers", type=int)
    s.add_argument("--experts", type=int)
    s.add_argument("--top-k", type=int)
    s.add_argument("--q-heads", type=int)
    s.add_argument("--kv-heads", type=int)
    s.add_argument("--key-size", type=int)
    s.add_argument("--widening-factor", type=float)
    s.add_argument("--vocab", type=int)
    s.add_argument("--sequence-len", type=int)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--tokenizer", help="tokenizer.model to copy into the model directory")
    s.add_argument("--force", action="store_true", help="replace an existing destination")
    s.set_defaults(func=cmd_synth)

    c = sub.add_parser("convert", help="convert a model to the native format or to GGUF (for llama.cpp)")
    c.add_argument("src", help="release directory (ckpt-0/), native directory, or GGUF file (gguf output)")
    c.add_argument("dst", help="output directory (native) or .gguf file (split parts become name-00001-of-0000N.gguf)")
    c.add_argument("--format", choices=["native", "gguf"], help="default: gguf for a .gguf DST, else native")
    c.add_argument("--quant", help="native: int8 (the release's own values; default), int4, bf16. "
                   "gguf: f32, f16, bf16 (default; holds the release's int8 matrices exactly), q8_0, q4_0")
    c.add_argument("--split-max-size", help="gguf: split into parts of at most this much tensor data (e.g. 500M, 2G)")
    c.add_argument("--tokenizer", help="tokenizer.model to include (default: found in or beside SRC)")
    c.add_argument("--shard-size", default="4GB", help="largest shard (native), e.g. 4GB")
    c.add_argument("--force", action="store_true", help="replace an existing DST")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    v = sub.add_parser("verify", help="check a release or native model directory against its config")
    v.add_argument("path")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(func=cmd_verify)

    p = sub.add_parser("perplexity", help="perplexity over a text, optionally against a reference model")
    p.add_argument("--model", required=True)
    p.add_argument("--text-file", required=True)
    p.add_argument("--reference", help="reference model (e.g. the same path, run with --reference-dtype float32)")
    p.add_argument("--tokenizer")
    p.add_argument("--context", type=int, default=512, help="tokens per evaluation window")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--exact", action="store_true", help="fidelity arithmetic in bfloat16")
    p.add_argument("--reference-dtype", choices=["bfloat16", "float32"], default="float32")
    p.add_argument("--reference-exact", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_perplexity)
    v = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API")
    v.add_argument("--model", required=True, help="model directory (release layout: ckpt-0/, optional config.json)")
    v.add_argument("--tokenizer", help="SentencePiece tokenizer.model (default: found in or beside the model)")
    v.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/ (default: $GROK1_API_KEY, else none)")
    v.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (KV-cache rows)")
    v.add_argument("--max-queue", type=int, default=64, help="sequences waiting for a row before requests get 429")
    v.add_argument("--context-len", type=int, help="KV-cache length per row (default: the model's context)")
    v.add_argument("--served-model-name", help="model id clients send (default: the model directory's name)")
    v.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="activation dtype")
    v.add_argument("--device", default=None, help="torch device (default: cuda, then mps, then cpu)")
    v.add_argument("--threads", type=int, help="CPU threads for the model (default: PyTorch's choice)")
    v.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                   help="server log level (debug also logs every request)")
    v.set_defaults(func=cmd_serve)

    pl = sub.add_parser("plan", help="memory a model needs and which placements fit this machine, with predicted tok/s")
    which = pl.add_mutually_exclusive_group()
    which.add_argument("--model", help="a model directory (native or release layout): its config and files")
    which.add_argument("--preset", choices=sorted(PRESETS), default="grok-1", help="a built-in config (default grok-1)")
    pl.add_argument("--quant", choices=["int8", "int4", "bf16"], help="projections' quantisation (default: the model's, else int8)")
    pl.add_argument("--ram", metavar="SIZE", help="RAM to plan for, e.g. 64GB (default: detected)")
    pl.add_argument("--gpu", metavar="SIZE[xN]", help="GPU memory per device and count, e.g. 80GBx8, or none (default: detected)")
    pl.add_argument("--disk-read", metavar="GB/s", help="disk read speed (default: measured on --model's files, else unknown)")
    pl.add_argument("--ram-bandwidth", metavar="GB/s", help="CPU memory bandwidth (default: measured)")
    pl.add_argument("--gpu-bandwidth", metavar="GB/s", help="memory bandwidth per GPU (default: known for common GPUs)")
    pl.add_argument("--context", type=int, help="tokens of KV cache to plan for (default: the model's context)")
    pl.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    pl.set_defaults(func=cmd_plan)

    d = sub.add_parser("demo", help="write a miniature random-weight model and generate from it")
    d.add_argument("--dir", default="demo-model")
    d.add_argument("--max-new-tokens", type=int, default=48)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Grok1Error as exc:
        own = getattr(exc, "rank", None)  # set by the one rank that met the error (parallel.load)
        if own is not None:
            print(f"grok1: error (rank {own}): {exc}", file=sys.stderr)
        elif os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1":
            print(f"grok1: error: {exc}", file=sys.stderr)  # once, not by every rank
        return 1
    except KeyboardInterrupt:
        print("grok1: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        parallel = sys.modules.get("grok1.parallel")
        if parallel is not None:
            parallel.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
