"""A model bigger than the memory it may use: greedy decoding (a) unconstrained and (b) as a process in a
memory cgroup limited to a third of the model's size (or --cgroup), with `--max-memory` set inside it.

    python bench/bigger_than_ram.py                                   # synthetic int8 model of >= 6 GB
    python bench/bigger_than_ram.py --preset grok-1 --layers 1 --cgroup 4GB --new-tokens 6

Models are built once under --workdir (synthetic release written, converted to native, the release then
deleted) and reused. Needs root for the cgroup (v1, /sys/fs/cgroup/memory) and to drop the page cache.
Reports, for (b): the cgroup's memory.max_usage_in_bytes, the process's peak anonymous memory (RssAnon),
tok/s, bytes read per decoded token, and the read rate achieved while decoding against the disk's
sequential read rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import PeakSampler, drop_page_cache, save, table  # noqa: E402

from grok1 import plan  # noqa: E402
from grok1.config import Grok1Config, preset  # noqa: E402
from grok1.convert import convert_to_native  # noqa: E402
from grok1.plan import measure_disk_read  # noqa: E402
from grok1.synth import write_release  # noqa: E402
from grok1.units import parse_size  # noqa: E402

CGROUP_ROOT = "/sys/fs/cgroup/memory"
RUNTIME_MARGIN = 600 * 10**6  # Python, torch and activations, outside --max-memory


def synthetic_config(layers: int) -> Grok1Config:
    # Experts of 3 x 2048 x 5464 int8 = 33.6 MB; 22 layers make a 6.6 GB native model.
    return Grok1Config(name="bench-big", vocab_size=32768, sequence_len=1024, emb_size=2048, key_size=128,
                       num_q_heads=16, num_kv_heads=8, num_layers=layers, widening_factor=4.0, num_experts=8,
                       num_selected_experts=2)


def build(workdir: str, name: str, config: Grok1Config, keep_release: bool) -> str:
    native = os.path.join(workdir, name)
    if os.path.isfile(os.path.join(native, "model.safetensors.index.json")):
        return native
    release = native + "-release"
    if not os.path.isfile(os.path.join(release, "config.json")):
        print(f"writing a synthetic release checkpoint to {release} ...", flush=True)
        write_release(release, config, seed=0, force=True)
    print(f"converting to {native} ...", flush=True)
    convert_to_native(release, native, force=True)
    if not keep_release:
        shutil.rmtree(release)
    return native


def shard_files(native: str) -> list[str]:
    return sorted(os.path.join(native, f) for f in os.listdir(native) if f.endswith(".safetensors"))


def native_bytes(native: str) -> int:
    return sum(os.path.getsize(f) for f in shard_files(native))


def disk_rates(files: list[str], limit: int = 2 * 10**9) -> dict[str, float]:
    return {"buffered 8MiB": measure_disk_read(files, limit, direct=False),
            "O_DIRECT 8MiB": measure_disk_read(files, limit),
            "O_DIRECT 64MiB": measure_disk_read(files, limit, block=64 * 2**20)}


class MemoryCgroup:
    """A cgroup v1 memory group of our own, under the one this process is in."""

    def __init__(self, limit: int) -> None:
        parent = CGROUP_ROOT
        with open("/proc/self/cgroup") as fh:
            for line in fh:
                _, controllers, path = line.strip().split(":", 2)
                if "memory" in controllers.split(","):
                    candidate = os.path.join(CGROUP_ROOT, path.lstrip("/"))
                    if os.path.isdir(candidate):
                        parent = candidate
        self.path = os.path.join(parent, f"grok1-bench-{os.getpid()}")
        os.mkdir(self.path)
        self.write("memory.limit_in_bytes", str(limit))
        try:
            self.write("memory.memsw.limit_in_bytes", str(limit))  # no swapping out of the limit either
        except OSError:
            pass
        self.limit = int(self.read("memory.limit_in_bytes"))

    def write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as fh:
            fh.write(value)

    def read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as fh:
            return fh.read()

    def enter(self) -> None:
        """Called in the child between fork and exec."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as fh:
            fh.write(str(os.getpid()))

    def figures(self) -> dict:
        stat = dict(line.split() for line in self.read("memory.stat").splitlines())
        oom = dict(line.split() for line in self.read("memory.oom_control").splitlines())
        return {"limit": self.limit, "max_usage_in_bytes": int(self.read("memory.max_usage_in_bytes")),
                "failcnt": int(self.read("memory.failcnt")), "oom_kill": int(oom.get("oom_kill", 0)),
                "total_cache_now": int(stat.get("total_cache", 0))}

    def remove(self) -> None:
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)


