"""GGUF, llama.cpp's file format, for its `grok` architecture: the layout and metadata llama.cpp
expects, a streaming exporter, and a memory-mapped reader that runs GGUF files in grok1.

Layout (docs/gguf.md has the tables). A projection the official code applies as `x @ w` with w of
shape [in, out] is stored transposed, as llama.cpp multiplies it: numpy shape [out, in] (GGUF
ne = {in, out}), so quantisation blocks run along the input axis. An expert stack [E, in, out] is
stored as [E, out, in]. The token embedding is [vocab, emb] in both (it is also the tied output
projection); norms are vectors. Norms and the router stay float32 whatever the target type.

Exported values are the ones grok1 computes with, bf16(int8 * scale), so an F32 (or BF16) export of
the projections is exact. The reader keeps every projection in its file's encoding (memory-mapped)
and dequantises it per use through `GGUFWeight.dequantize`, like the release's int8 weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType
from gguf import quants as gguf_quants
from torch import nn
from tqdm import tqdm

from ..config import (
    RELEASED_ATTN_OUTPUT_MULTIPLIER,
    RELEASED_EMBEDDING_MULTIPLIER,
    RELEASED_OUTPUT_MULTIPLIER,
    Grok1Config,
    ffn_size,
)
from ..errors import CheckpointError, ConfigError, Grok1Error
from ..model import ParamSpec, parameter_specs
from ..quant import BF16Weight, Int4Weight, Int8Weight

ARCH = "grok"
ALIGNMENT = 32  # GGUF's default; every tensor's data starts on a multiple of it
GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
QT = GGMLQuantizationType

# Official parameter path -> GGUF tensor name, in the order the exporter writes them.
GLOBAL_TENSORS = {
    "language_model/in_out_embed/embeddings": "token_embd.weight",
    "language_model/rms_norm/scale": "output_norm.weight",
}
LAYER_TENSORS = {  # path inside `transformer/decoder_layer_N/` -> name inside `blk.N.`
    "rms_norm/scale": "attn_norm.weight",
    "multi_head_attention/query/w": "attn_q.weight",
    "multi_head_attention/key/w": "attn_k.weight",
    "multi_head_attention/value/w": "attn_v.weight",
    "multi_head_attention/linear/w": "attn_output.weight",
    "rms_norm_1/scale": "attn_output_norm.weight",
    "rms_norm_2/scale": "ffn_norm.weight",
    "router/w": "ffn_gate_inp.weight",
    "moe/linear/w": "ffn_gate_exps.weight",
    "moe/linear_v/w": "ffn_up_exps.weight",
    "moe/linear_1/w": "ffn_down_exps.weight",
    "rms_norm_3/scale": "layer_output_norm.weight",
}
EMBEDDINGS = "language_model/in_out_embed/embeddings"
# Names llama.cpp's grok loader also accepts but grok1 has no counterpart for.
UNSUPPORTED_TENSORS = {
    "output.weight": "an untied output projection (Grok-1 ties it to token_embd)",
    "ffn_gate.weight": "a dense shared FFN (grok-2)",
    "ffn_up.weight": "a dense shared FFN (grok-2)",
    "ffn_down.weight": "a dense shared FFN (grok-2)",
}
ALTERNATIVE_NAMES = {".post_ffw_norm.weight": ".layer_output_norm.weight"}  # llama.cpp accepts either

# Export targets: --quant name -> (type of the matrices, llama.cpp's file type).
EXPORT_TYPES = {
    "f32": (QT.F32, LlamaFileType.ALL_F32),
    "f16": (QT.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (QT.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (QT.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (QT.Q4_0, LlamaFileType.MOSTLY_Q4_0),
}
# A matrix whose rows (input size) do not fill whole quantisation blocks is written as F16 instead,
# the fallback llama.cpp's quantizer uses.
FALLBACK_TYPE = QT.F16

# SentencePiece piece types; llama.cpp's token types use the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
PLACEHOLDER_KEY = "grok1.tokenizer.placeholder"


def tensor_names(config: Grok1Config) -> dict[str, str]:
    """Official path -> GGUF tensor name for every parameter, in file order."""
    names = {EMBEDDINGS: GLOBAL_TENSORS[EMBEDDINGS]}
    for i in range(config.num_layers):
        for suffix, name in LAYER_TENSORS.items():
            names[f"transformer/decoder_layer_{i}/{suffix}"] = f"blk.{i}.{name}"
    names["language_model/rms_norm/scale"] = GLOBAL_TENSORS["language_model/rms_norm/scale"]
    return names


def is_transposed(spec: ParamSpec) -> bool:
    """Projections are stored [out, in]; vectors and the embedding table as they are."""
    return len(spec.shape) >= 2 and spec.path != EMBEDDINGS


def gguf_shape(spec: ParamSpec) -> tuple[int, ...]:
    """The numpy (row-major) shape of a parameter in the file; GGUF's ne is its reverse."""
    if not is_transposed(spec):
        return spec.shape
    *lead, k, n = spec.shape
    return (*lead, n, k)


