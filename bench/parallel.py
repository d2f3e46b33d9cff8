"""Tensor/expert parallelism over gloo on this machine's CPUs: agreement with the single-process model
and the official fixture, and what each rank holds and maps.

    python bench/parallel.py [--workdir /tmp/grok1-parallel-bench] [--worlds 1,2,4] [--new-tokens 16]

For each world size N it launches `torchrun --nproc-per-node N` (and once two one-process "nodes" with
`--nnodes 2`) on:
- the official tiny fixture (release format, float32): logits of the 7 cases against the official
  float32 logits and against one process; greedy continuations (KV cache) of the 3 fixture prompts;
- a second config (native int8: 2 kv heads, 2 experts, top-1, vocabulary 250): logits and greedy
  continuations against one process;
- the `mid` preset (native int8, bfloat16 fast path): each rank's weight bytes, the resident pages
  of the model files it maps (smaps Rss), anonymous memory, and decode speed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save, status_kb, table  # noqa: E402

import grok1  # noqa: E402
from grok1 import parallel  # noqa: E402
from grok1.config import PRESETS, Grok1Config  # noqa: E402
from grok1.convert import convert_to_native  # noqa: E402
from grok1.generate import GenerationStats  # noqa: E402
from grok1.synth import write_release  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official-tiny"
SECOND = Grok1Config(name="parallel-second", vocab_size=250, sequence_len=128, emb_size=64, key_size=16,
                     num_q_heads=8, num_kv_heads=2, num_layers=2, widening_factor=3.0, num_experts=2,
                     num_selected_experts=1)
NEAR_TIE = 0.01


def second_inputs() -> tuple[torch.Tensor, list[list[int]]]:
    tokens = torch.randint(1, SECOND.vocab_size, (2, 24), generator=torch.Generator().manual_seed(5))
    tokens[1, :3] = 0
    return tokens, [[17, 99, 3, 201, 45], [5, 6]]


def fixture_inputs() -> tuple[list[tuple[str, torch.Tensor]], list[list[int]], int]:
    cases = json.loads((FIXTURE / "cases.json").read_text())["cases"]
    npz = np.load(FIXTURE / "cases.npz")
    greedy = json.loads((FIXTURE / "greedy.json").read_text())
    tokens = [(c["name"], torch.from_numpy(npz[c["tokens_key"]].astype(np.int64))) for c in cases]
    return tokens, greedy["prompts"], greedy["num_new_tokens"]


def mapped_rss_kb(directory: str) -> int:
    """Resident kB of this process's mappings of files under `directory` (/proc/self/smaps)."""
    total, inside = 0, False
    directory = os.path.realpath(directory)
    with open("/proc/self/smaps") as fh:
        for line in fh:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                parts = line.split()
                inside = len(parts) >= 6 and parts[5].startswith(directory)
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


# ---- one rank ----------------------------------------------------------------------------------


def worker(task: str, model_path: str, out: str, new_tokens: int) -> None:
    torch.set_num_threads(1)
    group = parallel.init("cpu")
    result: dict = {}
    arrays: dict[str, np.ndarray] = {}
    if task in ("fixture", "second"):
        model = parallel.load(model_path, group, dtype="float32")
        if task == "fixture":
            cases, prompts, n_new = fixture_inputs()
        else:
            tokens, prompts = second_inputs()
            cases, n_new = [("batch", tokens)], 16
        with torch.no_grad():
            for name, tokens in cases:
                arrays[name] = model(tokens).numpy()
        result["greedy"] = [grok1.generate(model, p, max_new_tokens=n_new, temperature=0, ignore_eos=True)
                            for p in prompts]
    else:  # memory and speed on a larger model, default (bfloat16 fast) path
        started = time.perf_counter()
        model = parallel.load(model_path, group)
        load_s = time.perf_counter() - started
        prompt = torch.randint(3, model.config.vocab_size, (32,), generator=torch.Generator().manual_seed(0)).tolist()
        grok1.generate(model, prompt[:8], max_new_tokens=2, temperature=0, ignore_eos=True)  # warm-up
        stats = GenerationStats()
        grok1.generate(model, prompt, max_new_tokens=new_tokens, temperature=0, ignore_eos=True, stats=stats)
        mine = {"weight_bytes": parallel.weight_bytes(model), "mapped_rss_kb": mapped_rss_kb(model_path),
                "rss_anon_kb": status_kb(os.getpid(), "RssAnon"), "load_s": load_s, "decode_tok_s": stats.decode_tokens_per_s,
                "placement": model.placement.describe()}
        every = [None] * group.world_size
        torch.distributed.all_gather_object(every, mine)
        result["ranks"] = every
    if group.rank == 0:
        np.savez(out + ".npz", **arrays)
        Path(out + ".json").write_text(json.dumps(result))
    parallel.shutdown()


