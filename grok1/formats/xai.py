"""xAI's release format: `ckpt-0/tensorNNNNN_000`, one pickle per parameter (see
`shared/docs/xai-checkpoint-format.md`).

Reading never executes code from a file: the pickles go through an unpickler whose `find_class`
admits only the five globals the format uses, each mapped to a local stand-in that merely records
its arguments (no numpy or ml_dtypes object is ever built from file data). Anything else is refused
before it is called.

Writing emits the same opcode stream the release's writer (`pickle.dump` of numpy 1.x arrays,
protocol 4, with framing) produces, so files are byte-compatible with the official loader.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from ..config import Grok1Config
from ..errors import CheckpointError
from ..model import ParamSpec, parameter_specs
from ..quant import Int8Weight

CHECKPOINT_SUBDIR = "ckpt-0"
RELEASE_ROW_BLOCKS = 8  # the release was written from an 8-way model-parallel mesh


def tensor_filename(index: int, shard: int = 0) -> str:
    return f"tensor{index:05d}_{shard:03d}"


def release_order(config: Grok1Config) -> list[ParamSpec]:
    """The files' order: jax's tree-flatten order, i.e. module paths sorted as strings
    (`decoder_layer_10` before `decoder_layer_2`)."""
    return sorted(parameter_specs(config).values(), key=lambda s: s.path)


def scales_shape(spec: ParamSpec, blocks: int = RELEASE_ROW_BLOCKS) -> tuple[int, ...]:
    """The release's scale shape: input axis reduced to 1, or to `blocks` for row-parallel matrices."""
    *lead, _, n = spec.shape
    return (*lead, blocks if spec.row_parallel else 1, n)


# ---- restricted unpickling ---------------------------------------------------------------------


class _Marker:
    """Stands for a type a pickle names (numpy.ndarray, ml_dtypes.bfloat16); not callable."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


_NDARRAY = _Marker("numpy.ndarray")
_BFLOAT16 = _Marker("ml_dtypes.bfloat16")

_DTYPES = {"f4": torch.float32, "i1": torch.int8, "bfloat16": torch.bfloat16}
_ITEMSIZE = {torch.float32: 4, torch.int8: 1, torch.bfloat16: 2}


class _DtypeRecord:
    """What `numpy.dtype(name, align, copy)` plus its BUILD state say about a dtype."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 2 and isinstance(state[1], str)):
            raise pickle.UnpicklingError(f"unexpected dtype state {state!r}")
        self.byteorder = state[1]


def _dtype(name: Any, align: Any = False, copy: Any = True) -> _DtypeRecord:
    if name is _BFLOAT16:
        return _DtypeRecord("bfloat16")
    if isinstance(name, str) and name in _DTYPES:
        return _DtypeRecord(name)
    raise pickle.UnpicklingError(f"dtype {name!r} is not one the release uses (float32, int8, bfloat16)")


class _ArrayRecord:
    """What `numpy.core.multiarray._reconstruct` plus its BUILD state say about an array."""

    shape: tuple[int, ...] = ()
    dtype: _DtypeRecord | None = None
    data: bytes = b""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("unexpected ndarray state")
        _, shape, dtype, fortran, data = state
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"bad array shape {shape!r}")
        if not isinstance(dtype, _DtypeRecord):
            raise pickle.UnpicklingError("array dtype is not a dtype")
        if fortran:
            raise pickle.UnpicklingError("Fortran-ordered arrays are not part of the release format")
        if not isinstance(data, (bytes, bytearray)):
            raise pickle.UnpicklingError("array payload is not a byte string")
        self.shape, self.dtype, self.data = shape, dtype, data


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayRecord:
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("_reconstruct called for something other than numpy.ndarray")
    return _ArrayRecord()


class _QuantizedWeightRecord:
    """Stand-in for `__main__.QuantizedWeight8bit` (a dataclass with `weight` and `scales`)."""

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, dict) and set(state) == {"weight", "scales"}):
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise pickle.UnpicklingError(f"QuantizedWeight8bit with fields {keys}, expected weight and scales")
        self.weight = state["weight"]
        self.scales = state["scales"]


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("ml_dtypes", "bfloat16"): _BFLOAT16,
    ("__main__", "QuantizedWeight8bit"): _QuantizedWeightRecord,
}


