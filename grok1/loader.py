"""`grok1.load`: find the model at a path, read its weights, return a ready `Grok1` module."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import torch
from torch import nn
from tqdm import tqdm

from .config import GROK1, Grok1Config
from .errors import CheckpointError, Grok1Error
from .formats import native, xai
from .model import Grok1, parameter_specs
from .quant import Int4Weight

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "fp32": torch.float32, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16  # the official default activation dtype
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise Grok1Error(f"activation dtype {dtype} is not supported; use float32 or bfloat16")
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise Grok1Error(f"unknown dtype {dtype!r}; use float32 or bfloat16") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise Grok1Error(f"unknown device {device!r} ({exc})") from None


def read_config(path: str | os.PathLike[str]) -> Grok1Config:
    """A model directory's config.json, or the released Grok-1 when there is none."""
    config_file = os.path.join(os.fspath(path), "config.json")
    if os.path.exists(config_file):
        return Grok1Config.from_file(config_file)
    return GROK1


Weight = torch.Tensor | nn.Module  # a plain tensor, or a quantised one with `dequantize(expert=None)`


def read_weights(path: str | os.PathLike[str]) -> tuple[Grok1Config, Iterator[tuple[str, Weight]], int]:
    """A model's config and a one-pass iterator over its (official parameter path, weight) pairs,
    with their number: from a release or native directory, or from a GGUF file (`*.gguf`)."""
    path = os.fspath(path)
    if path.lower().endswith(".gguf"):
        from .formats.gguf import GGUFModel

        source = GGUFModel(path)
        return source.config, source.weights(), source.num_tensors
    if not os.path.exists(path):
        raise Grok1Error(f"{path}: no such model directory")
    if not os.path.isdir(path):
        raise Grok1Error(f"{path}: not a model directory")
    config = read_config(path)
    specs = parameter_specs(config)
    if native.is_native(path):
        ckpt = native.NativeCheckpoint(path)
        problems = ckpt.check_layout(config)
        if problems:
            raise CheckpointError(f"{path}: " + "; ".join(problems))
        return config, ((spec.path, ckpt.weight(spec)) for spec in specs.values()), len(specs)
    if not os.path.isdir(os.path.join(path, xai.CHECKPOINT_SUBDIR)):
        raise CheckpointError(
            f"{path}: neither a native model ({native.INDEX_FILE}) nor the release layout ({xai.CHECKPOINT_SUBDIR}/)"
        )
    items = ((item.spec.path, item.value) for item in xai.iter_release(path, config))
    return config, items, len(specs)


def load(
    path: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    verify: bool = False,
    exact: bool = False,
    head: str = "bf16",
    max_memory: int | str | None = None,
) -> Grok1:
    """Loads a model: a native directory (memory-mapped safetensors, see `grok1 convert`), a directory
    in the release layout (`ckpt-0/`, optional `config.json`), or a GGUF file of llama.cpp's `grok`
    architecture (`*.gguf`, or the first part of a split set).

    Returns a `Grok1` module in eval mode whose call on int64 ids [B, T] gives float32 logits
    [B, T, vocab]. `dtype` is the activation dtype (bfloat16 by default, as the official code;
    float32 reproduces the official float32 path). Quantised weights stay quantised. A native model
    is mapped, not read: no weight bytes are touched until a layer uses them, unless `verify=True`,
    which first checks every tensor's checksum.

    `max_memory` (bytes, or a size such as "8GB") caps the memory the weights of a native model
    occupy: the attention, router, norm and embedding weights are read into memory, and the experts
    are read from the files when a token selects them, into a cache of what remains (`grok1.memory`).
    The KV cache and activations come on top. Too small a cap is refused with the size needed.

    Arithmetic: float32 always runs the fidelity path (the official code's: weights bf16(q*s),
    dequantised inside each matmul). bfloat16 runs the fast path (weight-only int8/int4 kernels that
    apply the scales after accumulating) unless `exact=True`, which keeps the fidelity path.
    `head="int8"` or `"int4"` makes the fast path compute the logits from a quantised copy of the
    embedding (lossy; llama.cpp's Q8_0 / Q4_0 files quantise it the same way).
    """
    path = os.fspath(path)
    act = resolve_dtype(dtype)
    target = resolve_device("cpu" if device is None and max_memory is not None else device)
    started = time.perf_counter()
    if max_memory is not None:
        model = _load_capped(path, act, target, max_memory, verify=verify, progress=progress)
    elif os.path.isdir(path) and native.is_native(path):
        model = _load_native(path, act, target, verify=verify, progress=progress)
    else:
        config, items, total = read_weights(path)
        model = _load_items(config, items, total, act, target, progress)
    model.use_fast_kernels(act == torch.bfloat16 and not exact)
    if head not in ("bf16", "int8", "int4"):
        raise Grok1Error(f"unknown head {head!r}; use bf16, int8 or int4")
    if head != "bf16" and model.fast:
        model.quantize_head(head)
    if model.fast:
        for module in model.modules():
            if isinstance(module, Int4Weight):
                module.prepare()
    model.eval()
    model.load_seconds = time.perf_counter() - started
    return model


def _open_native(path: str, verify: bool, progress: bool) -> tuple[Grok1Config, native.NativeCheckpoint]:
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path}: a native model needs its config.json")
    config = read_config(path)
    ckpt = native.NativeCheckpoint(path)
    problems = ckpt.check_layout(config)
    if verify:
        problems += ckpt.verify_checksums(progress=progress)
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return config, ckpt


def _load_capped(path: str, act: torch.dtype, target: torch.device, max_memory: int | str, verify: bool,
                 progress: bool) -> Grok1:
    from .memory import load_streamed

    if not (os.path.isdir(path) and native.is_native(path)):
        raise Grok1Error(f"{path}: max_memory needs a model in the native format (convert it with `grok1 convert`)")
    config, ckpt = _open_native(path, verify, progress)
    return load_streamed(ckpt, config, act, max_memory, target)


def _place(model: Grok1, path: str, value: Weight, target: torch.device) -> None:
    model.set_weight(path, value.to(target) if target.type != "cpu" else value)


def _load_items(
    config: Grok1Config, items: Iterator[tuple[str, Weight]], total: int, act: torch.dtype, target: torch.device,
    progress: bool,
) -> Grok1:
    model = Grok1(config, activation_dtype=act)
    with tqdm(total=total, desc="loading", unit="tensor", disable=not progress, leave=False) as bar:
        for param_path, value in items:
            if param_path == "language_model/in_out_embed/embeddings" and act == torch.bfloat16:
                # The official code casts the table to the activation dtype before each use; doing it
                # once here is exact and halves its memory.
                value = value.to(torch.bfloat16)
            _place(model, param_path, value, target)
            bar.update(1)
    return model


def _load_native(path: str, act: torch.dtype, target: torch.device, verify: bool, progress: bool) -> Grok1:
    config, ckpt = _open_native(path, verify, progress)
    model = Grok1(config, activation_dtype=act)
    for spec in parameter_specs(config).values():
        if spec.path == "language_model/in_out_embed/embeddings":
            if act == torch.bfloat16:
                # Exact: the official code casts the float32 table to bf16 before use.
                has_bf16 = native.EMBEDDING_BF16 in ckpt.location
                value = ckpt.tensor(native.EMBEDDING_BF16) if has_bf16 else ckpt.tensor(native.EMBEDDING).to(act)
            else:
                value = ckpt.tensor(native.EMBEDDING)
        else:
            value = ckpt.weight(spec)
        _place(model, spec.path, value, target)
    model.checkpoint = ckpt  # keeps the mappings alive with the model
    return model