# ---- the driver --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, task: str, model: str, out: str, new_tokens: int, nodes: int = 1) -> tuple[dict, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = [os.path.abspath(__file__), "--worker", task, "--model", model, "--out", out,
              "--new-tokens", str(new_tokens)]
    run = [sys.executable, "-m", "torch.distributed.run"]
    if nodes == 1:
        procs = [subprocess.Popen([*run, "--standalone", "--nproc-per-node", str(world), *script], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    else:
        port = free_port()
        procs = [subprocess.Popen([*run, "--nnodes", str(nodes), "--nproc-per-node", str(world // nodes),
                                   "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
                                   *script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for node in range(nodes)]
    for p in procs:
        _, err = p.communicate(timeout=1200)
        if p.returncode:
            sys.stderr.write(err[-3000:])
            raise SystemExit(f"{task} with {world} ranks failed")
    arrays = np.load(out + ".npz")
    return {k: arrays[k] for k in arrays.files}, json.loads(Path(out + ".json").read_text())


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def agreement(ours: dict, single: dict, official: dict | None) -> dict:
    worst = {"rel_vs_single": 0.0, "rel_vs_official": 0.0, "argmax_vs_official": 1.0, "argmax_flips_not_near_tie": 0}
    for name, logits in ours.items():
        s = single[name]
        worst["rel_vs_single"] = max(worst["rel_vs_single"], rel(logits, s))
        top = np.sort(s, axis=-1)[..., -2:]
        differ = logits.argmax(-1) != s.argmax(-1)
        worst["argmax_flips_not_near_tie"] += int((differ & ((top[..., 1] - top[..., 0]) >= NEAR_TIE)).sum())
        if official is not None:
            worst["rel_vs_official"] = max(worst["rel_vs_official"], rel(logits, official[name]))
            worst["argmax_vs_official"] = min(worst["argmax_vs_official"],
                                              float((logits.argmax(-1) == official[name].argmax(-1)).mean()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/grok1-parallel-bench")
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--worker", choices=["fixture", "second", "mid"])
    parser.add_argument("--model")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.out, args.new_tokens)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    os.makedirs(args.workdir, exist_ok=True)
    second = os.path.join(args.workdir, "second-int8")
    mid = os.path.join(args.workdir, "mid-int8")
    for path, config in ((second, SECOND), (mid, PRESETS["mid"])):
        if not os.path.isfile(os.path.join(path, "config.json")):
            with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
                release = write_release(os.path.join(tmp, "release"), config, seed=3, progress=False)
                convert_to_native(release, path, quant="int8", force=True, progress=False)

    # single-process references
    official_npz = np.load(FIXTURE / "cases.npz")
    cases = json.loads((FIXTURE / "cases.json").read_text())["cases"]
    official = {c["name"]: official_npz[c["logits_f32_key"]] for c in cases}
    official_greedy = json.loads((FIXTURE / "greedy.json").read_text())["argmax_loop"]["f32"]
    single: dict[str, dict] = {}
    f32 = grok1.load(FIXTURE, dtype="float32")
    fixture_cases, _, _ = fixture_inputs()
    with torch.no_grad():
        single["fixture"] = {name: f32(tokens).numpy() for name, tokens in fixture_cases}
    s2 = grok1.load(second, dtype="float32")
    tokens, prompts = second_inputs()
    with torch.no_grad():
        single["second"] = {"batch": s2(tokens).numpy()}
    second_greedy = [grok1.generate(s2, p, max_new_tokens=16, temperature=0, ignore_eos=True) for p in prompts]
    total = {"fixture": parallel.weight_bytes(f32), "second": parallel.weight_bytes(s2)}
    m1 = grok1.load(mid)
    total["mid"] = parallel.weight_bytes(m1)
    del m1

    results: dict = {"worlds": worlds, "total_weight_bytes": total}
    rows: list[tuple[str, str]] = []
    tmp = tempfile.mkdtemp(dir=args.workdir)
    runs = [(n, 1) for n in worlds] + [(2, 2)]
    for n, nodes in runs:
        label = f"{n} ranks" if nodes == 1 else "2 nodes x 1 rank"
        entry: dict = {}
        for task, path in (("fixture", str(FIXTURE)), ("second", second)):
            ours, meta = launch(n, task, path, os.path.join(tmp, f"{task}-{n}-{nodes}"), args.new_tokens, nodes)
            figures = agreement(ours, single[task], official if task == "fixture" else None)
            figures["greedy_identical"] = meta["greedy"] == (official_greedy if task == "fixture" else second_greedy)
            entry[task] = figures
            official_part = (f"vs official rel <= {figures['rel_vs_official']:.1e}, argmax "
                             f"{100 * figures['argmax_vs_official']:.0f} %; " if task == "fixture" else "")
            rows.append((f"{label}: {task} float32 logits",
                         f"{official_part}vs 1 process rel <= {figures['rel_vs_single']:.1e}, "
                         f"{figures['argmax_flips_not_near_tie']} argmax flips outside near-ties; greedy "
                         f"{'identical' if figures['greedy_identical'] else 'DIFFERENT'}"))
        if nodes == 1:
            _, meta = launch(n, "mid", mid, os.path.join(tmp, f"mid-{n}"), args.new_tokens)
            entry["mid"] = meta["ranks"]
            held = [r["weight_bytes"] for r in meta["ranks"]]
            mapped = [r["mapped_rss_kb"] * 1024 for r in meta["ranks"]]
            share = total["mid"] / n
            rows.append((f"{n} ranks: mid weight bytes per rank",
                         f"{min(held) / 1e6:.1f}-{max(held) / 1e6:.1f} MB = "
                         f"{100 * max(held) / share:.1f} % of total/{n} ({share / 1e6:.1f} MB)"))
            rows.append((f"{n} ranks: mid model pages mapped per rank",
                         f"{min(mapped) / 1e6:.1f}-{max(mapped) / 1e6:.1f} MB (smaps Rss); anonymous "
                         f"{max(r['rss_anon_kb'] for r in meta['ranks']) / 1e3:.0f} MB"))
            rows.append((f"{n} ranks: mid decode (bf16, gloo, 1 thread/rank)",
                         f"{meta['ranks'][0]['decode_tok_s']:.1f} tok/s"))
        results[label] = entry
    rows.insert(0, ("mid model weight bytes (1 process)", f"{total['mid'] / 1e6:.1f} MB"))
    print(table(rows, "tensor/expert parallelism on CPU (gloo)"))
    print(f"wrote {save('parallel', results)}")


if __name__ == "__main__":
    main()
