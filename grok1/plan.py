"""`grok1 plan`: what a model needs (weights per quantisation, bytes read per token, KV cache) and which
placements fit this machine, with the tokens/s the memory-bandwidth roofline allows for each.

Units: GB = 10^9 bytes, GiB = 2^30 bytes, GB/s = 10^9 bytes per second. All sizes are computed from
the config; nothing is read but the machine's description (and, when asked, the model's files to time
the disk).

Roofline: decoding one token reads every active weight once (attention, routers, norms, the selected
experts, the output head), so a placement cannot beat (bytes read from each memory / its bandwidth),
summed over the memories involved. Real decoding reaches a fraction of it (see docs/memory.md).
"""

from __future__ import annotations

import math
import mmap
import os
import time
from dataclasses import asdict, dataclass, field

from .config import Grok1Config
from .errors import Grok1Error
from .model import parameter_specs
from .units import gb, gib

QUANTS = ("int8", "int4", "bf16")
RELEASE_ROW_BLOCKS = 8
INT4_GROUP = 32
USABLE_FRACTION = 0.9  # of RAM or GPU memory; the rest for the OS, CUDA context, runtime, activations
# Memory bandwidth of common accelerators, GB/s (vendor figures), matched against the device name.
GPU_BANDWIDTH_GB_S = {
    "H200": 4800, "H100 PCIe": 2000, "H100": 3350, "GH200": 4000, "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935,
    "A100": 1555, "L40S": 864, "L40": 864, "L4": 300, "A10G": 600, "A10": 600, "V100": 900, "T4": 320,
    "RTX 6000 Ada": 960, "RTX 4090": 1008, "RTX 3090": 936, "MI300X": 5300, "MI250": 3277,
}
ASSUMED_GPU_BANDWIDTH_GB_S = 1000


# ---- what the model needs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Parts:
    """Byte counts of a model's weights, by role, for one quantisation of the projections."""

    embedding_elements: int  # V x D, used as the input embedding and as the output head
    norms_routers: int  # float32 bytes of every norm scale and router matrix
    attention: int  # query/key/value/output projections, quantised, with scales
    experts: int  # every expert of every layer, quantised, with scales
    num_layers: int
    num_experts: int
    num_selected: int
    emb_size: int

    def embedding(self, itemsize: int) -> int:
        return self.embedding_elements * itemsize

    def weights(self, head_itemsize: int) -> int:
        """Everything a process holds to run the model with the embedding in this many bytes per value."""
        return self.embedding(head_itemsize) + self.norms_routers + self.attention + self.experts

    def resident(self, head_itemsize: int) -> int:
        """What stays in memory when experts are streamed."""
        return self.embedding(head_itemsize) + self.norms_routers + self.attention

    @property
    def per_expert(self) -> int:
        """One expert of one layer (its three projections)."""
        return self.experts // (self.num_layers * self.num_experts)

    @property
    def active_experts(self) -> int:
        return self.per_expert * self.num_selected * self.num_layers

    def active(self, head_itemsize: int) -> int:
        """Bytes one decoded token reads: everything but the unselected experts, the output head whole,
        one row of the input embedding."""
        return (self.norms_routers + self.attention + self.active_experts
                + self.embedding(head_itemsize) + self.emb_size * head_itemsize)


def _projection_bytes(shape: tuple[int, ...], quant: str, row_parallel: bool) -> int:
    *lead, k, n = shape
    values = math.prod(shape)
    if quant == "int8":
        blocks = RELEASE_ROW_BLOCKS if row_parallel else 1
        return values + 2 * math.prod(lead) * blocks * n
    if quant == "int4":
        return values // 2 + 2 * values // INT4_GROUP
    if quant == "bf16":
        return 2 * values
    raise Grok1Error(f"unknown quantisation {quant!r}; choose one of {', '.join(QUANTS)}")


