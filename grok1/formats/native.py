"""grok1's native format: sharded safetensors files that are memory-mapped, never copied, at load.

A native directory holds `config.json`, optionally `tokenizer.model`, shards
`model-00001-of-0000N.safetensors` and `model.safetensors.index.json` (the Hugging Face layout:
`weight_map` from tensor name to shard, plus grok1's `metadata` and per-tensor `checksums`).
Tensor names and layouts are in `docs/native-format.md`.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
import zlib
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ..config import Grok1Config
from ..errors import CheckpointError
from ..model import ParamSpec, parameter_specs
from ..quant import INT4_GROUP, BF16Weight, Int4Weight, Int8Weight

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FORMAT_NAME = "grok1-native"
FORMAT_VERSION = 1
QUANTS = ("int8", "int4", "bf16")
RELEASE_ROW_BLOCKS = 8
ALIGN = 64  # data start and most tensors are aligned to this many bytes

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8, "U8": torch.uint8}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}


def is_native(path: str | os.PathLike[str]) -> bool:
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, INDEX_FILE)) or os.path.isfile(os.path.join(path, SINGLE_FILE))


def base_name(spec: ParamSpec) -> str:
    """Official path with dots; the trailing `/w` of a projection is dropped (its parts get suffixes)."""
    path = spec.path[: -len("/w")] if spec.quantised else spec.path
    return path.replace("/", ".")


EMBEDDING = "language_model.in_out_embed.embeddings"
EMBEDDING_BF16 = EMBEDDING + "_bf16"


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


def expected_tensors(config: Grok1Config, quant: str, blocks: dict[str, int] | None = None) -> list[TensorMeta]:
    """Every tensor a native model of this config and quantisation holds, in numeric layer order.

    `blocks` gives the int8 scale blocks per row-parallel parameter path (default: the release's 8).
    """
    if quant not in QUANTS:
        raise CheckpointError(f"unknown quantisation {quant!r}; choose one of {', '.join(QUANTS)}")
    out: list[TensorMeta] = []
    for spec in parameter_specs(config).values():
        name = base_name(spec)
        if not spec.quantised:
            out.append(TensorMeta(name, torch.float32, spec.shape))
            if name == EMBEDDING:
                out.append(TensorMeta(EMBEDDING_BF16, torch.bfloat16, spec.shape))
            continue
        *lead, k, n = spec.shape
        if quant == "int8":
            g = (blocks or {}).get(spec.path, RELEASE_ROW_BLOCKS if spec.row_parallel else 1)
            out.append(TensorMeta(name + ".qweight", torch.int8, (*lead, g, n, k // g)))
            out.append(TensorMeta(name + ".scales", torch.bfloat16, (*lead, g, n)))
        elif quant == "int4":
            out.append(TensorMeta(name + ".packed", torch.uint8, (*lead, n, k // INT4_GROUP, INT4_GROUP // 2)))
            out.append(TensorMeta(name + ".scales", torch.bfloat16, (*lead, n, k // INT4_GROUP)))
        else:
            out.append(TensorMeta(name + ".weight", torch.bfloat16, (*lead, n, k)))
    return out


# ---- writing -----------------------------------------------------------------------------------


@dataclass
class TensorGroup:
    """Tensors written together (a weight and its scales) by one fill function, which receives
    writable views of the tensors inside the mapped shard."""

    tensors: list[TensorMeta]
    fill: Callable[[dict[str, torch.Tensor]], None]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(groups: list[TensorGroup], max_shard_bytes: int) -> list[list[TensorGroup]]:
    shards: list[list[TensorGroup]] = [[]]
    size = 0
    for group in groups:
        if shards[-1] and size + group.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(group)
        size += group.nbytes
    return shards


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _header(tensors: list[TensorMeta], metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    # Widest dtypes first, and within a dtype the tensors whose size is a multiple of 64 first: with
    # a 64-byte aligned data start every tensor is aligned to its element size, and all but a tail
    # to 64 bytes (what SIMD kernels prefer), without gaps (safetensors forbids holes).
    ordered = sorted(tensors, key=lambda t: (-t.dtype.itemsize, t.nbytes % ALIGN != 0))
    header: dict[str, Any] = {"__metadata__": metadata}
    offsets: dict[str, tuple[int, int]] = {}
    position = 0
    for t in ordered:
        offsets[t.name] = (position, position + t.nbytes)
        header[t.name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [position, position + t.nbytes]}
        position += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    return raw, offsets


def write_shard(path: str, groups: list[TensorGroup], progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """Writes one safetensors shard through a shared mapping (no anonymous copy of the data),
    fsyncs it, and returns each tensor's checksum."""
    tensors = [t for g in groups for t in g.tensors]
    header, offsets = _header(tensors, {"format": "pt", "producer": FORMAT_NAME})
    data_start = 8 + len(header)
    total = data_start + sum(t.nbytes for t in tensors)
    checksums: dict[str, str] = {}
    with open(path, "w+b") as fh:
        fh.truncate(total)
        mm = mmap.mmap(fh.fileno(), total)
        try:
            mm[:8] = struct.pack("<Q", len(header))
            mm[8:data_start] = header
            for group in groups:
                views = {}
                for t in group.tensors:
                    start, end = offsets[t.name]
                    if t.nbytes:
                        views[t.name] = torch.frombuffer(mm, dtype=t.dtype, count=t.nbytes // t.dtype.itemsize,
                                                         offset=data_start + start).view(t.shape)
                    else:
                        views[t.name] = torch.empty(t.shape, dtype=t.dtype)
                group.fill(views)
                del views
                for t in group.tensors:
                    start, end = offsets[t.name]
                    checksums[t.name] = _crc(memoryview(mm)[data_start + start : data_start + end])
                if progress is not None:
                    progress(group.nbytes)
            mm.flush()
        finally:
            mm.close()
        os.fsync(fh.fileno())
    return checksums


def _crc(view: memoryview) -> str:
    crc = 0
    step = 1 << 26
    for i in range(0, len(view), step):
        crc = zlib.crc32(view[i : i + step], crc)
    view.release()
    return f"crc32:{crc:08x}"


def write_index(dst: str, weight_map: dict[str, str], checksums: dict[str, str], quant: str, total: int) -> None:
    index = {
        "metadata": {"total_size": total, "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "quant": quant,
                     "checksum": "crc32 of each tensor's bytes"},
        "weight_map": dict(sorted(weight_map.items())),
        "checksums": dict(sorted(checksums.items())),
    }
    tmp = os.path.join(dst, INDEX_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(index, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, os.path.join(dst, INDEX_FILE))


# ---- reading -----------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    file: str
    data_start: int
    size: int
    entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]  # name -> dtype, shape, start, end


def read_shard_header(file: str) -> ShardInfo:
    try:
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, 100 * 1024 * 1024):
                raise CheckpointError(f"{file}: corrupt safetensors header (claims {length} bytes)")
            raw = fh.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"{file}: missing shard") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header")
    entries = {}
    data_end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            start, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{file}: tensor {name}: bad header entry ({exc!r})") from None
        entries[name] = (dtype, shape, start, end)
        data_end = max(data_end, end)
    data_start = 8 + length
    if data_start + data_end > size:
        raise CheckpointError(
            f"{file}: shard is {size} bytes but its header needs {data_start + data_end}; the file is truncated"
        )
    return ShardInfo(file, data_start, size, entries)


