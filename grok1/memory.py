"""Running a model larger than the memory grok1 may use: expert weights read from the files on demand.

`grok1.load(path, max_memory=...)` on a native directory builds the model with

- the *resident* part (attention projections, routers, norms, the embedding table in the activation
  dtype) read once into process memory, and
- every expert stack (`moe.linear`, `moe.linear_v`, `moe.linear_1`) as a `StreamedWeight`: a module with
  the same `dequantize(expert)` / `linear(x, expert)` interface as the in-memory weight types, whose
  experts live in an `ExpertStore`.

The store reads one expert of one stack (its int8 values and its scales: two contiguous byte ranges,
the native layout being expert-outermost) with `os.preadv`, by default through `O_DIRECT` (no page
cache copy, so what grok1 holds is what it counts; the data keeps its file offset modulo 4096 bytes, so
the kernels get operands aligned as on a memory-mapped model and give bit-identical results). A reader
thread works through a priority queue: the MoE calls `prefetch(experts)` on each stack right after its
router has run, so the reads of a layer's experts are queued at once, in the order the experts are
computed, and the first expert's matmuls overlap the second's read.

Everything the store holds (cached experts, experts being read, recycled buffers) stays within its
byte budget, `max_memory` minus the resident part. When a buffer is needed and the budget is spent,
the least frequently used expert that no computation holds is evicted (ties: least recently used;
the counts are halved periodically so that the cache follows a change of topic). A rarely used expert
that was just read has a low count, so it is the first to go unless it keeps being used: the experts
that stay are the hottest ones, and a budget that holds only one layer's experts still works (every
expert is then read once per use).
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import Grok1Config
from .errors import CheckpointError, Grok1Error
from .formats import native
from .model import Grok1, parameter_specs
from .quant import BF16Weight, Int4Weight, Int8Weight
from .units import human, parse_size

PAGE = 4096  # O_DIRECT alignment of offsets, lengths and buffer addresses (covers 512-byte sectors)
EXPERT_PARTS = ("moe/linear/w", "moe/linear_v/w", "moe/linear_1/w")  # in the order the MoE uses them
CONVERT_CHUNK_BYTES = 64 * 2**20  # float32 embedding rows converted to bf16 this many bytes at a time


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


# ---- reading ranges of shard files ---------------------------------------------------------------


class ShardReader:
    """Reads byte ranges of a native model's shards into page-aligned buffers.

    With `direct` (the default where the filesystem allows it) reads go through O_DIRECT: the disk
    is read exactly once per range, nothing is left in the page cache, and `read_bytes` in
    /proc/self/io counts them. Otherwise the file is read through the page cache with read-ahead off
    (POSIX_FADV_RANDOM), and the range is dropped from the cache after the copy (POSIX_FADV_DONTNEED).
    """

    def __init__(self, ckpt: native.NativeCheckpoint, direct: bool = True) -> None:
        self.ckpt = ckpt
        self.direct = direct and hasattr(os, "O_DIRECT")
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def fd(self, shard: str) -> int:
        with self._lock:
            if shard not in self._fds:
                path = os.path.join(self.ckpt.path, shard)
                fd = -1
                if self.direct:
                    try:
                        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                    except OSError:
                        self.direct = False  # e.g. tmpfs: fall back to buffered reads
                if fd < 0:
                    try:
                        fd = os.open(path, os.O_RDONLY)
                    except OSError as exc:
                        raise CheckpointError(f"{path}: cannot open the shard ({exc.strerror})") from None
                    if hasattr(os, "posix_fadvise"):
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                self._fds[shard] = fd
            return self._fds[shard]

    def span(self, nbytes: int) -> int:
        """Buffer bytes one range of `nbytes` needs wherever it starts (page padding on both sides)."""
        return _round_up(nbytes, PAGE) + PAGE

    def read_into(self, shard: str, offset: int, nbytes: int, buffer: torch.Tensor) -> tuple[int, int]:
        """Reads file bytes [offset, offset + nbytes) into `buffer` (uint8, page-aligned start, at least
        `span(nbytes)` long), at the same position modulo 4096 as in the file. Returns (position of the
        data in the buffer, bytes read from the file)."""
        head = offset % PAGE
        start = offset - head
        length = _round_up(head + nbytes, PAGE) if self.direct else head + nbytes
        fd = self.fd(shard)
        target = buffer[:length].numpy() if self.direct else buffer[head : head + nbytes].numpy()
        view = memoryview(target)
        done = 0
        first = start if self.direct else offset
        want = length if self.direct else nbytes
        try:
            done = _pread_fully(fd, view, first, want)
        except OSError as exc:
            if self.direct and exc.errno == 22 and done == 0:  # EINVAL: this file system refuses O_DIRECT
                self._reopen_buffered(shard)
                return self.read_into(shard, offset, nbytes, buffer)
            raise CheckpointError(f"{os.path.join(self.ckpt.path, shard)}: read failed at byte {first + done} "
                                  f"({exc.strerror})") from None
        finally:
            view.release()
        needed = (head + nbytes) if self.direct else nbytes
        if done < needed:
            raise CheckpointError(
                f"{os.path.join(self.ckpt.path, shard)}: the file ends at byte {first + done}, but its header "
                f"places data up to byte {offset + nbytes}; the shard is truncated"
            )
        if not self.direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        return head, done

    def _reopen_buffered(self, shard: str) -> None:
        with self._lock:
            self.direct = False
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()


def _pread_fully(fd: int, view: memoryview, offset: int, want: int) -> int:
    done = 0
    while done < want:
        got = os.preadv(fd, [view[done:want]], offset + done)
        if got == 0:
            break
        done += got
    return done


def aligned_buffer(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of `nbytes` whose first byte is page-aligned."""
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    pad = (-raw.data_ptr()) % PAGE
    return raw[pad : pad + nbytes]