def storage_type(spec: ParamSpec, target: GGMLQuantizationType) -> GGMLQuantizationType:
    """The type a parameter is written as for a target type."""
    if len(spec.shape) == 1 or spec.path.endswith("router/w"):
        return QT.F32
    block, _ = GGML_QUANT_SIZES[target]
    return target if gguf_shape(spec)[-1] % block == 0 else FALLBACK_TYPE


def tensor_nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


# ---- the `grok` metadata ---------------------------------------------------------------------------


@dataclass(frozen=True)
class KV:
    key: str
    vtype: GGUFValueType
    value: Any
    item_type: GGUFValueType | None = None  # for arrays


def grok_metadata(config: Grok1Config, file_type: int) -> list[KV]:
    """Everything llama.cpp's `grok` loader reads, with Grok-1's values for this config."""
    u32, f32 = GGUFValueType.UINT32, GGUFValueType.FLOAT32
    a = ARCH
    return [
        KV("general.architecture", GGUFValueType.STRING, ARCH),
        KV("general.name", GGUFValueType.STRING, config.name),
        KV("general.file_type", u32, int(file_type)),
        KV("general.quantization_version", u32, 2),
        KV(f"{a}.vocab_size", u32, config.vocab_size),
        KV(f"{a}.context_length", u32, config.sequence_len),
        KV(f"{a}.embedding_length", u32, config.emb_size),
        KV(f"{a}.block_count", u32, config.num_layers),
        KV(f"{a}.feed_forward_length", u32, config.ffn_size),
        KV(f"{a}.expert_count", u32, config.num_experts),
        KV(f"{a}.expert_used_count", u32, config.num_selected_experts),
        KV(f"{a}.attention.head_count", u32, config.num_q_heads),
        KV(f"{a}.attention.head_count_kv", u32, config.num_kv_heads),
        KV(f"{a}.attention.key_length", u32, config.key_size),
        KV(f"{a}.attention.value_length", u32, config.value_size),
        KV(f"{a}.attention.layer_norm_rms_epsilon", f32, config.rms_norm_eps),
        KV(f"{a}.rope.dimension_count", u32, config.key_size),
        KV(f"{a}.rope.freq_base", f32, float(config.rope_base)),
        # The Grok-specific multipliers; without them llama.cpp falls back to the full-size model's.
        KV(f"{a}.embedding_scale", f32, config.embedding_multiplier_scale),
        KV(f"{a}.logit_scale", f32, config.output_multiplier_scale),
        KV(f"{a}.attention.output_scale", f32, config.attn_output_multiplier),
        KV(f"{a}.attn_logit_softcapping", f32, config.attn_logit_softcap),
        KV(f"{a}.final_logit_softcapping", f32, 0.0),
    ]


@dataclass
class SentencePieceModel:
    """What a GGUF vocabulary needs from a SentencePiece `tokenizer.model`."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    add_dummy_prefix: bool = True
    normalizer: str = "nmt_nfkc"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _proto_fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of a protobuf message; length-delimited values are bytes."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated message")
        yield number, wire, value


def read_sentencepiece(path: str | os.PathLike[str]) -> SentencePieceModel:
    """Pieces, scores and piece types of a SentencePiece ModelProto (field 1 `pieces`: piece = 1,
    score = 2, type = 3; field 3 `normalizer_spec`: name = 1, add_dummy_prefix = 3)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise Grok1Error(f"{path}: cannot read tokenizer ({exc.strerror})") from None
    model = SentencePieceModel([], [], [])
    try:
        for number, wire, value in _proto_fields(data):
            if number == 1 and wire == 2:
                piece, score, kind = "", 0.0, NORMAL
                for n, w, v in _proto_fields(value):
                    if n == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3 and w == 0:
                        kind = v
                model.pieces.append(piece)
                model.scores.append(score)
                model.types.append(kind)
            elif number == 3 and wire == 2:
                for n, w, v in _proto_fields(value):
                    if n == 1 and w == 2:
                        model.normalizer = v.decode("utf-8")
                    elif n == 3 and w == 0:
                        model.add_dummy_prefix = bool(v)
    except (ValueError, UnicodeDecodeError, struct.error) as exc:
        raise Grok1Error(f"{path}: not a SentencePiece model ({exc})") from None
    if not model.pieces:
        raise Grok1Error(f"{path}: not a SentencePiece model (no pieces)")
    return model


def _llama_token_type(piece: str, kind: int) -> int:
    """llama.cpp's type for a SentencePiece piece: the same, except user-defined runs of one character
    (Grok-1's digits and runs of newlines, tabs and spaces), which are written as normal pieces.

    SentencePiece matches a user-defined piece inside the ordinary segmentation. llama.cpp treats a
    USER_DEFINED token as a special token instead: it is cut out of the raw text before spaces are
    escaped (so '    ' becomes the raw-space piece SentencePiece never produces) and the text after it
    gets a space prefix. As normal pieces with their score of 0, llama.cpp's merges reach these the
    way SentencePiece does. Other user-defined pieces (`<|separator|>`) stay user-defined.
    """
    if kind == USER_DEFINED and len(set(piece)) == 1:
        return NORMAL
    return kind