class ForbiddenGlobal(pickle.UnpicklingError):
    pass


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only the globals of the release format; everything else is refused unresolved."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"refusing to load global {module}.{name}: not part of the release format") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent references are not part of the release format")


@dataclass
class LoadedTensor:
    spec: ParamSpec
    file: str
    value: torch.Tensor | Int8Weight


# ---- writing -----------------------------------------------------------------------------------

_FRAME_SIZE_TARGET = 64 * 1024


class _PickleEmitter:
    """Writes protocol-4 pickles of numpy-1.x arrays exactly as CPython's C pickler lays them out
    (memo numbering, framing, large payloads outside frames)."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.frame = bytearray()
        self.memo: dict[Any, int] = {}

    # framing
    def _commit_frame(self) -> None:
        if self.frame:
            if len(self.frame) >= 4:
                self.out.write(b"\x95" + struct.pack("<Q", len(self.frame)))
            self.out.write(self.frame)
            self.frame = bytearray()

    def _op(self, data: bytes) -> None:
        if len(self.frame) >= _FRAME_SIZE_TARGET:
            self._commit_frame()
        self.frame += data

    def _memoize(self, key: Any) -> None:
        self.memo[key] = len(self.memo)
        self.frame += b"\x94"

    def _get(self, key: Any) -> bool:
        if key in self.memo:
            index = self.memo[key]
            self._op(b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index))
            return True
        return False

    # values
    def string(self, s: str) -> None:
        if self._get(("str", s)):
            return
        raw = s.encode("utf-8")
        self._op(b"\x8c" + bytes([len(raw)]) + raw)
        self._memoize(("str", s))

    def integer(self, n: int) -> None:
        if 0 <= n < 256:
            self._op(b"K" + bytes([n]))
        elif 0 <= n < 65536:
            self._op(b"M" + struct.pack("<H", n))
        elif -(2**31) <= n < 2**31:
            self._op(b"J" + struct.pack("<i", n))
        else:
            raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
            self._op(b"\x8a" + bytes([len(raw)]) + raw)

    def global_(self, module: str, name: str) -> None:
        if self._get(("global", module, name)):
            return
        self.string(module)
        self.string(name)
        self._op(b"\x93")
        self._memoize(("global", module, name))

    def tuple_(self, items: list[Callable[[], None]]) -> None:
        if len(items) <= 3:
            for item in items:
                item()
            self._op({0: b")", 1: b"\x85", 2: b"\x86", 3: b"\x87"}[len(items)])
            if items:
                self._memoize(object())
        else:
            self._op(b"(")
            for item in items:
                item()
            self._op(b"t")
            self._memoize(object())

    def payload(self, data: bytes | memoryview | int) -> None:
        """Raw array bytes (or, when only sizing, their number)."""
        n = data if isinstance(data, int) else len(data)
        header = (b"C" + bytes([n])) if n < 256 else (b"B" + struct.pack("<I", n)) if n < 2**32 else (b"\x8e" + struct.pack("<Q", n))
        if n >= _FRAME_SIZE_TARGET:
            self._commit_frame()
            self.out.write(header)
            self.out.write(data)
        else:
            self._op(header)
            self.frame += bytes(data)
        self.frame += b"\x94"
        self.memo[object()] = len(self.memo)

    def array(self, tensor: torch.Tensor) -> None:
        """numpy.ndarray.__reduce__: _reconstruct(ndarray, (0,), b'b') then BUILD (1, shape, dtype, False, raw)."""
        sizing = tensor.device.type == "meta"
        tensor = tensor if sizing else tensor.contiguous().cpu()
        self.global_("numpy.core.multiarray", "_reconstruct")
        self.global_("numpy", "ndarray")
        self.tuple_([lambda: self.integer(0)])
        if not self._get(("bytes", b"b")):
            self._op(b"C\x01b")
            self._memoize(("bytes", b"b"))
        self._op(b"\x87")
        self._memoize(object())
        self._op(b"R")
        self._memoize(object())
        self._op(b"(")
        self.integer(1)
        self.tuple_([lambda n=n: self.integer(n) for n in tensor.shape])
        self.dtype(tensor.dtype)
        self._op(b"\x89")
        self.payload(tensor.numel() * tensor.element_size() if sizing else _raw_bytes(tensor))
        self._op(b"t")
        self._memoize(object())
        self._op(b"b")

    def dtype(self, dtype: torch.dtype) -> None:
        self.global_("numpy", "dtype")
        if dtype == torch.bfloat16:
            self.global_("ml_dtypes", "bfloat16")
            order, sizes = "<", (2, 2, 80)  # ml_dtypes <= 0.5.0 flags, as in the release era
        else:
            self.string({torch.float32: "f4", torch.int8: "i1"}[dtype])
            order, sizes = ("|" if dtype == torch.int8 else "<"), (-1, -1, 0)
        self._op(b"\x89\x88\x87")
        self._memoize(object())
        self._op(b"R")
        self._memoize(object())
        self._op(b"(")
        self.integer(3)
        self.string(order)
        self._op(b"NNN")
        for n in sizes:
            self.integer(n)
        self._op(b"t")
        self._memoize(object())
        self._op(b"b")

    def quantized_weight(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        self.global_("__main__", "QuantizedWeight8bit")
        self._op(b")\x81")
        self._memoize(object())
        self._op(b"}")
        self._memoize(object())
        self._op(b"(")
        self.string("weight")
        self.array(weight)
        self.string("scales")
        self.array(scales)
        self._op(b"u")
        self._op(b"b")

    def finish(self) -> None:
        self._op(b".")
        self._commit_frame()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return memoryview(tensor.numpy()).cast("B")


def write_tensor_file(out: BinaryIO, value: torch.Tensor | Int8Weight) -> None:
    emitter = _PickleEmitter(out)
    emitter.out.write(b"\x80\x04")
    if isinstance(value, Int8Weight):
        emitter.quantized_weight(value.weight, value.scales)
    else:
        if value.dtype != torch.float32:
            raise TypeError(f"plain release tensors are float32, got {value.dtype}")
        emitter.array(value)
    emitter.finish()


class _CountingSink:
    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes | bytearray | int) -> None:
        self.size += data if isinstance(data, int) else len(data)


def expected_file_size(spec: ParamSpec, blocks: int = RELEASE_ROW_BLOCKS) -> int:
    """The exact size of a release tensor file as the release's writer lays it out (payload plus the
    pickle around it), computed without any data."""
    sink = _CountingSink()
    emitter = _PickleEmitter(sink)
    sink.write(b"\x80\x04")
    if spec.quantised:
        weight = torch.empty(spec.shape, dtype=torch.int8, device="meta")
        scales = torch.empty(scales_shape(spec, blocks), dtype=torch.bfloat16, device="meta")
        emitter.quantized_weight(weight, scales)
    else:
        emitter.array(torch.empty(spec.shape, dtype=torch.float32, device="meta"))
    emitter.finish()
    return sink.size


def tensor_file_bytes(value: torch.Tensor | Int8Weight) -> bytes:
    buf = io.BytesIO()
    write_tensor_file(buf, value)
    return buf.getvalue()


# ---- locating payloads without reading them ----------------------------------------------------

_PAYLOAD_INLINE_LIMIT = 1 << 16  # payloads at least this large are located, not read
_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
_BYTES_OPCODES = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_LENGTH_FORMATS = {-2: "<B", -3: "<i", -4: "<I", -5: "<Q"}


@dataclass(frozen=True)
class Payload:
    """An array inside a release file: where its raw bytes are, and what they are."""

    file: str
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    inline: bytes | None = None  # small payloads are kept in memory

    def read(self) -> torch.Tensor:
        """The whole array, read into a fresh tensor (one copy: the file's bytes land in it directly)."""
        out = torch.empty(self.nbytes, dtype=torch.uint8)
        if self.inline is not None:
            out.numpy()[:] = memoryview(self.inline)
        elif self.nbytes:
            with open(self.file, "rb") as fh:
                fh.seek(self.offset)
                if fh.readinto(out.numpy()) != self.nbytes:
                    raise EOFError("the payload is truncated")
        return out.view(self.dtype).view(self.shape)


@dataclass(frozen=True)
class ScannedTensor:
    """A release file's structure: one array, or an int8 weight with its scales."""

    array: Payload | None = None
    weight: Payload | None = None
    scales: Payload | None = None

    @property
    def quantised(self) -> bool:
        return self.weight is not None


def scan_tensor_file(path: str) -> ScannedTensor:
    """Reads a release file's pickle opcodes, seeking past large payloads, and interprets the
    remaining structure with the restricted unpickler. Memory use is independent of the tensor size."""
    refs: dict[bytes, tuple[int, int]] = {}
    nonce = os.urandom(8).hex()
    skeleton = bytearray()
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        while True:
            code = fh.read(1)
            if not code:
                raise EOFError("pickle data was truncated (no STOP opcode)")
            op = _OPCODES.get(code)
            if op is None:
                raise pickle.UnpicklingError(f"invalid pickle opcode {code!r} at byte {fh.tell() - 1}")
            if op.name == "FRAME":
                if len(fh.read(8)) != 8:
                    raise EOFError("pickle data was truncated")
                continue  # frames are optional; the skeleton is unframed
            arg = b""
            if op.arg is not None:
                n = op.arg.n
                if n >= 0:
                    arg = fh.read(n)
                    if len(arg) != n:
                        raise EOFError("pickle data was truncated")
                elif n == -1:
                    lines = 2 if op.arg.name == "stringnl_noescape_pair" else 1
                    arg = b"".join(fh.readline() for _ in range(lines))
                else:
                    fmt = _LENGTH_FORMATS[n]
                    head = fh.read(struct.calcsize(fmt))
                    if len(head) != struct.calcsize(fmt):
                        raise EOFError("pickle data was truncated")
                    length = struct.unpack(fmt, head)[0]
                    if length < 0:
                        raise pickle.UnpicklingError("negative length in pickle")
                    if op.name in _BYTES_OPCODES and length >= _PAYLOAD_INLINE_LIMIT:
                        offset = fh.tell()
                        if offset + length > size:
                            raise EOFError(
                                f"pickle data was truncated: a {length}-byte payload at byte {offset} runs past the "
                                f"end of the {size}-byte file"
                            )
                        tag = f"@payload:{nonce}:{len(refs)}".encode()
                        refs[tag] = (offset, length)
                        skeleton += b"C" + bytes([len(tag)]) + tag
                        fh.seek(length, os.SEEK_CUR)
                        continue
                    body = fh.read(length)
                    if len(body) != length:
                        raise EOFError("pickle data was truncated")
                    arg = head + body
            skeleton += code + arg
            if op.name == "STOP":
                break
        if fh.read(1):
            raise pickle.UnpicklingError("unexpected data after the pickle")
    obj = RestrictedUnpickler(io.BytesIO(bytes(skeleton))).load()

    def payload(record: Any, what: str) -> Payload:
        if not isinstance(record, _ArrayRecord) or record.dtype is None:
            raise pickle.UnpicklingError(f"{what} is not an array")
        dtype = _DTYPES[record.dtype.name]
        if record.dtype.byteorder == ">":
            raise pickle.UnpicklingError(f"{what} is not little-endian")
        nbytes = math.prod(record.shape) * _ITEMSIZE[dtype]
        data = bytes(record.data)
        if data in refs:
            offset, length = refs[data]
            inline = None
        else:
            offset, length, inline = -1, len(data), data
        if length != nbytes:
            raise pickle.UnpicklingError(f"{what} holds {length} bytes, shape {list(record.shape)} needs {nbytes}")
        return Payload(path, offset, nbytes, tuple(record.shape), dtype, inline)

    if isinstance(obj, _QuantizedWeightRecord):
        weight = payload(obj.weight, "QuantizedWeight8bit.weight")
        scales = payload(obj.scales, "QuantizedWeight8bit.scales")
        if weight.dtype != torch.int8 or scales.dtype != torch.bfloat16:
            raise pickle.UnpicklingError(
                f"QuantizedWeight8bit holds weight {weight.dtype} / scales {scales.dtype}, expected int8 / bfloat16"
            )
        return ScannedTensor(weight=weight, scales=scales)
    return ScannedTensor(array=payload(obj, "array"))


def check_scanned(scanned: ScannedTensor, spec: ParamSpec, file: str) -> None:
    where = f"{file} ({spec.path})"
    if spec.quantised:
        if not scanned.quantised:
            raise CheckpointError(f"{where}: expected an int8 QuantizedWeight8bit, found a plain {scanned.array.dtype} array")
        shape, sshape = scanned.weight.shape, scanned.scales.shape
        if shape != spec.shape:
            raise CheckpointError(f"{where}: weight shape {list(shape)} does not match the config's {list(spec.shape)}")
        if len(sshape) != len(shape) or sshape[:-2] != shape[:-2] or sshape[-1] != shape[-1]:
            raise CheckpointError(f"{where}: scales shape {list(sshape)} does not match weight shape {list(shape)}")
        blocks = sshape[-2]
        if blocks == 0 or shape[-2] % blocks:
            raise CheckpointError(f"{where}: {blocks} scale row blocks do not divide the input size {shape[-2]}")
        if not spec.row_parallel and blocks != 1:
            raise CheckpointError(f"{where}: scales shape {list(sshape)} has {blocks} row blocks, expected 1")
    else:
        if scanned.quantised:
            raise CheckpointError(f"{where}: expected a float32 array, found a QuantizedWeight8bit")
        if scanned.array.shape != spec.shape:
            raise CheckpointError(f"{where}: shape {list(scanned.array.shape)} does not match the config's {list(spec.shape)}")
        if scanned.array.dtype != torch.float32:
            raise CheckpointError(f"{where}: dtype {scanned.array.dtype} where float32 is expected")


def scan_checked(file: str, spec: ParamSpec) -> ScannedTensor:
    """One release file's structure, checked against its parameter; errors name the file and path."""
    where = f"{file} ({spec.path})"
    try:
        scanned = scan_tensor_file(file)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing tensor file") from None
    except ForbiddenGlobal as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    except (EOFError, pickle.UnpicklingError, struct.error, ValueError, TypeError, KeyError) as exc:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, EOFError) or "truncated" in detail:
            detail = f"truncated or corrupt file ({detail})"
        raise CheckpointError(f"{where}: {detail}") from None
    check_scanned(scanned, spec, file)
    return scanned


