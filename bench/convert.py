"""Conversion speed and memory: a >= 4 GB synthetic release checkpoint converted to the native
format, against a plain copy of the same bytes in the same run; then the load of the result.

    python bench/convert.py [--workdir /tmp/grok1-bench] [--layers 14]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import drop_page_cache, run_sampled, save, table  # noqa: E402

from grok1.config import Grok1Config  # noqa: E402
from grok1.synth import write_release  # noqa: E402

LOAD_SCRIPT = r"""
import json, sys, time
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
before = anon()
t = time.perf_counter()
import grok1
import_s = time.perf_counter() - t
after_import = anon()
t = time.perf_counter()
model = grok1.load(sys.argv[1])
load_s = time.perf_counter() - t
after_load = anon()
print(json.dumps({"load_s": load_s, "import_s": import_s, "anon_after_import": after_import, "anon_after_load": after_load}))
"""


def copy_tree_fsync(src: str, dst: str) -> int:
    os.makedirs(dst, exist_ok=True)
    total = 0
    for name in sorted(os.listdir(src)):
        with open(os.path.join(src, name), "rb") as fin, open(os.path.join(dst, name), "wb") as fout:
            shutil.copyfileobj(fin, fout, 16 * 1024 * 1024)
            fout.flush()
            os.fsync(fout.fileno())
            total += fout.tell()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/grok1-bench")
    parser.add_argument("--layers", type=int, default=14)
    args = parser.parse_args()
    config = Grok1Config(name="bench-convert", vocab_size=32768, sequence_len=1024, emb_size=2048, key_size=128,
                         num_q_heads=16, num_kv_heads=8, num_layers=args.layers, widening_factor=4.0,
                         num_experts=8, num_selected_experts=2)
    release = os.path.join(args.workdir, f"release-{args.layers}")
    if not os.path.isfile(os.path.join(release, "config.json")):
        print(f"writing a synthetic release checkpoint to {release} ...", flush=True)
        write_release(release, config, seed=0, force=True)
    size = sum(os.path.getsize(os.path.join(release, "ckpt-0", f)) for f in os.listdir(os.path.join(release, "ckpt-0")))

    dropped = drop_page_cache()
    copy_dir = os.path.join(args.workdir, "plain-copy")
    shutil.rmtree(copy_dir, ignore_errors=True)
    t = time.perf_counter()
    copy_tree_fsync(os.path.join(release, "ckpt-0"), copy_dir)
    copy_s = time.perf_counter() - t
    shutil.rmtree(copy_dir)

    drop_page_cache()
    native = os.path.join(args.workdir, "native")
    shutil.rmtree(native, ignore_errors=True)
    proc, convert_s, sampler = run_sampled([sys.executable, "-m", "grok1", "convert", release, native, "--quiet"])
    native_size = sum(os.path.getsize(os.path.join(native, f)) for f in os.listdir(native) if f.endswith(".safetensors"))

    drop_page_cache()
    proc_load, _, _ = run_sampled([sys.executable, "-c", LOAD_SCRIPT, native])
    load = __import__("json").loads(proc_load.stdout)
    anon_by_load = load["anon_after_load"] - load["anon_after_import"]

    result = {
        "model_bytes": size,
        "native_bytes": native_size,
        "page_cache_dropped": dropped,
        "plain_copy_s": copy_s,
        "convert_s": convert_s,
        "convert_over_copy": convert_s / copy_s,
        "convert_peak_rss_anon_mb": sampler.peak_anon_kb / 1024,
        "convert_peak_vmhwm_mb": sampler.peak_hwm_kb / 1024,
        "load_s": load["load_s"],
        "anon_after_load_mb": load["anon_after_load"] / 2**20,
        "anon_added_by_load_mb": anon_by_load / 2**20,
        "anon_after_load_over_model": load["anon_after_load"] / size,
        "converter_output": proc.stdout.strip(),
    }
    rows = [
        ("synthetic release checkpoint", f"{size / 1e9:.2f} GB ({args.layers} layers, emb 2048, 8 experts of 5464)"),
        ("page cache dropped before each step", str(dropped)),
        ("plain copy of the same bytes (+fsync)", f"{copy_s:.1f} s ({size / copy_s / 1e9:.2f} GB/s)"),
        ("grok1 convert (+fsync, verify)", f"{convert_s:.1f} s ({size / convert_s / 1e9:.2f} GB/s)"),
        ("convert / copy", f"{convert_s / copy_s:.2f}x   (goal <= 1.5x)"),
        ("converter peak RssAnon", f"{sampler.peak_anon_kb / 1024:.0f} MB   (goal < 512 MB)"),
        ("converter peak VmHWM (incl. mapped file pages)", f"{sampler.peak_hwm_kb / 1024:.0f} MB"),
        ("grok1.load of the native model", f"{load['load_s'] * 1000:.0f} ms   (goal < 1 s)"),
        ("RssAnon after load (whole process)", f"{load['anon_after_load'] / 2**20:.0f} MB = "
         f"{100 * load['anon_after_load'] / size:.1f} % of the model (goal < 10 %)"),
        ("  of which added by grok1.load", f"{anon_by_load / 2**20:.1f} MB"),
    ]
    print(table(rows, "grok1 convert: release -> native (int8)"))
    print(f"wrote {save('convert', result)}")


if __name__ == "__main__":
    main()
