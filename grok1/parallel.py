"""Tensor and expert parallelism over `torch.distributed` (NCCL between GPUs, gloo between CPUs).

Launched by `torchrun`, every rank runs the same program on the same tokens and holds one part of
every layer:

- attention: a contiguous range of query heads and the key/value heads they read (split when the
  kv-head count is a multiple of the world size, replicated when the world size is a multiple of
  it). q/k/v are column-parallel, the output projection row-parallel: each rank's partial product is
  summed across ranks (`all_reduce`).
- MoE: the experts are partitioned across ranks (or, with more ranks than experts, each expert's FFN
  columns are). Every rank routes every token (the router is replicated), evaluates its own experts
  on the tokens that chose them, and the gated partial sums are added across ranks in float32 before
  the MoE output is rounded to bfloat16, the order of the official code.
- embedding and output head: vocab-parallel. A token's row is looked up on the rank that owns it
  (an exact all_reduce of one row and zeros); each rank computes the logits of its vocabulary slice
  and the slices are gathered, so every rank samples from the same full logits.
- replicated: the RMSNorm scales and the routers (and the k/v projections of a replicated kv head).

Sums across ranks are done in float32: with bfloat16 activations each rank's partial product is
rounded to bfloat16 first, as in the official 8-way sharded run.

Each rank reads only its own slices: a native model is memory-mapped and sliced as views; release
files are scanned for their payload offsets and only the rank's rows/columns/experts are copied out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .config import Grok1Config
from .errors import CheckpointError, Grok1Error
from .model import Grok1, ParamSpec, parameter_specs
from .quant import INT4_GROUP, BF16Weight, Int4Weight, Int8Weight

TIMEOUT = timedelta(minutes=30)  # a rank may wait this long for the slowest one (e.g. while it loads)
EMBEDDING_PATH = "language_model/in_out_embed/embeddings"

Weight = torch.Tensor | Int8Weight | Int4Weight | BF16Weight


# ---- placement ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """What one rank holds: ranges of heads, experts, FFN columns (of each local expert) and vocabulary."""

    rank: int
    world_size: int
    q_heads: range
    kv_heads: range
    experts: range
    ffn: range
    vocab: range
    vocab_sizes: tuple[int, ...]  # every rank's vocabulary slice, for gathering the logits

    def describe(self) -> str:
        def span(r: range) -> str:
            return f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}"

        return (f"rank {self.rank}/{self.world_size}: q heads {span(self.q_heads)}, kv heads {span(self.kv_heads)}, "
                f"experts {span(self.experts)} (ffn columns {span(self.ffn)}), vocab rows {span(self.vocab)}")


def _even(n: int, parts: int, index: int) -> range:
    size = n // parts
    return range(index * size, (index + 1) * size)


def plan(config: Grok1Config, world_size: int, rank: int) -> Placement:
    """The part of the model `rank` holds among `world_size` ranks. Sizes that cannot be split are
    refused with a `Grok1Error` naming the dimension."""
    n = world_size
    if n < 1 or not 0 <= rank < n:
        raise Grok1Error(f"rank {rank} is outside a world of {n} ranks")
    hq, hkv = config.num_q_heads, config.num_kv_heads
    if hkv % n == 0:
        kv_heads = _even(hkv, n, rank)
        group = config.q_heads_per_kv_head
        q_heads = range(kv_heads.start * group, kv_heads.stop * group)
    elif n % hkv == 0 and hq % n == 0:
        kv_heads = range(rank // (n // hkv), rank // (n // hkv) + 1)
        q_heads = _even(hq, n, rank)
    else:
        raise Grok1Error(
            f"cannot split attention over {n} ranks: num_kv_heads ({hkv}) must be a multiple of the world size, "
            f"or the world size a multiple of num_kv_heads with num_q_heads ({hq}) a multiple of the world size"
        )
    e, f = config.num_experts, config.ffn_size
    if e % n == 0:
        experts, ffn = _even(e, n, rank), range(f)
    elif n % e == 0:
        parts = n // e
        if f % parts:
            raise Grok1Error(
                f"cannot split the experts over {n} ranks: with {e} experts (num_experts) each expert's ffn_size "
                f"({f}) is split {parts} ways and must be a multiple of {parts}"
            )
        experts, ffn = range(rank // parts, rank // parts + 1), _even(f, parts, rank % parts)
    else:
        raise Grok1Error(
            f"cannot split the experts over {n} ranks: num_experts ({e}) must be a multiple of the world size, "
            "or the world size a multiple of num_experts"
        )
    v = config.vocab_size
    if v < n:
        raise Grok1Error(f"cannot split the vocabulary over {n} ranks: vocab_size ({v}) is smaller")
    sizes = tuple(v // n + (1 if r < v % n else 0) for r in range(n))  # uneven sizes are fine
    start = sum(sizes[:rank])
    return Placement(rank, n, q_heads, kv_heads, experts, ffn, range(start, start + sizes[rank]), sizes)


def plan_all(config: Grok1Config, world_size: int) -> list[Placement]:
    return [plan(config, world_size, r) for r in range(world_size)]


# ---- slicing weights ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cut:
    """A rank's part of one weight: a range of experts (leading axis), output columns, input rows."""

    experts: range | None = None
    out: range | None = None
    rows: range | None = None