def parts(config: Grok1Config, quant: str = "int8") -> Parts:
    norms_routers = attention = experts = 0
    embedding = 0
    for spec in parameter_specs(config).values():
        if spec.path.endswith("in_out_embed/embeddings"):
            embedding = math.prod(spec.shape)
        elif not spec.quantised:
            norms_routers += 4 * math.prod(spec.shape)
        elif "/moe/" in spec.path:
            experts += _projection_bytes(spec.shape, quant, spec.row_parallel)
        else:
            attention += _projection_bytes(spec.shape, quant, spec.row_parallel)
    return Parts(embedding, norms_routers, attention, experts, config.num_layers, config.num_experts,
                 config.num_selected_experts, config.emb_size)


def release_bytes(config: Grok1Config) -> int:
    """The checkpoint as xAI published it: int8 projections, bf16 scales, float32 embedding/norms/routers."""
    return parts(config, "int8").weights(4)


def native_bytes(config: Grok1Config, quant: str) -> int:
    """A native directory's tensor bytes: the float32 embedding plus its bf16 copy, and the rest."""
    p = parts(config, quant)
    return p.weights(4) + p.embedding(2)


def kv_bytes_per_token(config: Grok1Config, itemsize: int = 2) -> int:
    """Keys and values of every layer for one position: layers x 2 x kv heads x head dim x bytes."""
    return config.num_layers * 2 * config.num_kv_heads * config.key_size * itemsize


# ---- the machine ------------------------------------------------------------------------------------


@dataclass
class Machine:
    ram: int  # bytes
    ram_source: str
    ram_bandwidth: float  # bytes/s
    ram_bandwidth_source: str
    gpus: list[tuple[str, int]] = field(default_factory=list)  # (name, bytes) per device
    gpu_source: str = "none found"
    gpu_bandwidth: float = 0.0  # bytes/s, per device
    gpu_bandwidth_source: str = ""
    disk_read: float | None = None  # bytes/s
    disk_source: str = "unknown (pass --disk-read, or --model to measure)"


def detect_ram() -> tuple[int, str]:
    """Physical memory, or the memory cgroup's limit when lower."""
    total = 0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    except OSError:
        pass
    if not total and hasattr(os, "sysconf"):
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 0
    source = "detected (MemTotal)"
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit_file, encoding="ascii") as fh:
                text = fh.read().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total, source = int(text), f"detected (cgroup limit, {limit_file})"
    if not total:
        raise Grok1Error("cannot detect this machine's memory; pass --ram SIZE")
    return total, source


def detect_gpus() -> tuple[list[tuple[str, int]], str]:
    try:
        import torch

        if torch.cuda.is_available():
            gpus = []
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                gpus.append((props.name, props.total_memory))
            return gpus, "detected (CUDA)"
    except Exception:  # no usable CUDA runtime is the same as no GPU here
        pass
    return [], "none found"


def gpu_bandwidth_for(name: str) -> float | None:
    for key in sorted(GPU_BANDWIDTH_GB_S, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_BANDWIDTH_GB_S[key] * 1e9
    return None


def measure_ram_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 3) -> float:
    """Best of a few reductions over a buffer far larger than the caches (bytes/s)."""
    import torch

    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        buf.sum()
        best = max(best, nbytes / (time.perf_counter() - started))
    return best


def measure_disk_read(files: list[str], limit: int = 10**9, block: int = 8 * 2**20, direct: bool = True) -> float:
    """Sequential read speed of these files (bytes/s), with O_DIRECT where possible so that cached
    pages do not count (`direct=False`: through the page cache, the files' cached pages dropped first)."""
    if not direct:
        for path in files:
            _drop_cached(path)
    buf = mmap.mmap(-1, block)
    done = 0
    started = time.perf_counter()
    try:
        for path in files:
            flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0)
            try:
                fd = os.open(path, flags)
            except OSError:
                fd = os.open(path, os.O_RDONLY)
            try:
                offset = 0
                while done < limit:
                    try:
                        got = os.preadv(fd, [buf], offset)
                    except OSError:
                        os.close(fd)
                        fd = os.open(path, os.O_RDONLY)
                        got = os.preadv(fd, [buf], offset)
                    if got <= 0:
                        break
                    offset += got
                    done += got
            finally:
                os.close(fd)
                if not direct:
                    _drop_cached(path)
            if done >= limit:
                break
    finally:
        buf.close()
    elapsed = time.perf_counter() - started
    if done == 0 or elapsed <= 0:
        raise Grok1Error("no model bytes to time the disk with; pass --disk-read GB/s")
    return done / elapsed


