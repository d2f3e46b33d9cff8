"""Checks on a CUDA machine (run through bench/gpu_check.sh): the official fixture on the GPU, a decode
timing on the `mid` preset, and, with two or more GPUs, the fixture split over them with NCCL.

    python bench/gpu_check.py [--device cuda] [--workdir /tmp/grok1-gpu-check] [--new-tokens 32] [--ranks N]

Bounds (the project's): float32 with TF32 off, relative error <= 2e-3 and argmax 100 % against the
official float32 logits; bfloat16 (exact arithmetic), mean |ours - official_bf16| <= 2 x
mean |official_bf16 - official_f32|. Prints a table, writes bench/results/gpu_check.json and exits
non-zero when a bound is missed. `--device cpu` runs the same checks here (a dry run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save, table  # noqa: E402

import grok1  # noqa: E402
from grok1 import parallel  # noqa: E402
from grok1.config import PRESETS  # noqa: E402
from grok1.convert import convert_to_native  # noqa: E402
from grok1.generate import GenerationStats, SamplingParams, stream_batch  # noqa: E402
from grok1.synth import write_release  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "official-tiny"
F32_BOUND = 2e-3


def strict_float32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def fixture_cases() -> list[tuple[dict, torch.Tensor]]:
    cases = json.loads((FIXTURE / "cases.json").read_text())["cases"]
    npz = np.load(FIXTURE / "cases.npz")
    return [(c, torch.from_numpy(npz[c["tokens_key"]].astype(np.int64))) for c in cases]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_fixture(logits: dict[str, np.ndarray], rows: list, results: dict, label: str, dtype: str) -> bool:
    """Compares logits by case name with the official ones; appends a table row, returns pass/fail."""
    npz = np.load(FIXTURE / "cases.npz")
    ok, worst, argmax, ratio = True, 0.0, 1.0, 0.0
    for case, _ in fixture_cases():
        ours = logits[case["name"]]
        ref32, ref16 = npz[case["logits_f32_key"]], npz[case["logits_bf16_key"]]
        if dtype == "float32":
            worst = max(worst, rel(ours, ref32))
            argmax = min(argmax, float((ours.argmax(-1) == ref32.argmax(-1)).mean()))
        else:
            ratio = max(ratio, float(np.abs(ours - ref16).mean() / np.abs(ref16 - ref32).mean()))
            argmax = min(argmax, float((ours.argmax(-1) == ref16.argmax(-1)).mean()))
    if dtype == "float32":
        ok = worst <= F32_BOUND and argmax == 1.0
        text = f"rel <= {worst:.1e} (bound 2e-3), argmax {100 * argmax:.0f} % (bound 100 %)"
    else:
        ok = ratio <= 2.0
        text = f"mean|ours - bf16| <= {ratio:.2f} x the official bf16/f32 gap (bound 2), argmax >= {100 * argmax:.0f} %"
    rows.append((label, ("PASS  " if ok else "FAIL  ") + text))
    results[label] = {"ok": ok, "rel": worst, "argmax": argmax, "gap_ratio": ratio}
    return ok


def run_fixture(device: str, rows: list, results: dict) -> bool:
    ok = True
    greedy = json.loads((FIXTURE / "greedy.json").read_text())
    for dtype, exact, label in (("float32", False, "fixture float32 (TF32 off)"),
                                ("bfloat16", True, "fixture bfloat16 exact=True"),
                                ("bfloat16", False, "fixture bfloat16 fast path")):
        model = grok1.load(FIXTURE, dtype=dtype, device=device, exact=exact)
        with torch.no_grad():
            logits = {c["name"]: model(t.to(device)).cpu().numpy() for c, t in fixture_cases()}
        passed = check_fixture(logits, rows, results, label, dtype)
        ok &= passed or "fast" in label  # the fast path's figure is reported, not bounded
        if dtype == "float32":
            same = [grok1.generate(model, p, max_new_tokens=greedy["num_new_tokens"], temperature=0, ignore_eos=True)
                    for p in greedy["prompts"]] == greedy["argmax_loop"]["f32"]
            rows.append(("fixture float32 greedy, 3 x 24 tokens (KV cache)", "PASS  identical" if same else "FAIL  differ"))
            ok &= same
    return ok


def run_decode(device: str, workdir: str, new_tokens: int, rows: list, results: dict) -> None:
    config = PRESETS["mid"]
    path = os.path.join(workdir, "mid-int8")
    if not os.path.isfile(os.path.join(path, "config.json")):
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            release = write_release(os.path.join(tmp, "release"), config, seed=0, progress=False)
            convert_to_native(release, path, quant="int8", force=True, progress=False)
        rows.append(("mid preset written (0.9 GB release -> native int8)", f"{time.perf_counter() - started:.0f} s"))
    prompt = torch.randint(3, config.vocab_size, (128,), generator=torch.Generator().manual_seed(0)).tolist()
    greedy = SamplingParams(temperature=0)
    for label, kwargs in (("bf16 fast", {}), ("bf16 exact", {"exact": True})):
        model = grok1.load(path, device=device, **kwargs)
        list(stream_batch(model, [prompt[:16]], max_new_tokens=4, sampling=greedy, ignore_eos=True))  # warm-up
        stats = GenerationStats()
        list(stream_batch(model, [prompt], max_new_tokens=new_tokens, sampling=greedy, ignore_eos=True, stats=stats))
        results[f"mid decode {label}"] = {"prefill_tok_s": stats.prefill_tokens_per_s,
                                          "decode_tok_s": stats.decode_tokens_per_s}
        rows.append((f"mid int8 {label}: prefill 128 / decode {new_tokens}",
                     f"{stats.prefill_tokens_per_s:.0f} tok/s / {stats.decode_tokens_per_s:.1f} tok/s"))
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()


def worker(out: str, devices: str) -> None:
    """One rank of the multi-GPU check: the fixture's float32 logits from this rank's share."""
    strict_float32()
    group = parallel.init(devices)
    model = parallel.load(FIXTURE, group, dtype="float32")
    with torch.no_grad():
        logits = {c["name"]: model(t.to(group.device)).cpu().numpy() for c, t in fixture_cases()}
    if group.rank == 0:
        np.savez(out, **logits)
    parallel.shutdown()


def run_multi(ranks: int, devices: str, rows: list, results: dict) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "logits.npz")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               os.path.abspath(__file__), "--worker", out, "--devices", devices]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if proc.returncode:
            rows.append((f"fixture float32 on {ranks} ranks ({devices})", "FAIL  " + proc.stderr.strip()[-300:]))
            return False
        npz = np.load(out)
        logits = {k: npz[k] for k in npz.files}
    return check_fixture(logits, rows, results, f"fixture float32 on {ranks} ranks ({devices})", "float32")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workdir", default="/tmp/grok1-gpu-check")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--ranks", type=int, help="ranks for the split check (default: the GPU count, at most 4)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--devices", default="cuda", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.devices)
        return
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to PyTorch (pass --device cpu for a dry run)")
    strict_float32()
    os.makedirs(args.workdir, exist_ok=True)
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    rows: list[tuple[str, str]] = [("device", f"{args.device}: {name}, torch {torch.__version__}")]
    results: dict = {"device": args.device, "name": name, "torch": torch.__version__}
    ok = run_fixture(args.device, rows, results)
    cuda = args.device.startswith("cuda")
    gpus = torch.cuda.device_count() if cuda else 0
    ranks = args.ranks if args.ranks is not None else min(gpus, 4)
    if ranks >= 2:
        ok &= run_multi(ranks, "cuda" if cuda else "cpu", rows, results)
    else:
        rows.append(("fixture over several GPUs (NCCL)", f"skipped: {gpus} GPU(s)"))
    run_decode(args.device, args.workdir, args.new_tokens, rows, results)
    print(table(rows, "GPU check"))
    results["ok"] = bool(ok)
    print(f"wrote {save('gpu_check', results)}")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