class NativeCheckpoint:
    """A native model directory, with every shard memory-mapped read-only on first use."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        index_file = os.path.join(self.path, INDEX_FILE)
        self.checksums: dict[str, str] = {}
        self.metadata: dict[str, Any] = {}
        if os.path.isfile(index_file):
            try:
                with open(index_file, encoding="utf-8") as fh:
                    index = json.load(fh)
                weight_map = index["weight_map"]
                self.metadata = index.get("metadata", {})
                self.checksums = index.get("checksums", {})
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_file}: not a valid index ({exc!r})") from None
            shard_files = sorted(set(weight_map.values()))
        else:
            shard_files = [SINGLE_FILE]
            weight_map = None
        self.shards: dict[str, ShardInfo] = {}
        self.location: dict[str, str] = {}
        for shard in shard_files:
            info = read_shard_header(os.path.join(self.path, shard))
            self.shards[shard] = info
            for name in info.entries:
                self.location[name] = shard
        if weight_map is not None:
            for name, shard in weight_map.items():
                if self.location.get(name) != shard:
                    raise CheckpointError(f"{os.path.join(self.path, shard)}: tensor {name} listed in the index is not in it")
        self._maps: dict[str, mmap.mmap] = {}
        self.quant = self.metadata.get("quant") or self._guess_quant()

    def _guess_quant(self) -> str:
        names = self.location
        if any(n.endswith(".qweight") for n in names):
            return "int8"
        if any(n.endswith(".packed") for n in names):
            return "int4"
        return "bf16"

    def meta(self, name: str) -> TensorMeta:
        dtype, shape, _, _ = self.shards[self.location[name]].entries[name]
        return TensorMeta(name, dtype, shape)

    def _map(self, shard: str) -> mmap.mmap:
        if shard not in self._maps:
            with open(os.path.join(self.path, shard), "rb") as fh:
                self._maps[shard] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[shard]

    def tensor(self, name: str) -> torch.Tensor:
        """A zero-copy view of the mapped bytes (read-only: never written to)."""
        if name not in self.location:
            raise CheckpointError(f"{self.path}: tensor {name} is missing")
        shard = self.location[name]
        info = self.shards[shard]
        dtype, shape, start, end = info.entries[name]
        count = (end - start) // dtype.itemsize
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the mapping is read-only by design
            return torch.frombuffer(self._map(shard), dtype=dtype, count=count, offset=info.data_start + start).view(shape)

    def raw(self, name: str) -> memoryview:
        shard = self.location[name]
        info = self.shards[shard]
        _, _, start, end = info.entries[name]
        return memoryview(self._map(shard))[info.data_start + start : info.data_start + end]

    def check_layout(self, config: Grok1Config) -> list[str]:
        """Problems with the tensors' presence, dtypes and shapes, one line per tensor."""
        blocks = {}
        for spec in parameter_specs(config).values():
            name = base_name(spec) + ".scales"
            if self.quant == "int8" and spec.quantised and name in self.location:
                blocks[spec.path] = self.meta(name).shape[-2]
        problems = []
        for expected in expected_tensors(config, self.quant, blocks):
            if expected.name not in self.location:
                if expected.name == EMBEDDING_BF16:
                    continue  # optional: derived from the float32 table when absent
                problems.append(f"{expected.name}: missing")
                continue
            found = self.meta(expected.name)
            if found.dtype != expected.dtype or found.shape != expected.shape:
                problems.append(
                    f"{expected.name} (in {self.location[expected.name]}): {found.dtype} {list(found.shape)}, "
                    f"expected {expected.dtype} {list(expected.shape)}"
                )
        return problems

    def weight(self, spec: ParamSpec) -> torch.Tensor | Int8Weight | Int4Weight | BF16Weight:
        name = base_name(spec)
        if not spec.quantised:
            return self.tensor(name)
        if self.quant == "int8":
            return Int8Weight(self.tensor(name + ".qweight"), self.tensor(name + ".scales"))
        if self.quant == "int4":
            return Int4Weight(self.tensor(name + ".packed"), self.tensor(name + ".scales"))
        return BF16Weight(self.tensor(name + ".weight"))

    def verify_checksums(self, progress: bool = True, threads: int = 2) -> list[str]:
        """Recomputes every tensor's checksum (in parallel, streaming) and lists the tensors that differ."""
        names = sorted(self.location)
        problems = [f"{n}: no checksum recorded in {INDEX_FILE}" for n in names if n not in self.checksums]
        todo = [n for n in names if n in self.checksums]
        total = sum(self.meta(n).nbytes for n in todo)
        with tqdm(total=total, unit="B", unit_scale=True, desc="verifying", disable=not progress, leave=False) as bar:

            def check(name: str) -> str | None:
                crc = _crc(self.raw(name))
                bar.update(self.meta(name).nbytes)
                if crc != self.checksums[name]:
                    return f"{name} (in {self.location[name]}): checksum {crc} does not match the recorded {self.checksums[name]}"
                return None

            with ThreadPoolExecutor(max_workers=threads) as pool:
                problems += [p for p in pool.map(check, todo) if p]
        return problems


@dataclass
class ConvertState:
    """What a converter has finished, kept in the partial directory so a re-run can resume."""

    fingerprint: str
    done: dict[str, dict[str, str]] = field(default_factory=dict)  # shard -> tensor -> checksum

    @classmethod
    def load(cls, file: str, fingerprint: str) -> ConvertState:
        try:
            with open(file, encoding="utf-8") as fh:
                data = json.load(fh)
            if data.get("fingerprint") == fingerprint and isinstance(data.get("done"), dict):
                return cls(fingerprint, data["done"])
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            pass
        return cls(fingerprint)

    def save(self, file: str) -> None:
        tmp = file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump({"fingerprint": self.fingerprint, "done": self.done}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, file)


def names_in(groups: Iterable[TensorGroup]) -> list[str]:
    return [t.name for g in groups for t in g.tensors]