def read_tensor(reader: ShardReader, name: str) -> torch.Tensor:
    """One whole tensor of the checkpoint, read into process memory (its address keeps the file's
    alignment modulo 4096)."""
    ckpt = reader.ckpt
    if name not in ckpt.location:
        raise CheckpointError(f"{ckpt.path}: tensor {name} is missing")
    shard = ckpt.location[name]
    info = ckpt.shards[shard]
    dtype, shape, start, end = info.entries[name]
    nbytes = end - start
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    buffer = aligned_buffer(reader.span(nbytes))
    head, _ = reader.read_into(shard, info.data_start + start, nbytes, buffer)
    return buffer[head : head + nbytes].view(dtype).view(shape)


def read_bf16_embedding(reader: ShardReader) -> torch.Tensor:
    """The bf16 embedding table: stored, or converted from the float32 one a slice of rows at a time."""
    ckpt = reader.ckpt
    if native.EMBEDDING_BF16 in ckpt.location:
        return read_tensor(reader, native.EMBEDDING_BF16)
    meta = ckpt.meta(native.EMBEDDING)
    vocab, width = meta.shape
    out = torch.empty(vocab, width, dtype=torch.bfloat16)
    shard = ckpt.location[native.EMBEDDING]
    info = ckpt.shards[shard]
    _, _, start, _ = info.entries[native.EMBEDDING]
    rows = max(1, CONVERT_CHUNK_BYTES // (4 * width))
    buffer = aligned_buffer(reader.span(rows * width * 4))
    for r0 in range(0, vocab, rows):
        r1 = min(vocab, r0 + rows)
        nbytes = (r1 - r0) * width * 4
        head, _ = reader.read_into(shard, info.data_start + start + r0 * width * 4, nbytes, buffer)
        out[r0:r1] = buffer[head : head + nbytes].view(torch.float32).view(r1 - r0, width)
    return out


# ---- the expert store ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One expert-stacked tensor of a weight (e.g. `...moe.linear.qweight`)."""

    shard: str
    offset: int  # file offset of expert 0
    stride: int  # bytes per expert
    dtype: torch.dtype
    shape: tuple[int, ...]  # one expert's shape


@dataclass
class StackInfo:
    """How to read one expert of one stack, and what to build from the bytes."""

    name: str  # the official path, for messages
    kind: str  # int8 | int4 | bf16
    parts: list[Part]
    span: int  # buffer bytes for one expert (the same for every stack, so buffers are interchangeable)
    charge: int  # bytes counted against the budget per expert (int4 adds its repacked kernel copy)


QUEUED, READING, READY, FAILED = "queued", "reading", "ready", "failed"


@dataclass
class Entry:
    key: tuple[int, int]  # (stack id, expert)
    charge: int
    state: str = QUEUED
    buffer: torch.Tensor | None = None
    module: nn.Module | None = None
    pins: int = 0  # computations (or an unconsumed prefetch) holding it
    prefetched: bool = False
    last_use: int = 0
    error: BaseException | None = None


@dataclass
class StoreCounters:
    bytes_read: int = 0  # bytes read from the files (page padding included)
    reads: int = 0  # experts read
    hits: int = 0  # requests served from memory
    misses: int = 0  # requests that had to read
    evictions: int = 0
    stall_s: float = 0.0  # time computations waited for a read
    read_s: float = 0.0  # time the reader spent in reads

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass(order=True)
class _Job:
    priority: tuple
    key: tuple[int, int] = field(compare=False)


class ExpertStore:
    """Experts of every streamed stack, cached within `budget` bytes, read by background threads."""

    def __init__(self, reader: ShardReader, budget: int, threads: int = 1) -> None:
        self.reader = reader
        self.budget = budget
        self.stacks: list[StackInfo] = []
        self.entries: dict[tuple[int, int], Entry] = {}
        self.counters = StoreCounters()
        self.allocated = 0  # bytes of buffers held (entries + free list), <= budget
        self._free: dict[tuple[int, int], list[torch.Tensor]] = {}  # (span, charge) -> spare buffers
        self._freq: dict[tuple[int, int], float] = {}
        self._queue: list[_Job] = []
        self._prefetched: dict[int, set[int]] = {}
        self._sequence = itertools.count()
        self._batch = 0
        self._clock = 0
        self._uses_since_aging = 0
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._run, name=f"grok1-expert-reader-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    # ---- registration ---------------------------------------------------------------------------
    def add_stack(self, info: StackInfo) -> int:
        if info.charge > self.budget:
            raise Grok1Error(f"{info.name}: one expert needs {human(info.charge)}, more than the expert "
                             f"budget of {human(self.budget)}")
        self.stacks.append(info)
        return len(self.stacks) - 1

    # ---- requests (computation side) ------------------------------------------------------------
    def prefetch(self, stack: int, experts: Sequence[int], part: int = 0) -> None:
        """Queues reads of these experts of a stack (in this order), behind earlier prefetches and
        ahead of later ones; a stack's previous prefetches that were never used are released."""
        with self._cond:
            if part == 0:
                self._batch += 1
            for expert in self._prefetched.pop(stack, set()):
                entry = self.entries.get((stack, expert))
                if entry is not None and entry.prefetched:
                    entry.prefetched = False
                    self._unpin(entry)
            chosen = set()
            for position, expert in enumerate(experts):
                entry = self._request((stack, expert), (1, self._batch, position, part))
                if not entry.prefetched:
                    entry.prefetched = True
                    entry.pins += 1
                chosen.add(expert)
            self._prefetched[stack] = chosen
            self._cond.notify_all()

    @contextmanager
    def use(self, stack: int, expert: int) -> Iterator[nn.Module]:
        """The expert's weight module (leading expert axis of 1), held in memory for the block."""
        key = (stack, expert)
        with self._cond:
            entry = self.entries.get(key)
            if entry is not None and entry.prefetched:
                entry.prefetched = False  # the prefetch's pin becomes this use's
                self._prefetched.get(stack, set()).discard(expert)
            else:
                entry = self._request(key, (0, next(self._sequence)))
                entry.pins += 1
                self._cond.notify_all()
            self._count_use(key)
            if entry.state != READY and entry.state != FAILED:
                started = time.perf_counter()
                while entry.state != READY and entry.state != FAILED:
                    self._cond.wait()
                self.counters.stall_s += time.perf_counter() - started
            if entry.state == FAILED:
                error = entry.error
                self._unpin(entry)
                self.entries.pop(key, None)
                raise error
            self._clock += 1
            entry.last_use = self._clock
        try:
            yield entry.module
        finally:
            with self._cond:
                self._unpin(entry)

    def _request(self, key: tuple[int, int], priority: tuple) -> Entry:
        entry = self.entries.get(key)
        if entry is not None:
            if entry.state == READY:
                self.counters.hits += 1
            elif entry.state == QUEUED:
                heapq.heappush(self._queue, _Job(priority, key))  # re-queued at the higher priority
            return entry
        self.counters.misses += 1
        entry = Entry(key, self.stacks[key[0]].charge)
        self.entries[key] = entry
        heapq.heappush(self._queue, _Job(priority, key))
        return entry

    def _count_use(self, key: tuple[int, int]) -> None:
        self._freq[key] = self._freq.get(key, 0.0) + 1.0
        self._uses_since_aging += 1
        if self._uses_since_aging >= 8 * max(1, len(self._freq)):
            self._uses_since_aging = 0
            for k in self._freq:
                self._freq[k] *= 0.5

    def _unpin(self, entry: Entry) -> None:
        entry.pins -= 1
        if entry.pins <= 0:
            entry.pins = 0
            self._cond.notify_all()  # a reader may be waiting for memory

    # ---- memory ---------------------------------------------------------------------------------
    def _allocate(self, span: int, charge: int) -> torch.Tensor | None:
        """A buffer of `span` bytes charged `charge` bytes, evicting as needed; None while every byte
        of the budget is held by experts in use (the caller waits for one to be released)."""
        free = self._free.get((span, charge))
        if free:
            return free.pop()
        while self.allocated + charge > self.budget:
            victim = self._victim()
            if victim is None:
                if not self._drop_free_buffer():
                    return None
                continue
            self._evict(victim)
            if victim.buffer is not None and (victim.buffer.numel(), victim.charge) == (span, charge):
                buffer, victim.buffer = victim.buffer, None
                return buffer
            self._release_buffer(victim)
        self.allocated += charge
        return aligned_buffer(span)

    def _victim(self) -> Entry | None:
        best, best_score = None, None
        for entry in self.entries.values():
            if entry.state != READY or entry.pins:
                continue
            score = (self._freq.get(entry.key, 0.0), entry.last_use)
            if best_score is None or score < best_score:
                best, best_score = entry, score
        return best

    def _evict(self, entry: Entry) -> None:
        del self.entries[entry.key]
        entry.module = None
        self.counters.evictions += 1

    def _release_buffer(self, entry: Entry) -> None:
        """Moves an entry's buffer to the free list (still counted in `allocated`)."""
        if entry.buffer is not None:
            self._free.setdefault((entry.buffer.numel(), entry.charge), []).append(entry.buffer)
            entry.buffer = None

    def _drop_free_buffer(self) -> bool:
        for (_, charge), buffers in self._free.items():
            if buffers:
                buffers.pop()
                self.allocated -= charge
                return True
        return False

    # ---- reading (reader threads) ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closed:
                        return
                    job = self._next_job()
                    if job is None:
                        self._cond.wait()
                        continue
                    entry = self.entries[job.key]
                    info = self.stacks[job.key[0]]
                    buffer = self._allocate(info.span, info.charge)
                    if buffer is None:
                        self._cond.wait(0.05)  # all memory held by experts in use: wait for a release
                        continue
                    heapq.heappop(self._queue)
                    entry.state, entry.buffer = READING, buffer
                    break
            started = time.perf_counter()
            try:
                module, nbytes = self._read(info, job.key[1], buffer)
                error = None
            except BaseException as exc:  # reported to the computation that waits for it
                module, nbytes, error = None, 0, exc
            elapsed = time.perf_counter() - started
            with self._cond:
                self.counters.read_s += elapsed
                if error is None:
                    entry.module, entry.state = module, READY
                    self.counters.bytes_read += nbytes
                    self.counters.reads += 1
                else:
                    entry.state, entry.error = FAILED, error
                    self._release_buffer(entry)
                self._cond.notify_all()

    def _next_job(self) -> _Job | None:
        while self._queue:
            job = self._queue[0]
            entry = self.entries.get(job.key)
            if entry is None or entry.state != QUEUED:
                heapq.heappop(self._queue)  # stale: read already, or a duplicate at a lower priority
                continue
            return job
        return None

    def _read(self, info: StackInfo, expert: int, buffer: torch.Tensor) -> tuple[nn.Module, int]:
        tensors = []
        position = 0
        total = 0
        for part in info.parts:
            nbytes = part.stride
            span = self.reader.span(nbytes)
            head, done = self.reader.read_into(part.shard, part.offset + expert * part.stride, nbytes,
                                               buffer[position : position + span])
            view = buffer[position + head : position + head + nbytes].view(part.dtype).view(1, *part.shape)
            tensors.append(view)
            position += span
            total += done
        if info.kind == "int8":
            return Int8Weight(*tensors), total
        if info.kind == "int4":
            return Int4Weight(*tensors), total
        return BF16Weight(*tensors), total

    # ---- reporting and shutdown -----------------------------------------------------------------
    def snapshot(self) -> dict[str, float]:
        with self._cond:
            return self.counters.as_dict()

    @property
    def cached_bytes(self) -> int:
        with self._cond:
            return sum(e.charge for e in self.entries.values() if e.state == READY)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
        with self._cond:
            self.entries.clear()
            self._free.clear()
            self.allocated = 0
        self.reader.close()


class StreamedWeight(nn.Module):
    """An expert stack whose experts are read from the model's files when used (see the module doc).

    Same interface as `Int8Weight` / `Int4Weight` / `BF16Weight` for a stack: `dequantize(expert)`,
    `linear(x, expert)`; plus `prefetch(experts)`, which the MoE calls right after routing."""

    def __init__(self, store: ExpertStore, stack: int, part: int, num_experts: int, in_features: int,
                 out_features: int) -> None:
        super().__init__()
        self.store = store
        self.stack = stack
        self.part = part
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features

    def prefetch(self, experts: Sequence[int]) -> None:
        self.store.prefetch(self.stack, [int(e) for e in experts], self.part)

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        if expert is None:
            return torch.stack([self.dequantize(e) for e in range(self.num_experts)])
        with self.store.use(self.stack, int(expert)) as module:
            return module.dequantize(0)

    def linear(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        with self.resident(expert) as module:
            return module.linear(x, 0)

    @contextmanager
    def resident(self, expert: int | None) -> Iterator[nn.Module]:
        """The expert's weight module (a stack of one), held in memory for the block."""
        if expert is None:
            raise ValueError("a stack of experts needs the expert's index")
        with self.store.use(self.stack, int(expert)) as module:
            yield module

    def extra_repr(self) -> str:
        info = self.store.stacks[self.stack]
        return f"streamed {info.kind} {self.num_experts} x [{self.in_features}, {self.out_features}] from {info.parts[0].shard}"


# ---- building a memory-capped model ------------------------------------------------------------------


@dataclass
class MemoryNeeds:
    """What a memory-capped model of a native checkpoint holds, in bytes."""

    resident: int  # attention, routers, norms, embedding in the activation dtype
    expert_total: int  # every expert of every layer, as stored
    per_layer_selected: int  # buffers for the experts one token uses in one layer (page padding included)
    slot: int  # buffer bytes for one expert of one stack: the largest, so that any buffer fits any expert
    slot_charge: int  # what one such buffer counts against the budget (int4: plus its repacked copy)

    @property
    def minimum(self) -> int:
        return self.resident + self.per_layer_selected


def _stack_parts(ckpt: native.NativeCheckpoint, base: str) -> list[str]:
    suffixes = {"int8": (".qweight", ".scales"), "int4": (".packed", ".scales"), "bf16": (".weight",)}[ckpt.quant]
    return [base + s for s in suffixes]


def _is_stack(path: str) -> bool:
    return any(path.endswith("/" + p) for p in EXPERT_PARTS)


def memory_needs(ckpt: native.NativeCheckpoint, config: Grok1Config, act: torch.dtype) -> MemoryNeeds:
    """Resident and streamed bytes of a native checkpoint for activations in `act`."""
    resident = expert_total = 0
    slot = 0
    stacks_per_layer = len(EXPERT_PARTS)
    for spec in parameter_specs(config).values():
        name = native.base_name(spec)
        if spec.path == "language_model/in_out_embed/embeddings":
            resident += math.prod(spec.shape) * act.itemsize
        elif not spec.quantised:
            resident += ckpt.meta(name).nbytes
        elif _is_stack(spec.path):
            parts = [ckpt.meta(n) for n in _stack_parts(ckpt, name)]
            expert_total += sum(m.nbytes for m in parts)
            slot = max(slot, sum(_round_up(m.nbytes // config.num_experts, PAGE) + PAGE for m in parts))
        else:
            resident += sum(ckpt.meta(n).nbytes for n in _stack_parts(ckpt, name))
    charge = (2 if ckpt.quant == "int4" else 1) * slot
    selected = config.num_selected_experts * stacks_per_layer * charge
    return MemoryNeeds(resident, expert_total, selected, slot, charge)


def check_max_memory(max_memory: int, needs: MemoryNeeds, act: torch.dtype, what: str = "max_memory",
                     reserved: int = 0, reserved_for: str = "") -> int:
    """The bytes left for weights under `max_memory` after `reserved` (e.g. the KV cache); raises a
    `Grok1Error` saying how much is needed when that is less than the model's minimum."""
    if max_memory - reserved < needs.minimum:
        dtype = "bf16" if act == torch.bfloat16 else "float32"
        extra = f" plus {human(reserved)} for {reserved_for}" if reserved else ""
        total = needs.minimum + reserved
        raise Grok1Error(
            f"{what} {human(max_memory)} is less than this model needs: {human(needs.resident)} for the weights "
            f"that stay in memory (attention, routers, norms, the {dtype} embedding) plus "
            f"{human(needs.per_layer_selected)} for the experts one token uses in one layer{extra}: "
            f"at least {human(total)} ({total} bytes)"
        )
    return max_memory - reserved


def kv_cache_bytes(config: Grok1Config, tokens: int, dtype: torch.dtype, batch: int = 1) -> int:
    """Bytes of the KV cache `generate` allocates for `tokens` positions (keys and values, every layer)."""
    return config.num_layers * 2 * config.num_kv_heads * config.key_size * dtype.itemsize * tokens * batch


def native_needs(path: str, act: torch.dtype) -> tuple[Grok1Config, MemoryNeeds]:
    """A native directory's config and memory needs (reads only the headers)."""
    from .loader import read_config

    if not native.is_native(path):
        raise Grok1Error(f"{path}: a memory cap needs a model in the native format (convert it with `grok1 convert`)")
    config = read_config(path)
    ckpt = native.NativeCheckpoint(path)
    problems = ckpt.check_layout(config)
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return config, memory_needs(ckpt, config, act)


# Expert-reader threads. One already reads faster than the disk's own sequential-read figure here
# (whole expert ranges per request); a second did not help on this machine's virtual disk
# (bench/bigger_than_ram.py --also-reader-threads 2 compares), but may on disks that want deeper queues.
READER_THREADS = max(1, int(os.environ.get("GROK1_READER_THREADS", "1")))


def load_streamed(
    ckpt: native.NativeCheckpoint,
    config: Grok1Config,
    act: torch.dtype,
    max_memory: int | str,
    device: torch.device,
    threads: int = READER_THREADS,
    direct: bool = True,
) -> Grok1:
    """A `Grok1` whose resident part is read into memory and whose experts stream from the files
    within `max_memory` bytes of weights (see the module doc)."""
    if device.type != "cpu":
        raise Grok1Error(f"max_memory streams experts for the CPU; device {device} is not supported with it")
    limit = parse_size(max_memory, "max_memory")
    needs = memory_needs(ckpt, config, act)
    check_max_memory(limit, needs, act)
    reader = ShardReader(ckpt, direct=direct)
    store = ExpertStore(reader, budget=limit - needs.resident, threads=threads)
    model = Grok1(config, activation_dtype=act)
    try:
        for spec in parameter_specs(config).values():
            name = native.base_name(spec)
            if spec.path == "language_model/in_out_embed/embeddings":
                value = read_bf16_embedding(reader) if act == torch.bfloat16 else read_tensor(reader, native.EMBEDDING)
            elif not spec.quantised:
                value = read_tensor(reader, name)
            elif _is_stack(spec.path):
                value = _streamed(store, ckpt, config, spec.path, name, needs)
            else:
                tensors = [read_tensor(reader, n) for n in _stack_parts(ckpt, name)]
                value = {"int8": Int8Weight, "int4": Int4Weight, "bf16": BF16Weight}[ckpt.quant](*tensors)
            model.set_weight(spec.path, value)
    except BaseException:
        store.close()
        raise
    model.checkpoint = ckpt
    model.expert_store = store
    model.memory_needs = needs
    weakref.finalize(model, store.close)
    return model


def _streamed(store: ExpertStore, ckpt: native.NativeCheckpoint, config: Grok1Config, path: str,
              name: str, needs: MemoryNeeds) -> StreamedWeight:
    experts = config.num_experts
    parts = []
    for tensor in _stack_parts(ckpt, name):
        shard = ckpt.location[tensor]
        info = ckpt.shards[shard]
        dtype, shape, start, end = info.entries[tensor]
        parts.append(Part(shard, info.data_start + start, (end - start) // experts, dtype, tuple(shape[1:])))
    assert sum(store.reader.span(p.stride) for p in parts) <= needs.slot
    stack = store.add_stack(StackInfo(path, ckpt.quant, parts, needs.slot, needs.slot_charge))
    part_index = next(i for i, p in enumerate(EXPERT_PARTS) if path.endswith("/" + p))
    _, in_features, out_features = parameter_specs(config)[path].shape
    return StreamedWeight(store, stack, part_index, experts, in_features, out_features)
