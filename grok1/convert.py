"""`grok1 convert`: release (or native) directory -> native directory, streaming.

Nothing is unpickled whole: release payloads are located in the pickle byte stream
(`xai.scan_tensor_file`) and copied from a read-only mapping of the source file into a shared
mapping of the output shard, one expert (or one tile of output rows) at a time, so anonymous memory
stays bounded whatever the model size. Output goes to `DST.partial/`, whose finished shards are
recorded so that a re-run resumes; the directory is renamed to DST only when every shard is written,
fsynced and verified against its checksums.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .config import Grok1Config
from .errors import CheckpointError, Grok1Error
from .formats import native, xai
from .formats.native import EMBEDDING, EMBEDDING_BF16, TensorGroup, TensorMeta
from .loader import read_config
from .model import ParamSpec, parameter_specs
from .quant import INT4_GROUP, BF16Weight, Int4Weight, Int8Weight, quantize_int4
from .tokenizer import find_tokenizer

DEFAULT_SHARD_BYTES = 4 * 10**9
TILE_ELEMENTS = 1 << 24  # rows dequantised at once when re-quantising: 16M values (32 MB in bf16)
STATE_FILE = ".convert-state.json"


@contextmanager
def mapped(payload: xai.Payload, shape: tuple[int, ...] | None = None) -> Iterator[torch.Tensor]:
    """A read-only view of a release payload through a private mapping of its file."""
    if payload.inline is not None:
        yield payload.read().view(shape or payload.shape)
        return
    with open(payload.file, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            view = torch.frombuffer(mm, dtype=payload.dtype, count=payload.nbytes // payload.dtype.itemsize,
                                    offset=payload.offset).view(shape or payload.shape)
        yield view
        del view
    finally:
        try:
            mm.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes when it does


def _leading(t: torch.Tensor, k_dims: int) -> torch.Tensor:
    """Adds a leading expert axis to a single matrix so every projection is a stack."""
    return t if t.dim() > k_dims else t.unsqueeze(0)


def _tiles(n: int, k: int) -> Iterator[tuple[int, int]]:
    step = max(1, TILE_ELEMENTS // max(1, k))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _write_requantised(
    quant: str, out: dict[str, torch.Tensor], name: str, experts: int, n: int, k: int,
    rows: Callable[[int, int, int], torch.Tensor],
) -> None:
    """Fills an int4 or bf16 weight from `rows(e, n0, n1)` -> bf16 [n1-n0, k] (output rows of expert e)."""
    if quant == "int4":
        packed = _leading(out[name + ".packed"], 3)
        scales = _leading(out[name + ".scales"], 2)
    else:
        dense = _leading(out[name + ".weight"], 2)
    for e in range(experts):
        for n0, n1 in _tiles(n, k):
            block = rows(e, n0, n1)
            if quant == "int4":
                q = quantize_int4(block)
                packed[e, n0:n1] = q.packed
                scales[e, n0:n1] = q.scales
            else:
                dense[e, n0:n1] = block


@dataclass
class Source:
    config: Grok1Config
    path: str
    fingerprint: str
    groups: Callable[[str], list[TensorGroup]]


def _release_source(path: str) -> Source:
    config = read_config(path)
    scanned = list(xai.scan_release(path, config))  # every file checked before anything is written
    stat = [(os.path.basename(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for _, f, _ in scanned]
    fingerprint = hashlib.sha256(json.dumps([os.path.abspath(path), stat]).encode()).hexdigest()

    def groups(quant: str) -> list[TensorGroup]:
        out = []
        for spec, _, tensor in scanned:
            out.append(_release_group(spec, tensor, quant))
        return out

    return Source(config, path, fingerprint, groups)


def _plain_metas(name: str, shape: tuple[int, ...]) -> list[TensorMeta]:
    """A float32 tensor as released; the embedding also gets its exact bf16 copy."""
    metas = [TensorMeta(name, torch.float32, shape)]
    if name == EMBEDDING:
        metas.append(TensorMeta(EMBEDDING_BF16, torch.bfloat16, shape))
    return metas


def _release_group(spec: ParamSpec, tensor: xai.ScannedTensor, quant: str) -> TensorGroup:
    name = native.base_name(spec)
    if not spec.quantised:
        metas = _plain_metas(name, spec.shape)

        def fill_plain(out: dict[str, torch.Tensor]) -> None:
            with mapped(tensor.array) as src:
                out[name].copy_(src)
                if EMBEDDING_BF16 in out:
                    rows = max(1, TILE_ELEMENTS // max(1, spec.shape[-1]))
                    for r in range(0, spec.shape[0], rows):
                        out[EMBEDDING_BF16][r : r + rows].copy_(src[r : r + rows])

        return TensorGroup(metas, fill_plain)

    *lead, k, n = spec.shape
    experts = lead[0] if lead else 1
    blocks = tensor.scales.shape[-2]
    kb = k // blocks
    if quant == "int8":
        metas = [TensorMeta(name + ".qweight", torch.int8, (*lead, blocks, n, kb)),
                 TensorMeta(name + ".scales", torch.bfloat16, (*lead, blocks, n))]

        def fill_int8(out: dict[str, torch.Tensor]) -> None:
            out[name + ".scales"].copy_(tensor.scales.read())
            q_out = _leading(out[name + ".qweight"], 3)
            with mapped(tensor.weight, (experts, k, n)) as src:
                for e in range(experts):
                    for g in range(blocks):
                        q_out[e, g].copy_(src[e, g * kb : (g + 1) * kb].t())

        return TensorGroup(metas, fill_int8)

    metas = native_weight_metas(name, lead, n, k, quant)
    scales_all = _leading(tensor.scales.read(), 2)  # [E, blocks, n], small

    def fill_requant(out: dict[str, torch.Tensor]) -> None:
        with mapped(tensor.weight, (experts, k, n)) as src:

            def rows(e: int, n0: int, n1: int) -> torch.Tensor:
                q = src[e, :, n0:n1].reshape(blocks, kb, n1 - n0)
                w = q.to(torch.bfloat16) * scales_all[e, :, None, n0:n1]  # the release's bf16(q*s)
                return w.reshape(k, n1 - n0).t()

            _write_requantised(quant, out, name, experts, n, k, rows)

    return TensorGroup(metas, fill_requant)


def native_weight_metas(name: str, lead: list[int], n: int, k: int, quant: str) -> list[TensorMeta]:
    if quant == "int4":
        if k % INT4_GROUP:
            raise Grok1Error(f"{name}: input size {k} is not a multiple of {INT4_GROUP}, which int4 needs")
        return [TensorMeta(name + ".packed", torch.uint8, (*lead, n, k // INT4_GROUP, INT4_GROUP // 2)),
                TensorMeta(name + ".scales", torch.bfloat16, (*lead, n, k // INT4_GROUP))]
    return [TensorMeta(name + ".weight", torch.bfloat16, (*lead, n, k))]


def _native_source(path: str) -> Source:
    config = read_config(path)
    ckpt = native.NativeCheckpoint(path)
    problems = ckpt.check_layout(config)
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    stat = [(s, os.stat(os.path.join(path, s)).st_size, os.stat(os.path.join(path, s)).st_mtime_ns) for s in ckpt.shards]
    fingerprint = hashlib.sha256(json.dumps([os.path.abspath(path), stat]).encode()).hexdigest()

    def groups(quant: str) -> list[TensorGroup]:
        if quant == "int8" and ckpt.quant != "int8":
            raise Grok1Error(f"{path} is {ckpt.quant}: re-quantising to int8 needs an int8 (release or native) source")
        return [_native_group(ckpt, spec, quant) for spec in parameter_specs(config).values()]

    return Source(config, path, fingerprint, groups)


def _native_group(ckpt: native.NativeCheckpoint, spec: ParamSpec, quant: str) -> TensorGroup:
    name = native.base_name(spec)
    if not spec.quantised:
        metas = _plain_metas(name, spec.shape)

        def fill_plain(out: dict[str, torch.Tensor]) -> None:
            src = ckpt.tensor(name)
            out[name].copy_(src)
            if EMBEDDING_BF16 in out:
                out[EMBEDDING_BF16].copy_(src)

        return TensorGroup(metas, fill_plain)

    weight = ckpt.weight(spec)
    *lead, k, n = spec.shape
    experts = lead[0] if lead else 1
    if quant == "int8":  # int8 -> int8: the same bytes
        assert isinstance(weight, Int8Weight)
        metas = [TensorMeta(name + ".qweight", torch.int8, tuple(weight.qweight.shape)),
                 TensorMeta(name + ".scales", torch.bfloat16, tuple(weight.scales.shape))]

        def fill_copy(out: dict[str, torch.Tensor]) -> None:
            out[name + ".qweight"].copy_(weight.qweight)
            out[name + ".scales"].copy_(weight.scales)

        return TensorGroup(metas, fill_copy)

    def rows(e: int, n0: int, n1: int) -> torch.Tensor:
        if isinstance(weight, Int8Weight):
            q = _leading(weight.qweight, 3)[e, :, n0:n1]  # [blocks, rows, in/blocks]
            s = _leading(weight.scales, 2)[e, :, n0:n1]
            w = q.to(torch.bfloat16) * s.unsqueeze(-1)
            return w.permute(1, 0, 2).reshape(n1 - n0, k)
        if isinstance(weight, (Int4Weight, BF16Weight)):
            return weight.dequantize(e if lead else None)[:, n0:n1].t()
        raise AssertionError(type(weight))

    def fill_requant(out: dict[str, torch.Tensor]) -> None:
        _write_requantised(quant, out, name, experts, n, k, rows)

    return TensorGroup(native_weight_metas(name, lead, n, k, quant), fill_requant)


def open_source(path: str) -> Source:
    if not os.path.exists(path):
        raise Grok1Error(f"{path}: no such directory")
    if native.is_native(path):
        return _native_source(path)
    if os.path.isdir(os.path.join(path, xai.CHECKPOINT_SUBDIR)):
        return _release_source(path)
    raise Grok1Error(f"{path}: neither a release directory (ckpt-0/) nor a native one ({native.INDEX_FILE})")


def convert_to_native(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    quant: str = "int8",
    tokenizer: str | None = None,
    force: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
) -> dict[str, float]:
    """Converts a release or native directory to a native one. Returns timing and size figures."""
    src, dst = os.fspath(src), os.fspath(dst).rstrip(os.sep)
    if quant not in native.QUANTS:
        raise Grok1Error(f"unknown --quant {quant!r}; choose one of {', '.join(native.QUANTS)}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise Grok1Error(f"{dst}: the destination is the source")
    if os.path.exists(dst) and not force:
        raise Grok1Error(f"{dst}: already exists (use --force to replace it)")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise Grok1Error(f"{dst}: exists and is not a directory")
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise Grok1Error(f"{tokenizer}: no such tokenizer file")
    started = time.perf_counter()
    source = open_source(src)
    groups = source.groups(quant)
    shards = native.plan_shards(groups, shard_bytes)
    total = sum(g.nbytes for g in groups)
    tokenizer = tokenizer or find_tokenizer(src)

    partial = dst + ".partial"
    fingerprint = json.dumps({"source": source.fingerprint, "quant": quant, "shard_bytes": shard_bytes,
                              "format_version": native.FORMAT_VERSION})
    state_file = os.path.join(partial, STATE_FILE)
    # A previous run of the same conversion left finished shards: keep them; anything else goes.
    state = native.ConvertState.load(state_file, fingerprint)
    if not state.done:
        shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial, exist_ok=True)
    resumed = 0
    weight_map: dict[str, str] = {}
    checksums: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=f"converting to {quant}",
              disable=not progress) as bar:
        for i, shard_groups in enumerate(shards):
            name = native.shard_name(i, len(shards))
            final = os.path.join(partial, name)
            names = native.names_in(shard_groups)
            done = state.done.get(name)
            if done is not None and set(done) == set(names) and os.path.isfile(final):
                resumed += 1
                bar.update(sum(g.nbytes for g in shard_groups))
            else:
                incomplete = final + ".incomplete"
                sums = native.write_shard(incomplete, shard_groups, bar.update)
                os.replace(incomplete, final)
                state.done[name] = sums
                state.save(state_file)
            for tensor_name in names:
                weight_map[tensor_name] = name
                checksums[tensor_name] = state.done[name][tensor_name]
    written_s = time.perf_counter() - started

    native.write_index(partial, weight_map, checksums, quant, total)
    source.config.save(os.path.join(partial, "config.json"))
    if tokenizer is not None:
        shutil.copyfile(tokenizer, os.path.join(partial, "tokenizer.model"))
    verify_started = time.perf_counter()
    ckpt = native.NativeCheckpoint(partial)
    problems = ckpt.check_layout(source.config) + ckpt.verify_checksums(progress=progress)
    del ckpt
    if problems:
        raise CheckpointError(f"{partial}: verification after conversion failed: " + "; ".join(problems))
    verify_s = time.perf_counter() - verify_started
    os.remove(state_file)
    _fsync_dir(partial)
    if os.path.exists(dst):
        old = dst + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
        os.rename(partial, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, dst)
    _fsync_dir(os.path.dirname(os.path.abspath(dst)))
    return {"bytes": total, "shards": len(shards), "resumed_shards": resumed, "write_s": written_s,
            "verify_s": verify_s, "total_s": time.perf_counter() - started}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