def generate(native: str, prompt: list[int], new_tokens: int, max_memory: int | None,
             cgroup: MemoryCgroup | None, reader_threads: int | None = None) -> dict:
    cmd = [sys.executable, "-m", "grok1", "generate", "--model", native, "--token-ids", ",".join(map(str, prompt)),
           "--max-new-tokens", str(new_tokens), "--temperature", "0", "--ignore-eos", "--json", "--device", "cpu"]
    if max_memory is not None:
        cmd += ["--max-memory", str(max_memory)]
    started = time.perf_counter()
    env = dict(os.environ)
    if reader_threads is not None:
        env["GROK1_READER_THREADS"] = str(reader_threads)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=cgroup.enter if cgroup else None)
    sampler = PeakSampler(proc.pid)
    out, err = proc.communicate()
    sampler.stop()
    result = {"returncode": proc.returncode, "wall_s": time.perf_counter() - started,
              "peak_rss_anon_bytes": sampler.peak_anon_kb * 1024, "peak_vmhwm_bytes": sampler.peak_hwm_kb * 1024}
    if proc.returncode == 0:
        result.update(json.loads(out))
    else:
        result["stderr_tail"] = err[-2000:]
    if cgroup is not None:
        result["cgroup"] = cgroup.figures()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/grok1-bench")
    parser.add_argument("--preset", help="a built-in shape (e.g. grok-1) instead of the synthetic 6.6 GB model")
    parser.add_argument("--layers", type=int, help="layers (synthetic default 22; preset default its own)")
    parser.add_argument("--cgroup", help="memory cgroup limit (default: a third of the model's size)")
    parser.add_argument("--max-memory", help="grok1 --max-memory inside the cgroup (default: limit - 0.6 GB)")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--keep-release", action="store_true")
    parser.add_argument("--also-max-memory", action="append", metavar="SIZE",
                        help="another capped run in the same cgroup with this --max-memory (repeatable)")
    parser.add_argument("--also-reader-threads", type=int, action="append", metavar="N",
                        help="another capped run with N expert-reader threads (GROK1_READER_THREADS; repeatable)")
    parser.add_argument("--mapped-too", action="store_true",
                        help="also run the memory-mapped model (no --max-memory) inside the cgroup")
    args = parser.parse_args()

    if args.preset:
        base = preset(args.preset)
        config = base.replace(name=f"{base.name}-{args.layers or base.num_layers}l",
                              num_layers=args.layers or base.num_layers)
        name = f"{args.preset}-{config.num_layers}l-native"
        result_name = f"bigger_than_ram-{args.preset}-{config.num_layers}l"
    else:
        config = synthetic_config(args.layers or 22)
        name = f"big-{config.num_layers}l-native"
        result_name = "bigger_than_ram"
    os.makedirs(args.workdir, exist_ok=True)
    print(f"disk: {shutil.disk_usage(args.workdir).free / 1e9:.1f} GB free in {args.workdir}", flush=True)
    native = build(args.workdir, name, config, args.keep_release)
    size = native_bytes(native)
    limit = parse_size(args.cgroup) if args.cgroup else size // 3
    max_memory = parse_size(args.max_memory) if args.max_memory else limit - RUNTIME_MARGIN
    prompt = torch.randint(3, config.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    p = plan.parts(config, "int8")
    active_experts = p.active_experts
    files = shard_files(native)

    dropped = drop_page_cache()
    free = generate(native, prompt, args.new_tokens, None, None)
    runs = {"unconstrained": free}

    def in_cgroup(label: str, cap: int | None, reader_threads: int | None = None) -> None:
        group = MemoryCgroup(limit)
        try:
            drop_page_cache()
            runs[label] = generate(native, prompt, args.new_tokens, cap, group, reader_threads)
        finally:
            group.remove()

    # The disk, right before and after the capped run: front to back through the page cache (kernel
    # read-ahead) and with O_DIRECT in 8 and 64 MiB reads. The best of the six is the yardstick.
    disk = {"before": disk_rates(files)}
    in_cgroup("capped", max_memory)
    disk["after"] = disk_rates(files)
    measured = sorted(v for rates in disk.values() for v in rates.values())
    disk_rate = measured[-1]
    disk_median = (measured[len(measured) // 2 - 1] + measured[len(measured) // 2]) / 2
    for extra in args.also_max_memory or []:
        in_cgroup(f"capped at {extra}", parse_size(extra))
    for threads in args.also_reader_threads or []:
        in_cgroup(f"capped, {threads} reader threads", max_memory, threads)
    if args.mapped_too:
        in_cgroup("mapped_in_cgroup", None)

    result = {
        "config": config.to_official_json(), "native_bytes": size, "page_cache_dropped": dropped,
        "cgroup_limit": limit, "max_memory": max_memory, "prompt_tokens": len(prompt), "new_tokens": args.new_tokens,
        "active_expert_bytes_per_token": active_experts, "resident_weight_bytes": p.resident(2),
        "disk_sequential_read_bytes_s": disk, "disk_rate_yardstick_bytes_s": disk_rate,
        "disk_rate_median_bytes_s": disk_median, "runs": runs,
    }
    rows = [
        ("model", f"{config.num_layers} layers, emb {config.emb_size}, {config.num_experts} experts of "
                  f"{config.ffn_size} (int8), vocab {config.vocab_size}: {size / 1e9:.2f} GB native"),
        ("active expert bytes per token", f"{active_experts / 1e6:.1f} MB ({config.num_selected_experts} of "
                                          f"{config.num_experts} experts x {config.num_layers} layers); "
                                          f"resident weights {p.resident(2) / 1e6:.0f} MB"),
        ("page cache dropped before each step", str(dropped)),
        ("disk sequential read, GB/s", "; ".join(f"{when}: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in rates.items())
                                                 for when, rates in disk.items())),
        ("cgroup limit / --max-memory", f"{limit / 1e9:.2f} GB ({100 * limit / size:.0f} % of the model) / "
                                        f"{max_memory / 1e9:.2f} GB"),
    ]
    ok = all(r.get("returncode") == 0 for r in runs.values())
    capped = runs["capped"]
    for label, r in runs.items():
        if r["returncode"] != 0:
            rows.append((label, f"FAILED (exit {r['returncode']}): {r.get('stderr_tail', '')[-300:]}"))
            continue
        s = r["stats"]
        decode_s_per_token = 1 / s["decode_tokens_per_s"] if s["decode_tokens_per_s"] else float("nan")
        line = (f"{s['decode_tokens_per_s']:.3f} tok/s ({decode_s_per_token:.2f} s/token), prefill "
                f"{s['prefill_tokens_per_s']:.2f} tok/s, load {s['load_s']:.1f} s; peak RssAnon "
                f"{r['peak_rss_anon_bytes'] / 1e9:.2f} GB")
        rows.append((label, line))
        read = s.get("bytes_read_per_token") or 0
        io = s.get("io_read_bytes_per_token")
        detail = f"{read / 1e6:.1f} MB read per decoded token"
        if io is not None:
            detail += f" (/proc/self/io: {io / 1e6:.1f} MB)"
        if s.get("expert_cache_hit_rate") is not None:
            detail += f", expert cache hit rate {100 * s['expert_cache_hit_rate']:.0f} %"
        rows.append(("", detail))
        if "cgroup" in r:
            cg = r["cgroup"]
            rows.append(("", f"cgroup memory.max_usage_in_bytes {cg['max_usage_in_bytes'] / 1e9:.2f} GB, "
                             f"failcnt {cg['failcnt']}, oom_kill {cg['oom_kill']}"))
        if "expert_stall_s" in s:
            decode_s = s["new_tokens"] and (s["new_tokens"] - 1) / s["decode_tokens_per_s"]
            rows.append(("", f"waited for expert reads {s['expert_stall_s']:.2f} s of {decode_s:.2f} s decoding"))
        if label.startswith("capped") and read and s["decode_tokens_per_s"]:
            rate = read * s["decode_tokens_per_s"]
            r["achieved_read_bytes_s"] = rate
            r["read_rate_over_disk"] = rate / disk_rate
            r["read_rate_over_disk_median"] = rate / disk_median
            rows.append(("", f"read rate while decoding {rate / 1e9:.2f} GB/s = {rate / disk_rate:.2f} of the best "
                             f"sequential read above, {rate / disk_median:.2f} of their median (goal >= 0.7)"))
    # What `grok1 plan` predicts for this memory and this disk, against what was measured.
    machine = plan.Machine(ram=int(max_memory / plan.USABLE_FRACTION), ram_source="--max-memory",
                           ram_bandwidth=plan.measure_ram_bandwidth(), ram_bandwidth_source="measured",
                           disk_read=disk_median, disk_source="measured (median)")
    streamed = next(pl for pl in plan.placements(config, "int8", machine, len(prompt) + args.new_tokens)
                    if pl.name.startswith("streamed"))
    result["plan_streamed_tokens_per_s"] = streamed.tokens_per_s
    result["plan_ram_bandwidth_bytes_s"] = machine.ram_bandwidth
    if capped["returncode"] == 0:
        rows.append(("grok1 plan's roofline for (b)", f"{streamed.tokens_per_s:.3f} tok/s (disk {disk_median / 1e9:.2f} GB/s, "
                     f"RAM {machine.ram_bandwidth / 1e9:.0f} GB/s); measured {capped['stats']['decode_tokens_per_s']:.3f}"))
    if ok:
        same = all(r["token_ids"] == free["token_ids"] for r in runs.values())
        result["identical_tokens"] = same
        rows.append(("identical tokens", f"{same} ({len(free['token_ids'])} greedy tokens)"))
    print(table(rows, f"bigger than RAM: {size / 1e9:.2f} GB model in a {limit / 1e9:.2f} GB memory cgroup"))
    print(f"wrote {save(result_name, result)}")


if __name__ == "__main__":
    main()