def tokenizer_metadata(config: Grok1Config, tokenizer: str | os.PathLike[str] | None) -> list[KV]:
    """llama.cpp's SentencePiece (`llama`) vocabulary from `tokenizer.model`, or, without one, a
    placeholder of the model's vocabulary size whose pieces say what they are."""
    specials = {config.pad_token: "[PAD]", config.bos_token: "[BOS]", config.eos_token: "[EOS]"}
    extra: list[KV] = []
    if tokenizer is None:
        pieces = [specials.get(i, f"[PLACEHOLDER_{i}]") for i in range(config.vocab_size)]
        scores = [0.0] * config.vocab_size
        types = [CONTROL if i in specials else UNUSED for i in range(config.vocab_size)]
        add_prefix = True
        extra = [
            KV(PLACEHOLDER_KEY, GGUFValueType.BOOL, True),
            KV("general.description", GGUFValueType.STRING,
               "placeholder vocabulary: the model was converted without a tokenizer.model; "
               "token ids are meaningful, token texts are not"),
        ]
    else:
        sp = read_sentencepiece(tokenizer)
        if len(sp.pieces) > config.vocab_size:
            raise Grok1Error(
                f"{os.fspath(tokenizer)}: tokenizer has {len(sp.pieces)} pieces, the model's vocabulary only {config.vocab_size}"
            )
        # llama.cpp needs one entry per embedding row: rows the tokenizer does not use get marked pieces.
        padding = range(len(sp.pieces), config.vocab_size)
        pieces = sp.pieces + [f"[PLACEHOLDER_{i}]" for i in padding]
        scores = sp.scores + [0.0] * len(padding)
        types = [_llama_token_type(p, t) for p, t in zip(sp.pieces, sp.types, strict=True)] + [UNUSED] * len(padding)
        add_prefix = sp.add_dummy_prefix
        if UNKNOWN in sp.types:
            extra.append(KV("tokenizer.ggml.unknown_token_id", GGUFValueType.UINT32, sp.types.index(UNKNOWN)))
    return [
        KV("tokenizer.ggml.model", GGUFValueType.STRING, "llama"),
        KV("tokenizer.ggml.tokens", GGUFValueType.ARRAY, pieces, GGUFValueType.STRING),
        KV("tokenizer.ggml.scores", GGUFValueType.ARRAY, scores, GGUFValueType.FLOAT32),
        KV("tokenizer.ggml.token_type", GGUFValueType.ARRAY, types, GGUFValueType.INT32),
        KV("tokenizer.ggml.bos_token_id", GGUFValueType.UINT32, config.bos_token),
        KV("tokenizer.ggml.eos_token_id", GGUFValueType.UINT32, config.eos_token),
        KV("tokenizer.ggml.padding_token_id", GGUFValueType.UINT32, config.pad_token),
        # The official runner adds neither BOS nor EOS.
        KV("tokenizer.ggml.add_bos_token", GGUFValueType.BOOL, False),
        KV("tokenizer.ggml.add_eos_token", GGUFValueType.BOOL, False),
        KV("tokenizer.ggml.add_space_prefix", GGUFValueType.BOOL, add_prefix),
        *extra,
    ]


# ---- writing ---------------------------------------------------------------------------------------

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


def _string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value(vtype: GGUFValueType, value: Any, item_type: GGUFValueType | None = None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value)
    if vtype == GGUFValueType.ARRAY:
        assert item_type is not None
        head = struct.pack("<IQ", int(item_type), len(value))
        if item_type == GGUFValueType.STRING:
            return head + b"".join(_string(v) for v in value)
        return head + np.asarray(value, dtype=_SCALAR_FORMATS[item_type]).tobytes()
    return struct.pack(_SCALAR_FORMATS[vtype], value)


def _kv_bytes(kv: KV) -> bytes:
    return _string(kv.key) + struct.pack("<I", int(kv.vtype)) + _value(kv.vtype, kv.value, kv.item_type)


def _align(n: int) -> int:
    return n + (-n) % ALIGNMENT


@dataclass
class PlannedTensor:
    path: str
    name: str
    shape: tuple[int, ...]  # numpy order
    qtype: GGMLQuantizationType
    nbytes: int
    part: int = 0
    offset: int = 0  # absolute position of the data in its part file


@dataclass
class GGUFPlan:
    """Where every tensor goes: parts (one, or a split set), headers, data offsets."""

    config: Grok1Config
    quant: str
    tensors: dict[str, PlannedTensor]  # by official path
    files: list[str]
    headers: list[bytes] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[PlannedTensor]:
        """Matrices written as F16 because their rows are not whole blocks of the target type."""
        return [t for t in self.tensors.values() if t.qtype not in (EXPORT_TYPES[self.quant][0], QT.F32)]

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def split_file_name(path: str, index: int, count: int) -> str:
    """llama.cpp's split naming: `name-00001-of-00003.gguf` for part 1 of `name.gguf`."""
    stem = path[: -len(".gguf")] if path.lower().endswith(".gguf") else path
    return f"{stem}-{index + 1:05d}-of-{count:05d}.gguf"