def _part(r: range, n: int) -> range | None:
    return None if len(r) == n else r


def cut_for(spec: ParamSpec, config: Grok1Config, p: Placement) -> Cut | None:
    """How `spec` is split for the rank of placement `p` (None: it holds the whole parameter)."""
    kind = spec.path.split("/", 2)[-1] if spec.path.startswith("transformer/") else spec.path
    dk = config.key_size
    q_cols = _part(range(p.q_heads.start * dk, p.q_heads.stop * dk), config.q_proj_size)
    kv_cols = _part(range(p.kv_heads.start * dk, p.kv_heads.stop * dk), config.kv_proj_size)
    experts, ffn = _part(p.experts, config.num_experts), _part(p.ffn, config.ffn_size)
    cut = {
        EMBEDDING_PATH: Cut(rows=_part(p.vocab, config.vocab_size)),
        "multi_head_attention/query/w": Cut(out=q_cols),
        "multi_head_attention/key/w": Cut(out=kv_cols),
        "multi_head_attention/value/w": Cut(out=kv_cols),
        "multi_head_attention/linear/w": Cut(rows=q_cols),
        "moe/linear/w": Cut(experts=experts, out=ffn),
        "moe/linear_v/w": Cut(experts=experts, out=ffn),
        "moe/linear_1/w": Cut(experts=experts, rows=ffn),
    }.get(kind)  # norms and routers are replicated
    return None if cut is None or cut == Cut() else cut