def scan_release(path: str | os.PathLike[str], config: Grok1Config) -> Iterator[tuple[ParamSpec, str, ScannedTensor]]:
    """Every tensor file's structure, checked against the config, without reading payloads."""
    ckpt = os.path.join(os.fspath(path), CHECKPOINT_SUBDIR)
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{path}: no {CHECKPOINT_SUBDIR}/ directory (expected the release layout)")
    for index, spec in enumerate(release_order(config)):
        file = os.path.join(ckpt, tensor_filename(index))
        yield spec, file, scan_checked(file, spec)


def iter_release(
    path: str | os.PathLike[str], config: Grok1Config, only: Callable[[ParamSpec], bool] | None = None
) -> Iterator[LoadedTensor]:
    """Reads the release's tensor files one at a time, checked against the config: each file's
    structure is scanned first (`scan_checked`), then its payloads are read straight into tensors."""
    ckpt = os.path.join(os.fspath(path), CHECKPOINT_SUBDIR)
    if not os.path.isdir(ckpt):
        raise CheckpointError(f"{path}: no {CHECKPOINT_SUBDIR}/ directory (expected the release layout)")
    order = release_order(config)
    for index, spec in enumerate(order):
        if only is not None and not only(spec):
            continue
        file = os.path.join(ckpt, tensor_filename(index))
        scanned = scan_checked(file, spec)
        try:
            if scanned.quantised:
                value = Int8Weight.from_release(scanned.weight.read(), scanned.scales.read())
            else:
                value = scanned.array.read()
        except (OSError, EOFError) as exc:
            raise CheckpointError(f"{file} ({spec.path}): cannot read the payload ({exc})") from None
        yield LoadedTensor(spec, file, value)
    extra = os.path.join(ckpt, tensor_filename(len(order)))
    if only is None and os.path.exists(extra):
        raise CheckpointError(
            f"{extra}: the config has {len(order)} tensors but the checkpoint has more; "
            "is config.json the one for this checkpoint?"
        )
