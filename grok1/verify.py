"""`grok1 verify`: check a release or native model directory against its config, naming every
tensor at fault."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tqdm import tqdm

from .errors import CheckpointError, Grok1Error
from .formats import native, xai
from .loader import read_config


@dataclass
class VerifyReport:
    path: str
    kind: str
    tensors: int = 0
    bytes_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(path: str | os.PathLike[str], progress: bool = True, threads: int = 2) -> VerifyReport:
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise Grok1Error(f"{path}: no such model directory")
    if native.is_native(path):
        return _verify_native(path, progress, threads)
    if os.path.isdir(os.path.join(path, xai.CHECKPOINT_SUBDIR)):
        return _verify_release(path, progress)
    raise Grok1Error(f"{path}: neither a native model ({native.INDEX_FILE}) nor the release layout ({xai.CHECKPOINT_SUBDIR}/)")


def _verify_native(path: str, progress: bool, threads: int) -> VerifyReport:
    report = VerifyReport(path, "native")
    config = read_config(path)
    try:
        ckpt = native.NativeCheckpoint(path)
    except CheckpointError as exc:
        report.problems.append(str(exc))
        return report
    report.problems += ckpt.check_layout(config)
    report.problems += ckpt.verify_checksums(progress=progress, threads=threads)
    report.tensors = len(ckpt.location)
    report.bytes_checked = sum(ckpt.meta(n).nbytes for n in ckpt.location)
    return report


def _verify_release(path: str, progress: bool) -> VerifyReport:
    """Structure of every file (opcodes, globals, shapes, dtypes, payload sizes) and its exact
    length as the release's writer lays it out, without reading the payloads: a truncated or wrong
    file is found in seconds."""
    report = VerifyReport(path, "release")
    config = read_config(path)
    ckpt = os.path.join(path, xai.CHECKPOINT_SUBDIR)
    order = xai.release_order(config)
    for index, spec in enumerate(tqdm(order, desc="verifying", unit="file", disable=not progress, leave=False)):
        file = os.path.join(ckpt, xai.tensor_filename(index))
        try:
            scanned = xai.scan_checked(file, spec)
        except CheckpointError as exc:
            report.problems.append(str(exc))
            continue
        blocks = scanned.scales.shape[-2] if scanned.quantised else 1
        expected = xai.expected_file_size(spec, blocks)
        if os.path.getsize(file) != expected:
            report.problems.append(
                f"{file} ({spec.path}): {os.path.getsize(file)} bytes; the release's writer makes this tensor "
                f"{expected} bytes"
            )
        report.tensors += 1
        parts = [scanned.array] if scanned.array is not None else [scanned.weight, scanned.scales]
        report.bytes_checked += sum(p.nbytes for p in parts)
    extra = os.path.join(ckpt, xai.tensor_filename(len(order)))
    if os.path.exists(extra):
        report.problems.append(f"{extra}: the config has {len(order)} tensors but the checkpoint has more")
    return report