def plan_gguf(
    config: Grok1Config,
    dst: str,
    quant: str,
    metadata: list[KV],
    split_max_size: int | None = None,
) -> GGUFPlan:
    """Types, sizes, parts and offsets of every tensor; the header bytes of every part."""
    target = EXPORT_TYPES[quant][0]
    specs = parameter_specs(config)
    tensors: dict[str, PlannedTensor] = {}
    for path, name in tensor_names(config).items():
        spec = specs[path]
        shape = gguf_shape(spec)
        qtype = storage_type(spec, target)
        tensors[path] = PlannedTensor(path, name, shape, qtype, tensor_nbytes(shape, qtype))
    # Parts: tensors in file order, a new part when the next tensor would pass the size limit.
    parts: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors.values():
        if split_max_size and parts[-1] and size + t.nbytes > split_max_size:
            parts.append([])
            size = 0
        parts[-1].append(t)
        size += t.nbytes
    count = len(parts)
    files = [dst] if count == 1 else [split_file_name(dst, i, count) for i in range(count)]
    headers = []
    for index, members in enumerate(parts):
        kvs = list(metadata) if index == 0 else []
        if count > 1:
            kvs += [
                KV("split.no", GGUFValueType.UINT16, index),
                KV("split.count", GGUFValueType.UINT16, count),
                KV("split.tensors.count", GGUFValueType.INT32, len(tensors)),
            ]
        infos = []
        relative = 0
        for t in members:
            t.part = index
            ne = list(reversed(t.shape))
            infos.append(
                _string(t.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, int(t.qtype), relative)
            )
            t.offset = relative  # made absolute below, once the header size is known
            relative = _align(relative + t.nbytes)
        head = GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(members), len(kvs))
        header = head + b"".join(_kv_bytes(kv) for kv in kvs) + b"".join(infos)
        header += bytes(_align(len(header)) - len(header))
        for t in members:
            t.offset += len(header)
        headers.append(header)
    return GGUFPlan(config, quant, tensors, files, headers)


def gguf_array(spec: ParamSpec, value: torch.Tensor | nn.Module, expert: int | None = None) -> np.ndarray:
    """A parameter (one expert's slice of a stack) as float32 in the file's layout.

    Quantised weights give the values grok1 multiplies with: bf16(int8 * scale) for the release."""
    if isinstance(value, torch.Tensor):
        matrix = value if expert is None else value[expert]
    else:
        matrix = value.dequantize(expert)
    matrix = matrix.detach().to("cpu", torch.float32)
    if is_transposed(spec):
        matrix = matrix.transpose(-1, -2)
    return matrix.contiguous().numpy()