def _scale_blocks(rows: range, blocks: int, block_rows: int, what: str) -> slice:
    """The scale blocks (of `block_rows` input rows each) holding input rows [a, b): whole blocks, or
    the one block the rows lie in."""
    a, b = rows.start, rows.stop
    if a % block_rows == 0 and b % block_rows == 0:
        return slice(a // block_rows, b // block_rows)
    if a // block_rows == (b - 1) // block_rows:
        return slice(a // block_rows, a // block_rows + 1)
    raise Grok1Error(
        f"{what}: this rank's input rows {a}..{b - 1} cross the boundaries of the weight's {blocks} scale blocks "
        f"of {block_rows} rows; choose a world size whose slices line up with them"
    )


def cut_weight(w: Weight, cut: Cut, what: str = "weight") -> Weight:
    """A rank's slice of a stored weight, as views where the bytes are contiguous (a memory-mapped
    weight stays mapped) and as a compact copy of just its bytes where they are strided."""
    e = slice(cut.experts.start, cut.experts.stop) if cut.experts is not None else slice(None)
    o = slice(cut.out.start, cut.out.stop) if cut.out is not None else slice(None)
    if isinstance(w, torch.Tensor):  # a plain table: rows
        return w[cut.rows.start : cut.rows.stop] if cut.rows is not None else w
    if isinstance(w, Int8Weight):  # [E?, blocks, out, in/blocks]
        q, s = w.qweight[e], w.scales[e]
        q, s = q[..., o, :], s[..., o]
        if cut.rows is not None:
            block_rows = q.shape[-1]
            keep = _scale_blocks(cut.rows, q.shape[-3], block_rows, what)
            q, s = q[..., keep, :, :], s[..., keep, :]
            first = keep.start * block_rows
            q = q[..., cut.rows.start - first : cut.rows.stop - first] if len(cut.rows) < block_rows else q
        return Int8Weight(q.contiguous(), s.contiguous())
    if isinstance(w, Int4Weight):  # [E?, out, in/32, 16]
        p, s = w.packed[e], w.scales[e]
        p, s = p[..., o, :, :], s[..., o, :]
        if cut.rows is not None:
            a, b = cut.rows.start, cut.rows.stop
            if a % INT4_GROUP or b % INT4_GROUP:
                raise Grok1Error(
                    f"{what}: this rank's input rows {a}..{b - 1} are not whole int4 groups of {INT4_GROUP}; "
                    "choose a world size that splits this dimension into multiples of 32"
                )
            p, s = p[..., a // INT4_GROUP : b // INT4_GROUP, :], s[..., a // INT4_GROUP : b // INT4_GROUP]
        return Int4Weight(p.contiguous(), s.contiguous())
    if isinstance(w, BF16Weight):  # [E?, out, in]
        t = w.weight[e][..., o, :]
        if cut.rows is not None:
            t = t[..., cut.rows.start : cut.rows.stop]
        return BF16Weight(t.contiguous())
    raise Grok1Error(f"{what}: weights of type {type(w).__name__} cannot be split across ranks")


def cut_release(weight: torch.Tensor, scales: torch.Tensor, cut: Cut, what: str) -> Int8Weight:
    """A rank's slice of a release int8 weight (layout [E?, in, out] with scales [E?, blocks, out]),
    copied out of the (mapped) payload into the model's output-major layout."""
    if cut.experts is not None:
        weight, scales = weight[cut.experts.start : cut.experts.stop], scales[cut.experts.start : cut.experts.stop]
    if cut.out is not None:
        weight, scales = weight[..., cut.out.start : cut.out.stop], scales[..., cut.out.start : cut.out.stop]
    if cut.rows is not None:
        blocks = scales.shape[-2]
        keep = _scale_blocks(cut.rows, blocks, weight.shape[-2] // blocks, what)
        weight = weight[..., cut.rows.start : cut.rows.stop, :]
        scales = scales[..., keep, :]  # rows inside one block share its scales
    return Int8Weight.from_release(weight, scales.contiguous())


# ---- the process group -------------------------------------------------------------------------


def env_world() -> tuple[int, int, int, int]:
    """(rank, world size, local rank, local world size) from the variables torchrun sets."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    defaults = ("0", "1", os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1"))
    values = []
    for name, default in zip(names, defaults, strict=True):
        text = os.environ.get(name, default)
        try:
            values.append(int(text))
        except ValueError:
            raise Grok1Error(f"environment variable {name}={text!r} is not an integer") from None
    rank, world, local_rank, local_world = values
    if world < 1 or not 0 <= rank < world:
        raise Grok1Error(f"RANK={rank} is outside WORLD_SIZE={world}")
    return rank, world, local_rank, local_world


def rank_device(devices: str | None, local_rank: int, local_world: int) -> torch.device:
    """This rank's device from `--devices`: cpu, cuda (cuda:LOCAL_RANK), mps, one device for every
    rank, or a comma-separated list indexed by local rank. Default: cuda when this host has a GPU
    per local rank, else cpu."""
    if devices is None or devices.strip() == "":
        cuda = torch.cuda.is_available() and torch.cuda.device_count() >= local_world
        devices = "cuda" if cuda else "cpu"
    entries = [d.strip() for d in devices.split(",") if d.strip()]
    if len(entries) > 1:
        if len(entries) != local_world:
            raise Grok1Error(f"--devices lists {len(entries)} devices for the {local_world} ranks on this host")
        entry = entries[local_rank]
    else:
        entry = entries[0]
    try:
        device = torch.device(entry)
    except RuntimeError as exc:
        raise Grok1Error(f"--devices: unknown device {entry!r} ({exc})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise Grok1Error("--devices asks for cuda, but PyTorch sees no CUDA device on this host")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise Grok1Error(
                f"local rank {local_rank} needs {device}, but this host has {torch.cuda.device_count()} CUDA device(s)"
            )
    return device


class Group:
    """This rank's place in the process group and the collectives the model needs. Sums are done in
    float32; tensors travel through the CPU when the backend (gloo) does not take the device's."""

    def __init__(self, rank: int, world_size: int, device: torch.device, comm_device: torch.device,
                 process_group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.world_size = rank, world_size
        self.device, self.comm_device = device, comm_device
        self.process_group = process_group

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in float32, returned in x's dtype and device (x may be overwritten)."""
        y = x.to(device=self.comm_device, dtype=torch.float32)
        dist.all_reduce(y, group=self.process_group)
        return y.to(device=x.device, dtype=x.dtype)

    def all_gather_last(self, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        """Concatenates every rank's x along the last axis (rank r contributing sizes[r] entries)."""
        width = max(sizes)
        y = x.to(device=self.comm_device, dtype=torch.float32)
        if y.shape[-1] < width:
            y = F.pad(y, (0, width - y.shape[-1]))
        parts = [torch.empty_like(y) for _ in range(self.world_size)]
        dist.all_gather(parts, y.contiguous(), group=self.process_group)
        whole = torch.cat([part[..., :n] for part, n in zip(parts, sizes, strict=True)], dim=-1)
        return whole.to(device=x.device, dtype=x.dtype)

    def ranks_where(self, flag: bool) -> list[int]:
        """The ranks on which `flag` is true (every rank must call this)."""
        flags = [torch.zeros(1, dtype=torch.int64, device=self.comm_device) for _ in range(self.world_size)]
        dist.all_gather(flags, torch.tensor([int(flag)], device=self.comm_device), group=self.process_group)
        return [r for r, f in enumerate(flags) if int(f)]

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value, on every rank."""
        t = torch.tensor([value], dtype=torch.int64, device=self.comm_device)
        dist.broadcast(t, src=0, group=self.process_group)
        return int(t)

    def shared_seed(self, seed: int | None) -> int:
        """A sampling seed every rank agrees on (rank 0 draws one when none is given), so that the
        ranks, which all sample from the same logits, draw the same tokens."""
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 2
        return self.broadcast_int(seed)


def init(devices: str | None = None) -> Group:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
    NCCL when every rank is on a CUDA device, gloo otherwise."""
    rank, world, local_rank, local_world = env_world()
    device = rank_device(devices, local_rank, local_world)
    if dist.is_initialized():
        backend = dist.get_backend()
    else:
        entries = [d.strip() for d in (devices or "").split(",") if d.strip()]
        all_cuda = device.type == "cuda" and all(e.startswith("cuda") for e in entries)
        backend = "nccl" if all_cuda and dist.is_nccl_available() else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=TIMEOUT)
        except ValueError as exc:
            raise Grok1Error(
                f"cannot join the process group ({exc}); launch with torchrun, which sets MASTER_ADDR and MASTER_PORT"
            ) from None
    comm = device if backend == "nccl" else torch.device("cpu")
    return Group(dist.get_rank(), dist.get_world_size(), device, comm)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---- hooking a model up ------------------------------------------------------------------------


class VocabShard:
    """The vocab-parallel embedding lookup and output gather for one rank."""

    def __init__(self, rows: range, sizes: tuple[int, ...], group: Group) -> None:
        self.rows, self.sizes, self.group = rows, sizes, group

    def lookup(self, table: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Embedding rows of `tokens` from a table holding rows `self.rows`: exact (one rank
        contributes each row, the others zeros)."""
        here = (tokens >= self.rows.start) & (tokens < self.rows.stop)
        local = table[torch.where(here, tokens - self.rows.start, 0)]
        return self.group.all_reduce(local.masked_fill(~here[..., None], 0))

    def gather(self, logits: torch.Tensor) -> torch.Tensor:
        return self.group.all_gather_last(logits, self.sizes)


def attach(model: Grok1, placement: Placement, group: Group) -> Grok1:
    """Tells the model's modules which heads, experts and vocabulary rows they hold, and how to sum
    partial results across ranks."""
    for layer in model.layers:
        layer.attn.num_q_heads = len(placement.q_heads)
        layer.attn.num_kv_heads = len(placement.kv_heads)
        layer.attn.reduce = group.all_reduce
        layer.moe.local_experts = placement.experts
        layer.moe.reduce = group.all_reduce
    model.vocab_shard = VocabShard(placement.vocab, placement.vocab_sizes, group)
    model.placement = placement
    model.forget_layer_plan()
    return model


# ---- sharded loading ---------------------------------------------------------------------------


def read_model_config(path: str | os.PathLike[str]) -> Grok1Config:
    """The config of a native or release directory (sharded loading reads those two)."""
    from .formats import native, xai
    from .loader import read_config

    path = os.fspath(path)
    if path.lower().endswith(".gguf"):
        raise Grok1Error(f"{path}: sharded loading reads native or release directories; convert the GGUF first")
    if not os.path.isdir(path):
        raise Grok1Error(f"{path}: no such model directory")
    if not native.is_native(path) and not os.path.isdir(os.path.join(path, xai.CHECKPOINT_SUBDIR)):
        raise CheckpointError(
            f"{path}: neither a native model ({native.INDEX_FILE}) nor the release layout ({xai.CHECKPOINT_SUBDIR}/)"
        )
    return read_config(path)


def check(path: str | os.PathLike[str], world_size: int) -> Grok1Config:
    """Refuses (before any rank waits for the others) a model that cannot be split `world_size` ways."""
    config = read_model_config(path)
    plan_all(config, world_size)
    return config


def _load_native(model: Grok1, path: str, p: Placement, place: Callable[[str, Weight], None]) -> None:
    from .formats import native

    config, act = model.config, model.activation_dtype
    ckpt = native.NativeCheckpoint(path)
    problems = ckpt.check_layout(config)
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    for spec in parameter_specs(config).values():
        cut = cut_for(spec, config, p)
        if spec.path == EMBEDDING_PATH:
            has_bf16 = act == torch.bfloat16 and native.EMBEDDING_BF16 in ckpt.location
            value = ckpt.tensor(native.EMBEDDING_BF16 if has_bf16 else native.EMBEDDING)
            place(spec.path, (cut_weight(value, cut) if cut is not None else value).to(act))
            continue
        value = ckpt.weight(spec)
        place(spec.path, cut_weight(value, cut, native.base_name(spec)) if cut is not None else value)
    model.checkpoint = ckpt  # keeps the mappings alive with the model


def _load_release(model: Grok1, path: str, p: Placement, place: Callable[[str, Weight], None]) -> None:
    from .convert import mapped
    from .formats import xai

    config, act = model.config, model.activation_dtype
    ckpt = os.path.join(path, xai.CHECKPOINT_SUBDIR)
    for index, spec in enumerate(xai.release_order(config)):
        file = os.path.join(ckpt, xai.tensor_filename(index))
        scanned = xai.scan_checked(file, spec)  # payload offsets; nothing large is read
        cut = cut_for(spec, config, p)
        if not spec.quantised:
            with mapped(scanned.array) as view:
                value = cut_weight(view, cut) if cut is not None else view
                place(spec.path, value.to(act) if act != torch.float32 else value.clone())
        else:
            with mapped(scanned.weight) as weight, mapped(scanned.scales) as scales:
                place(spec.path, cut_release(weight, scales, cut or Cut(), f"{file} ({spec.path})"))


def weight_bytes(model: Grok1) -> int:
    """Bytes of the weights a model (or one rank's part of it) holds, as stored."""
    total = 0
    for _, value in model.named_official_weights():
        tensors = [value] if isinstance(value, torch.Tensor) else list(value.buffers())
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def load(path: str | os.PathLike[str], group: Group | None = None, *, dtype: str | torch.dtype | None = None,
         exact: bool = False) -> Grok1:
    """This rank's part of the model at `path` (native or release directory), on `group.device`,
    hooked up to the other ranks. Every rank must call it; an error on any rank is raised on all."""
    from .formats import native
    from .loader import resolve_dtype

    group = group or init()
    path = os.fspath(path)
    failure: Exception | None = None
    model = None
    try:
        act = resolve_dtype(dtype)
        config = read_model_config(path)
        placement = plan(config, group.world_size, group.rank)
        model = attach(Grok1(config, activation_dtype=act), placement, group)

        def place(param_path: str, value: Weight) -> None:
            model.set_weight(param_path, value.to(group.device) if group.device.type != "cpu" else value)

        read = _load_native if native.is_native(path) else _load_release
        read(model, path, placement, place)
        model.use_fast_kernels(act == torch.bfloat16 and not exact)
        model.eval()
    except Exception as exc:  # re-raised below, after telling the other ranks
        failure = exc
    failed = group.ranks_where(failure is not None)
    if failure is not None:
        if len(failed) < group.world_size:
            failure.rank = group.rank  # this rank's own problem: it reports it, the others that it failed
        raise failure
    if failed:
        raise Grok1Error(f"rank(s) {', '.join(map(str, failed))} could not load their part of {path}")
    return model