def _drop_cached(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def describe_machine(
    ram: int | None = None,
    gpus: list[tuple[str, int]] | None = None,
    ram_bandwidth: float | None = None,
    gpu_bandwidth: float | None = None,
    disk_read: float | None = None,
    disk_files: list[str] | None = None,
) -> Machine:
    """This machine, with what is given (bytes, bytes/s) taking the place of detection and measurement;
    the disk is timed on `disk_files` when its speed is not given."""
    ram, ram_source = (ram, "given") if ram is not None else detect_ram()
    if ram_bandwidth is not None:
        ram_bw, ram_bw_source = ram_bandwidth, "given"
    else:
        ram_bw, ram_bw_source = measure_ram_bandwidth(), "measured (best of 3 reads of 256 MiB)"
    gpus, gpu_source = (gpus, "given") if gpus is not None else detect_gpus()
    machine = Machine(ram, ram_source, ram_bw, ram_bw_source, gpus, gpu_source)
    if gpus:
        known = gpu_bandwidth_for(gpus[0][0])
        if gpu_bandwidth is not None:
            machine.gpu_bandwidth, machine.gpu_bandwidth_source = gpu_bandwidth, "given"
        elif known:
            machine.gpu_bandwidth, machine.gpu_bandwidth_source = known, f"vendor figure for {gpus[0][0]}"
        else:
            machine.gpu_bandwidth = ASSUMED_GPU_BANDWIDTH_GB_S * 1e9
            machine.gpu_bandwidth_source = "assumed (pass --gpu-bandwidth)"
    if disk_read is not None:
        machine.disk_read, machine.disk_source = disk_read, "given"
    elif disk_files:
        machine.disk_read = measure_disk_read(disk_files)
        machine.disk_source = f"measured (sequential read of up to 1 GB of {os.path.dirname(disk_files[0])})"
    return machine


def describe_model(path: str) -> tuple[Grok1Config, str | None, list[str]]:
    """A model directory's config, quantisation (native only) and weight files."""
    from .formats import native
    from .loader import read_config

    if not os.path.isdir(path):
        raise Grok1Error(f"{path}: no such model directory")
    config = read_config(path)
    if native.is_native(path):
        ckpt = native.NativeCheckpoint(path)
        return config, ckpt.quant, [os.path.join(path, s) for s in sorted(ckpt.shards)]
    ckpt_dir = os.path.join(path, "ckpt-0")
    files = sorted(os.path.join(ckpt_dir, f) for f in os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
    return config, None, files


# ---- placements -------------------------------------------------------------------------------------


@dataclass
class Placement:
    name: str
    where: str  # what sits where
    needs: dict[str, int]  # memory kind -> bytes needed
    has: dict[str, int]  # memory kind -> bytes usable
    tokens_per_s: float | None
    note: str
    supported: str  # what grok1 does today

    @property
    def fits(self) -> bool:
        return all(self.needs[k] <= self.has.get(k, 0) for k in self.needs)


def placements(config: Grok1Config, quant: str, machine: Machine, context: int) -> list[Placement]:
    """The placements of a bf16-activation run (bf16 output head, bf16 KV cache)."""
    p = parts(config, quant)
    head = 2
    kv = kv_bytes_per_token(config, 2) * context
    weights = p.weights(head)
    active = p.active(head)
    active_resident = active - p.active_experts
    ram = int(machine.ram * USABLE_FRACTION)
    gpu_total = int(sum(size for _, size in machine.gpus) * USABLE_FRACTION)
    n_gpu = len(machine.gpus)
    out = []
    gpu_bw = machine.gpu_bandwidth
    ram_bw = machine.ram_bandwidth

    if n_gpu:
        label = f"{n_gpu} GPU{'s' if n_gpu > 1 else ''}"
        out.append(Placement(
            f"all on {label}", f"weights + KV cache on {label}" + (" (whole layers per GPU)" if n_gpu > 1 else ""),
            {"gpu": weights + kv}, {"gpu": gpu_total},
            gpu_bw / active if gpu_bw else None,
            "layers run one after another, so one GPU's bandwidth at a time",
            "yes" if n_gpu == 1 else "planned (multi-GPU)",
        ))
        out.append(Placement(
            f"{label} + CPU experts", f"attention, embedding, KV cache on {label}; experts in RAM, computed by the CPU",
            {"gpu": p.resident(head) + kv, "ram": p.experts}, {"gpu": gpu_total, "ram": ram},
            1 / (active_resident / gpu_bw + p.active_experts / ram_bw) if gpu_bw and ram_bw else None,
            "expert bytes at RAM bandwidth, the rest at GPU bandwidth",
            "planned",
        ))
    out.append(Placement(
        "all in RAM (CPU)", "weights + KV cache in RAM", {"ram": weights + kv}, {"ram": ram},
        ram_bw / active if ram_bw else None, "", "yes",
    ))
    minimum = p.resident(head) + kv + p.per_expert * p.num_selected
    cache = max(0, ram - p.resident(head) - kv)
    hit = min(1.0, cache / p.experts) if p.experts else 1.0
    if machine.disk_read:
        seconds = (active_resident + hit * p.active_experts) / ram_bw + (1 - hit) * p.active_experts / machine.disk_read
        tps = 1 / seconds
    else:
        tps = None
    out.append(Placement(
        "streamed from disk (--max-memory)",
        "attention, embedding, KV cache in RAM; experts read from the files per token, the rest of RAM caching them",
        {"ram": minimum}, {"ram": ram}, tps,
        f"run with --max-memory {gb(ram, 0)} or less; expert cache {gb(cache)} = {100 * hit:.0f} % of the experts; "
        "uniform routing assumed (hit rate = cached share), misses at disk speed",
        "yes",
    ))
    return out


# ---- the report ---------------------------------------------------------------------------------------


def report(config: Grok1Config, quant: str, machine: Machine, context: int | None = None) -> dict:
    """Everything `grok1 plan` prints, as numbers (bytes, bytes/s, tokens/s)."""
    if quant not in QUANTS:
        raise Grok1Error(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS)}")
    context = context or config.sequence_len
    if not 0 < context <= config.sequence_len:
        raise Grok1Error(f"--context must be 1..{config.sequence_len}, got {context}")
    weights = {}
    for q in QUANTS:
        p = parts(config, q)
        weights[q] = {
            "run_bf16_bytes": p.weights(2),
            "run_f32_bytes": p.weights(4),
            "native_disk_bytes": native_bytes(config, q),
            "active_bf16_head_bytes": p.active(2),
            "active_f32_head_bytes": p.active(4),
            "resident_bf16_bytes": p.resident(2),
            "experts_bytes": p.experts,
            "attention_bytes": p.attention,
            "per_expert_bytes": p.per_expert,
        }
    p = parts(config, quant)
    return {
        "model": config.name,
        "config": {"layers": config.num_layers, "experts": config.num_experts, "selected": config.num_selected_experts,
                   "emb": config.emb_size, "ffn": config.ffn_size, "vocab": config.vocab_size,
                   "context": config.sequence_len, "parameters": config.num_parameters()},
        "quant": quant,
        "release_bytes": release_bytes(config),
        "embedding_f32_bytes": p.embedding(4),
        "embedding_bf16_bytes": p.embedding(2),
        "norms_routers_f32_bytes": p.norms_routers,
        "weights": weights,
        "kv_bytes_per_token_bf16": kv_bytes_per_token(config, 2),
        "kv_bytes_per_token_f32": kv_bytes_per_token(config, 4),
        "context": context,
        "kv_bytes_at_context_bf16": kv_bytes_per_token(config, 2) * context,
        "machine": asdict(machine),
        "placements": [dict(asdict(pl), fits=pl.fits) for pl in placements(config, quant, machine, context)],
    }


def _rate(bytes_per_s: float | None) -> str:
    return "unknown" if not bytes_per_s else f"{bytes_per_s / 1e9:.1f} GB/s"


def format_report(r: dict) -> str:
    c = r["config"]
    m = r["machine"]
    lines = [
        f"{r['model']}: {c['layers']} layers, {c['experts']} experts ({c['selected']} active), emb {c['emb']}, "
        f"expert FFN {c['ffn']}, vocab {c['vocab']}, context {c['context']}; {c['parameters'] / 1e9:.1f}B parameters",
        "Units: GB = 10^9 bytes, GiB = 2^30 bytes, GB/s = 10^9 bytes/s.",
        "",
        f"Release as published: {gb(r['release_bytes'])} ({r['release_bytes']:,} bytes): int8 projections + bf16 "
        f"scales + float32 embedding ({gb(r['embedding_f32_bytes'])}), norms and routers ({gb(r['norms_routers_f32_bytes'], 3)}).",
        "",
        "Weights per quantisation of the projections (embedding, norms, routers as stated):",
    ]
    header = ("projections", "in memory, bf16 run", "in memory, f32 run", "native on disk",
              "read/token, bf16 head", "read/token, f32 head")
    rows = []
    for q, w in r["weights"].items():
        rows.append((q, gb(w["run_bf16_bytes"]), gb(w["run_f32_bytes"]), gb(w["native_disk_bytes"]),
                     gb(w["active_bf16_head_bytes"]), gb(w["active_f32_head_bytes"])))
    lines += _table(header, rows)
    lines += [
        "  int8: int8 values + bf16 scales per output column (8 row blocks for the attention output and expert",
        "  down projections), as released; int4: 4-bit values + a bf16 scale per 32; bf16: bf16 values.",
        "  bf16 run: bf16 embedding/output head, float32 norms and routers; f32 run: float32 embedding.",
        "  native on disk: the float32 embedding plus its bf16 copy. read/token: attention, routers, norms, "
        f"{c['selected']} of {c['experts']} experts per layer, the whole output head.",
        "",
        f"KV cache (bf16 keys and values): {r['kv_bytes_per_token_bf16']:,} bytes = "
        f"{r['kv_bytes_per_token_bf16'] / 1024:.0f} KiB per token; {gib(r['kv_bytes_per_token_bf16'] * c['context'])} "
        f"at the full {c['context']}-token context (float32: {r['kv_bytes_per_token_f32'] / 1024:.0f} KiB per token).",
        "",
        "This machine:",
        f"  RAM {gb(m['ram'])} ({gib(m['ram'])}), {m['ram_source']}; bandwidth {_rate(m['ram_bandwidth'])}, "
        f"{m['ram_bandwidth_source']}",
    ]
    if m["gpus"]:
        kinds: dict[str, int] = {}
        for n, size in m["gpus"]:
            kinds[f"{n} {gb(size, 1)}"] = kinds.get(f"{n} {gb(size, 1)}", 0) + 1
        names = ", ".join(f"{count} x {k}" for k, count in kinds.items())
        lines.append(f"  GPUs: {names}, {m['gpu_source']}; bandwidth {_rate(m['gpu_bandwidth'])} each, "
                     f"{m['gpu_bandwidth_source']}")
    else:
        lines.append(f"  GPUs: {m['gpu_source']}")
    lines.append(f"  disk read: {_rate(m['disk_read']) + ', ' if m['disk_read'] else ''}{m['disk_source']}")
    lines += [
        "",
        f"Placements ({r['quant']} projections, bf16 activations, KV cache for {r['context']} tokens; "
        f"'fits' leaves {100 - 100 * USABLE_FRACTION:.0f} % of each memory free):",
    ]
    rows = []
    for pl in r["placements"]:
        need = ", ".join(f"{k.upper()} {gb(v)} of {gb(pl['has'].get(k, 0))}" for k, v in pl["needs"].items())
        tps = "unknown" if pl["tokens_per_s"] is None else f"{pl['tokens_per_s']:.2f}"
        rows.append((pl["name"], "yes" if pl["fits"] else "no", need, tps, pl["supported"]))
    lines += _table(("placement", "fits", "needs (usable)", "tok/s roofline", "in grok1"), rows)
    for pl in r["placements"]:
        lines.append(f"  {pl['name']}: {pl['where']}" + (f"; {pl['note']}" if pl["note"] else ""))
    return "\n".join(lines)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    out = ["  " + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  " + "  ".join("-" * w for w in widths))
    out += ["  " + "  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return out