def encode(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 values -> the bytes of a GGUF tensor of that type (llama.cpp's reference rounding)."""
    if qtype == QT.F32:
        return array.astype("<f4", copy=False)
    return gguf_quants.quantize(array, qtype)


def _check_value(spec: ParamSpec, value: Any, where: str) -> None:
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(getattr(value, "shape", ()))
    if isinstance(value, (Int8Weight, Int4Weight, BF16Weight)):
        shape = (*value.dequantize(0 if len(spec.shape) == 3 else None).shape,)
        shape = (spec.shape[0], *shape) if len(spec.shape) == 3 else shape
    if shape != spec.shape:
        raise CheckpointError(f"{where}: shape {list(shape)} does not match the config's {list(spec.shape)}")


def write_gguf(
    items: Iterable[tuple[str, torch.Tensor | nn.Module]],
    config: Grok1Config,
    dst: str | os.PathLike[str],
    *,
    quant: str = "bf16",
    tokenizer: str | os.PathLike[str] | None = None,
    split_max_size: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> GGUFPlan:
    """Writes a model given as (official path, weight) pairs to `dst` (or a split set beside it).

    One parameter is held at a time (an expert stack is converted expert by expert); the items may
    come in any order. The files are written under a temporary name and renamed into place when
    complete, the first part last. Returns the plan (files, types, fallbacks).
    """
    dst = os.fspath(dst)
    if not dst.lower().endswith(".gguf"):
        raise Grok1Error(f"{dst}: a GGUF file name must end in .gguf")
    if quant not in EXPORT_TYPES:
        raise Grok1Error(f"unknown GGUF type {quant!r}; choose one of {', '.join(EXPORT_TYPES)}")
    metadata = grok_metadata(config, EXPORT_TYPES[quant][1]) + tokenizer_metadata(config, tokenizer)
    plan = plan_gguf(config, dst, quant, metadata, split_max_size)
    existing = [f for f in plan.files if os.path.exists(f)]
    if existing and not force:
        raise Grok1Error(f"{existing[0]}: already exists (use --force to replace it)")
    parent = os.path.dirname(os.path.abspath(dst))
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".grok1-gguf-", dir=parent)
    except OSError as exc:
        raise Grok1Error(f"{parent}: cannot write there ({exc.strerror})") from None
    try:
        temp_files = [os.path.join(tmp, os.path.basename(f)) for f in plan.files]
        with contextlib.ExitStack() as stack:
            handles = [stack.enter_context(open(name, "wb")) for name in temp_files]
            for fh, header in zip(handles, plan.headers, strict=True):
                fh.write(header)
            _write_tensors(items, plan, handles, progress)
            for fh in handles:  # end each part on the alignment, as llama.cpp's writers do
                end = fh.seek(0, os.SEEK_END)
                fh.write(bytes(_align(end) - end))
        # Loaders open the first part: it appears last, so a visible first part means a complete set.
        for src, final in reversed(list(zip(temp_files, plan.files, strict=True))):
            os.replace(src, final)
    except OSError as exc:
        raise Grok1Error(f"{exc.filename or dst}: {exc.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return plan


def _write_tensors(
    items: Iterable[tuple[str, torch.Tensor | nn.Module]], plan: GGUFPlan, handles: list[BinaryIO], progress: bool
) -> None:
    specs = parameter_specs(plan.config)
    written: set[str] = set()
    with tqdm(total=plan.data_bytes, unit="B", unit_scale=True, desc="writing GGUF", disable=not progress) as bar:
        for path, value in items:
            if path not in plan.tensors:
                raise CheckpointError(f"{path}: not a parameter of this model's config")
            if path in written:
                raise CheckpointError(f"{path}: given twice")
            spec, target = specs[path], plan.tensors[path]
            _check_value(spec, value, path)
            fh = handles[target.part]
            fh.seek(target.offset)
            experts = range(spec.shape[0]) if len(spec.shape) == 3 else [None]
            for expert in experts:
                data = encode(gguf_array(spec, value, expert), target.qtype)
                fh.write(memoryview(np.ascontiguousarray(data)).cast("B"))
            if fh.tell() != target.offset + target.nbytes:
                raise AssertionError(f"{target.name}: wrote {fh.tell() - target.offset} bytes, planned {target.nbytes}")
            written.add(path)
            bar.update(target.nbytes)
    missing = [p for p in plan.tensors if p not in written]
    if missing:
        raise CheckpointError(f"the source did not provide {len(missing)} parameter(s), e.g. {missing[0]}")


# ---- reading ---------------------------------------------------------------------------------------


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only memmap; grok1 never writes to it
        return torch.from_numpy(array)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    """Little-endian f16 fields [..., 2] uint8 -> float32 [..., 1]."""
    return raw.contiguous().view(torch.float16).float()


def _dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.reshape(-1, 34)  # f16 scale, 32 int8
    return (blocks[:, 2:].view(torch.int8).float() * _f16(blocks[:, :2])).reshape(-1)


def _dequant_q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.reshape(-1, 18)  # f16 scale, 16 bytes: value j in the low nibble of byte j, j+16 in the high
    qs = blocks[:, 2:]
    nibbles = torch.cat([qs & 0x0F, qs >> 4], dim=1).float() - 8.0
    return (nibbles * _f16(blocks[:, :2])).reshape(-1)


def _dequant_q4_k(raw: torch.Tensor) -> torch.Tensor:
    # 256 values: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks of 32, 128 bytes of nibbles.
    blocks = raw.reshape(-1, 144)
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    s = blocks[:, 4:16].long()
    low_sc, low_m, high = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([low_sc & 63, (high & 0x0F) | ((low_sc >> 6) << 4)], dim=1).float()
    mins = torch.cat([low_m & 63, (high >> 4) | ((low_m >> 6) << 4)], dim=1).float()
    qs = blocks[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 32 bytes: sub-block 2i in the low nibbles, 2i+1 high
    q = torch.stack([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32).float()
    return ((d * scales)[:, :, None] * q - (dmin * mins)[:, :, None]).reshape(-1)


def _dequant_q6_k(raw: torch.Tensor) -> torch.Tensor:
    # 256 values: 128 bytes low nibbles, 64 bytes of 2-bit highs, 16 int8 scales (one per 16), f16 d.
    blocks = raw.reshape(-1, 210)
    ql = blocks[:, :128].reshape(-1, 2, 64)
    qh = blocks[:, 128:192].reshape(-1, 2, 32)
    scales = blocks[:, 192:208].view(torch.int8).float().reshape(-1, 2, 8)
    d = _f16(blocks[:, 208:210])
    low = torch.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], dim=2)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=raw.device)[None, None, :, None]
    high = (qh[:, :, None, :] >> shifts) & 3
    q = (low.to(torch.int16) | (high.to(torch.int16) << 4)) - 32  # [n, 2 halves, 4 quarters, 32]
    # Each quarter of 32 values has two scales, one per 16 values: scale index 2*quarter + (l >= 16).
    sc = scales.reshape(-1, 2, 4, 2)[:, :, :, :, None].expand(-1, 2, 4, 2, 16).reshape(-1, 2, 4, 32)
    return ((d[:, :, None, None] * sc) * q.float()).reshape(-1)


def _dequant_plain(dtype: torch.dtype) -> Any:
    return lambda raw: raw.contiguous().view(dtype).float().reshape(-1)


# Types dequantised in torch (on any device), and types dequantised by the gguf package on the CPU.
TORCH_DEQUANTIZERS = {
    QT.F32: _dequant_plain(torch.float32),
    QT.F16: _dequant_plain(torch.float16),
    QT.BF16: _dequant_plain(torch.bfloat16),
    QT.Q8_0: _dequant_q8_0,
    QT.Q4_0: _dequant_q4_0,
    QT.Q4_K: _dequant_q4_k,
    QT.Q6_K: _dequant_q6_k,
}
NUMPY_DEQUANTIZED = (QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q2_K, QT.Q3_K, QT.Q5_K)
SUPPORTED_TYPES = (*TORCH_DEQUANTIZERS, *NUMPY_DEQUANTIZED)


def dequantize_raw(raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 values [shape] of raw GGUF bytes of one type."""
    if qtype in TORCH_DEQUANTIZERS:
        return TORCH_DEQUANTIZERS[qtype](raw.reshape(-1)).reshape(shape)
    values = gguf_quants.dequantize(raw.cpu().numpy().reshape(*shape[:-1], -1), qtype)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(raw.device).reshape(shape)


class GGUFWeight(nn.Module):
    """A projection (or expert stack) kept in its GGUF encoding, memory-mapped until moved to a device.

    `raw` holds the tensor's bytes as uint8 [..., out, bytes per row]; `dequantize` gives the
    official-orientation float32 matrix [in, out] (one expert's, for a stack), like `Int8Weight`.
    """

    def __init__(self, raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...], name: str) -> None:
        super().__init__()
        self.qtype = qtype
        self.shape_in_file = shape  # numpy order: [out, in] or [E, out, in]
        self.name = name
        self.register_buffer("raw", raw, persistent=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The official shape: [in, out] or [E, in, out]."""
        *lead, n, k = self.shape_in_file
        return (*lead, k, n)

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        raw = self.raw if expert is None else self.raw[expert]
        shape = self.shape_in_file if expert is None else self.shape_in_file[1:]
        return dequantize_raw(raw, self.qtype, shape).transpose(-1, -2).contiguous()

    def linear(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """`x @ W` for the fast path: GGUF types are dequantised per call (no weight-only kernel)."""
        return x @ self.dequantize(expert).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.name}: {self.qtype.name} {list(self.shape_in_file)} (file order)"


@dataclass
class _FileTensor:
    name: str
    file: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # numpy order
    data: np.ndarray  # the reader's memmap view


class _Reader(GGUFReader):
    """GGUFReader that names the tensor at fault: one cut off by a truncated file (the stock reader
    fails in a reshape) or one of a type id no GGML version defines."""

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        for f in fields:
            _, name, _, dims, raw_type, offset = f.parts
            name = bytes(name).decode("utf-8", "replace")
            try:
                qtype = GGMLQuantizationType(int(raw_type[0]))
            except ValueError:
                raise _BadTensor(
                    f"tensor {name} has type id {int(raw_type[0])}, no GGML type grok1 knows; supported: {_supported()}"
                ) from None
            end = start_offs + int(offset[0]) + tensor_nbytes(tuple(int(d) for d in dims), qtype)
            if end > len(self.data):
                raise _BadTensor(f"truncated: tensor {name} ends at byte {end} but the file has {len(self.data)} bytes")
        super()._build_tensors(start_offs, fields)


class _BadTensor(Exception):
    pass


def _supported() -> str:
    return ", ".join(q.name for q in SUPPORTED_TYPES)


def _open(path: str) -> GGUFReader:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such GGUF file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    if magic != GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        return _Reader(path, "r")
    except _BadTensor as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (ValueError, IndexError, KeyError, struct.error, UnicodeDecodeError, OverflowError) as exc:
        size = os.path.getsize(path)
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({size} bytes; {type(exc).__name__}: {exc})") from None


def _field(reader: GGUFReader, key: str) -> Any:
    f = reader.fields.get(key)
    return None if f is None else f.contents()


class GGUFModel:
    """A GGUF `grok` model (one file, or the first part of a split set), validated on opening.

    `config` comes from the metadata; `weights()` yields (official path, value) pairs: vectors, the
    router and the embedding table as float32 tensors, every projection as a `GGUFWeight`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        first = _open(self.path)
        self.fields = first.fields  # the metadata (in the first part only)
        index, count = self.meta("split.no", 0), self.meta("split.count", 1)
        if index:
            raise CheckpointError(f"{self.path}: part {index + 1} of a {count}-part split GGUF; open the first part")
        arch = self.meta("general.architecture")
        if arch != ARCH:
            raise CheckpointError(
                f"{self.path}: a GGUF of architecture {arch!r}; grok1 runs only '{ARCH}' (Grok-1) files"
            )
        self.readers = [(self.path, first)] + self._other_parts(first)
        self.tensors = self._collect_tensors()
        self.config = self._read_config()
        self._check_tensors()

    # ---- files ----------------------------------------------------------------------------------
    def _other_parts(self, first: GGUFReader) -> list[tuple[str, GGUFReader]]:
        count = _field(first, "split.count") or 1
        if count <= 1:
            return []
        suffix = f"-00001-of-{count:05d}.gguf"
        if not self.path.endswith(suffix):
            raise CheckpointError(f"{self.path}: the first of {count} split parts, but not named *{suffix}")
        stem = self.path[: -len(suffix)] + ".gguf"
        parts = []
        for i in range(1, count):
            name = split_file_name(stem, i, count)
            if not os.path.exists(name):
                raise CheckpointError(f"{name}: missing part {i + 1} of the {count}-part split GGUF {self.path}")
            reader = _open(name)
            if _field(reader, "split.no") != i or _field(reader, "split.count") != count:
                raise CheckpointError(f"{name}: not part {i + 1} of {count} (its split.no/split.count disagree)")
            parts.append((name, reader))
        return parts

    def _collect_tensors(self) -> dict[str, _FileTensor]:
        tensors: dict[str, _FileTensor] = {}
        for file, reader in self.readers:
            for t in reader.tensors:
                name = t.name
                for alternative, usual in ALTERNATIVE_NAMES.items():
                    if name.startswith("blk.") and name.endswith(alternative):
                        name = name.removesuffix(alternative) + usual
                if name in tensors:
                    raise CheckpointError(f"{file}: tensor {t.name} appears twice (also in {tensors[name].file})")
                shape = tuple(int(n) for n in reversed(t.shape.tolist()))
                tensors[name] = _FileTensor(t.name, file, t.tensor_type, shape, t.data)
        expected = _field(self.readers[0][1], "split.tensors.count")
        if expected is not None and expected != len(tensors):
            raise CheckpointError(f"{self.path}: split.tensors.count says {expected} tensors, the parts hold {len(tensors)}")
        return tensors

    # ---- config ---------------------------------------------------------------------------------
    def meta(self, key: str, default: Any = None) -> Any:
        """One metadata value (arrays as lists), or `default` when the key is absent."""
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def _key(self, key: str, kind: type, default: Any = None) -> Any:
        value = self.meta(key, default)
        if value is None:
            raise CheckpointError(f"{self.path}: missing metadata key {key}")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise CheckpointError(f"{self.path}: metadata key {key} must be an integer, got {value!r}")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise CheckpointError(f"{self.path}: metadata key {key} must be a number, got {value!r}")
        return value

    def _read_config(self) -> Grok1Config:
        a = ARCH
        emb = self._key(f"{a}.embedding_length", int)
        heads = self._key(f"{a}.attention.head_count", int)
        if heads <= 0 or emb % heads:
            raise CheckpointError(f"{self.path}: {a}.attention.head_count {heads} does not divide the embedding {emb}")
        key_size = self._key(f"{a}.attention.key_length", int, emb // heads)
        value_size = self._key(f"{a}.attention.value_length", int, key_size)
        rope_dims = self._key(f"{a}.rope.dimension_count", int, key_size)
        if value_size != key_size or rope_dims != key_size:
            raise CheckpointError(
                f"{self.path}: key length {key_size}, value length {value_size} and rope dimensions {rope_dims} "
                "must be equal for Grok-1"
            )
        ffn = self.meta(f"{a}.expert_feed_forward_length") or self._key(f"{a}.feed_forward_length", int)
        cap = self._key(f"{a}.final_logit_softcapping", float, 0.0)
        if cap:
            raise CheckpointError(f"{self.path}: {a}.final_logit_softcapping = {cap}: a grok-2 feature grok1 does not run")
        rope_base = self._key(f"{a}.rope.freq_base", float, 10000.0)
        if rope_base != int(rope_base):
            raise CheckpointError(f"{self.path}: {a}.rope.freq_base {rope_base} is not an integer")
        embd = self.tensors.get("token_embd.weight")
        if embd is None:
            raise CheckpointError(f"{self.path}: missing tensor token_embd.weight")
        vocab = embd.shape[0]
        tokens = self.fields.get("tokenizer.ggml.tokens")
        if tokens is not None and len(tokens.data) != vocab:
            raise CheckpointError(
                f"{self.path}: tokenizer.ggml.tokens has {len(tokens.data)} entries, token_embd.weight {vocab} rows"
            )
        try:
            return Grok1Config(
                name=str(self.meta("general.name") or os.path.basename(self.path)),
                vocab_size=vocab,
                pad_token=self._key("tokenizer.ggml.padding_token_id", int, 0),
                eos_token=self._key("tokenizer.ggml.eos_token_id", int, 2),
                bos_token=self._key("tokenizer.ggml.bos_token_id", int, 1),
                sequence_len=self._key(f"{a}.context_length", int),
                embedding_multiplier_scale=_from_f32(
                    self._key(f"{a}.embedding_scale", float, RELEASED_EMBEDDING_MULTIPLIER), RELEASED_EMBEDDING_MULTIPLIER),
                output_multiplier_scale=_from_f32(
                    self._key(f"{a}.logit_scale", float, RELEASED_OUTPUT_MULTIPLIER), RELEASED_OUTPUT_MULTIPLIER),
                attn_output_multiplier=_from_f32(
                    self._key(f"{a}.attention.output_scale", float, RELEASED_ATTN_OUTPUT_MULTIPLIER),
                    RELEASED_ATTN_OUTPUT_MULTIPLIER),
                attn_logit_softcap=_from_f32(self._key(f"{a}.attn_logit_softcapping", float, 30.0), 30.0),
                rms_norm_eps=_from_f32(self._key(f"{a}.attention.layer_norm_rms_epsilon", float), 1e-5),
                rope_base=int(rope_base),
                emb_size=emb,
                key_size=key_size,
                num_q_heads=heads,
                num_kv_heads=self._key(f"{a}.attention.head_count_kv", int, heads),
                num_layers=self._key(f"{a}.block_count", int),
                widening_factor=_widening_factor(emb, ffn, self.path),
                num_experts=self._key(f"{a}.expert_count", int),
                num_selected_experts=self._key(f"{a}.expert_used_count", int),
            )
        except ConfigError as exc:
            raise CheckpointError(f"{self.path}: {str(exc).removeprefix('config: ')}") from None

    # ---- tensors --------------------------------------------------------------------------------
    def _check_tensors(self) -> None:
        specs = parameter_specs(self.config)
        names = tensor_names(self.config)
        expected = {name: specs[path] for path, name in names.items()}
        for name, spec in expected.items():
            t = self.tensors.get(name)
            if t is None:
                raise CheckpointError(f"{self.path}: missing tensor {name} ({spec.path})")
            if t.shape != gguf_shape(spec):
                raise CheckpointError(
                    f"{t.file}: tensor {name} has shape {_ne(t.shape)} (GGUF ne), expected {_ne(gguf_shape(spec))} "
                    "from the metadata"
                )
            if t.qtype not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{t.file}: tensor {name} has type {t.qtype.name}, which grok1 cannot read; supported: {_supported()}"
                )
        extra = sorted(set(self.tensors) - set(expected))
        if extra:
            reasons = {n: UNSUPPORTED_TENSORS.get(n.split(".", 2)[-1] if n.startswith("blk.") else n) for n in extra}
            described = ", ".join(f"{n} ({r})" if r else n for n, r in reasons.items())
            raise CheckpointError(f"{self.tensors[extra[0]].file}: tensors grok1 has no place for: {described}")

    @property
    def num_tensors(self) -> int:
        return len(self.tensors)

    def weights(self) -> Iterator[tuple[str, torch.Tensor | GGUFWeight]]:
        specs = parameter_specs(self.config)
        for path, name in tensor_names(self.config).items():
            spec, t = specs[path], self.tensors[name]
            raw = _as_tensor(t.data)
            if not is_transposed(spec) or spec.path.endswith("router/w"):
                if t.qtype == QT.F32:
                    values = raw.reshape(t.shape)  # zero-copy view of the mapped file
                else:
                    values = dequantize_raw(raw.view(torch.uint8), t.qtype, t.shape)
                yield path, (values.T.contiguous() if is_transposed(spec) else values)
            else:
                yield path, GGUFWeight(raw.view(torch.uint8).reshape(*t.shape[:-1], -1), t.qtype, t.shape, name)


def _ne(shape: tuple[int, ...]) -> str:
    return "{" + ", ".join(str(n) for n in reversed(shape)) + "}"


def _from_f32(value: float, known: float) -> float:
    """GGUF stores f32: give back the full-precision constant it was rounded from when it is the
    known one, otherwise the shortest decimal that rounds to the same f32."""
    if np.float32(value) == np.float32(known):
        return known
    return float(str(np.float32(value)))


def _widening_factor(emb: int, ffn: int, where: str) -> float:
    """The shortest-written widening factor whose official `ffn_size` is the file's FFN width
    (Grok-1's 8 and the presets' factors come back as they were)."""
    exact = ffn * 1.5 / emb
    candidates = (float(round(exact)), round(exact * 8) / 8, *(round(exact, digits) for digits in (1, 2, 3)), exact)
    for factor in (*candidates, (ffn * 1.5 + 1) / emb):
        if factor > 0 and ffn_size(emb, factor) == ffn:
            return factor
    raise CheckpointError(
        f"{where}: feed_forward_length {ffn} is not an FFN width Grok-1's config can express (2/3 of "
        f"widening_factor * {emb}, rounded up to a multiple of 8)"
    )


def parse_size(text: str) -> int:
    """`500M`, `2G`, `1.5T` or a byte count (decimal units, as llama.cpp's gguf-split)."""
    units = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    text = text.strip().upper().removesuffix("B")
    try:
        if text and text[-1] in units:
            value = int(float(text[:-1]) * units[text[-1]])
        else:
            value = int(text)
    except ValueError:
        raise Grok1Error(f"--split-max-size: cannot read {text!r} as a size (e.g. 500M, 2G)") from None
    if value <= 0:
        raise Grok1Error(f"--split-max-size must be positive, got {text!r}")
    return value
