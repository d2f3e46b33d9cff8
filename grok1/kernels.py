"""grok1's own CPU kernels for the fast decode path (grok1/csrc/cpu_kernels.cpp), built on first use.

A decode step reads each active weight once and does little else, so its speed is set by how close the
weight reads get to the memory's bandwidth and by the fixed cost of every other operation. Two things
stand in the way with library kernels alone:

- The release's int8 matrices with 8 row blocks of scales need 8 calls of a single-scale kernel, and at
  decode sizes each call's fixed cost outweighs its bytes. `linear` reads such a matrix in one pass;
  `geglu` computes an expert's gated projections in one pass over both matrices. int4 weights get the
  same, with llama.cpp's Q4_0 arithmetic (activations as int8 per group of 32), on CPUs with AVX-512
  VNNI.
- The steps between the matrix products (norms, RoPE, the cache write, attention for one query, the
  router, the gated expert sum) are dozens of tiny tensor operations per layer, each costing more in
  dispatch than in arithmetic. `rms_norm`, `add_rms_norm`, `attention_decode`, `route` and
  `expert_add` do each group in one call.

They serve small row counts (decode); prefill goes through PyTorch's kernels, which are faster there.

The extension is compiled for this CPU with the machine's C++ compiler the first time it is needed
(about 20 s, cached by PyTorch under ~/.cache/torch_extensions or $TORCH_EXTENSIONS_DIR). Its vector
code is for x86-64 with AVX2 or AVX-512. Elsewhere (other CPUs, no compiler or OpenMP, a failed build),
or with GROK1_NATIVE_KERNELS=0, everything runs on PyTorch's kernels instead, with the same results up
to float rounding.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

# Decode batches up to this many rows take these kernels; larger ones, and prefill, PyTorch's. At 8 rows
# (a server's default batch) they still win: 8 streams served at 175-181 tok/s against 138-149 through
# PyTorch's kernels (bench/serve_load.py, mid preset, one thread).
MAX_ROWS = 8

_SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"
_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False
_int4 = False  # whether the build has the int4 kernel (AVX-512 VNNI)


def compile_flags() -> list[str]:
    # No FMA contraction: the fused steps then round exactly as the separate tensor operations.
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    return flags


def _build() -> ModuleType | None:
    if os.environ.get("GROK1_NATIVE_KERNELS", "1") == "0" or platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        from torch.utils.cpp_extension import load

        cflags = compile_flags()
        # ninja, which PyTorch builds extensions with, is installed next to this interpreter.
        bindir = os.path.dirname(sys.executable)
        if bindir not in os.environ.get("PATH", "").split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
        module = load(name="grok1_cpu_kernels", sources=[str(_SOURCE)], extra_cflags=cflags, verbose=False)
        # Without AVX2 the loops would be plain scalar code, slower than PyTorch's kernels.
        return module if module.simd() != "none" else None
    except Exception as exc:  # any build or import failure leaves the library kernels in charge
        warnings.warn(f"grok1: native CPU kernels unavailable, using PyTorch's ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''})", stacklevel=3)
        return None


def native() -> ModuleType | None:
    """The compiled kernels, or None where they cannot be built (built once per process)."""
    global _module, _tried, _int4
    if not _tried:
        with _lock:
            if not _tried:
                _module = _build()
                _int4 = _module is not None and _module.has_int4()
                _tried = True
    return _module


def serves(rows: int, device: torch.device) -> bool:
    """Whether these kernels serve a batch of this many rows on this device. Callers check this (or
    `applies`) before the functions below, which then use the built module directly."""
    return device.type == "cpu" and rows <= MAX_ROWS and native() is not None


def applies(x: torch.Tensor) -> bool:
    """`serves` for one matrix product's input [rows, in]."""
    return x.dim() == 2 and serves(x.shape[0], x.device)


def weight_tensors(weight) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values, scales) of a weight these kernels read: int8 (Int8Weight) always, packed int4
    (Int4Weight) where the int4 kernel was built; None for anything else."""
    buffers = weight._buffers  # direct: this runs several times per layer and token
    if "qweight" in buffers:
        return buffers["qweight"], buffers["scales"]
    if "packed" in buffers and native() is not None and _int4:
        return buffers["packed"], buffers["scales"]
    return None


def linear(x: torch.Tensor, weight, expert: int | None = None, float_out: bool = False) -> torch.Tensor:
    """x [M, in] @ W for an int8 or int4 weight (or expert `expert` of a stack of them). int8: float32
    accumulation per scale block, blocks summed in float32. int4: activations quantised to int8 per
    group of 32, exact integer dot products per group, scaled and summed in float32. Result in x's
    dtype (or float32)."""
    values, scales = weight_tensors(weight)
    return _module.linear(x, values, scales, -1 if expert is None else expert, float_out)


def geglu(x: torch.Tensor, gate, up, expert: int | None = None) -> torch.Tensor:
    """gelu_tanh(x @ W_gate) * (x @ W_up) in float32, returned in x's dtype."""
    return _module.geglu(x, *weight_tensors(gate), *weight_tensors(up), -1 if expert is None else expert)


def bf16_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ w.T for bfloat16 w [N, K] (the tied output head): float32 accumulation, bfloat16 result."""
    return _module.bf16_linear(x, w)


def rms_norm(h: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    return _module.rms_norm(h, scale, eps)


def add_rms_norm(h: torch.Tensor, y: torch.Tensor, post_scale: torch.Tensor, next_scale: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + rms_norm(bf16(y), post_scale), rms_norm(that, next_scale)); the second is the first
    when next_scale is None."""
    h_out, x_next = _module.add_rms_norm(h, y, post_scale, next_scale, eps)
    return h_out, x_next


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
                     key_valid: torch.Tensor, span: int, multiplier: float, cap: float) -> torch.Tensor:
    return _module.attention_decode(q, k, v, cos, sin, k_cache, v_cache, positions, key_valid, span,
                                     multiplier, cap)


def route(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate weights [N, k]: the top-k softmax probabilities rounded to bfloat16, as float32;
    experts [N, k]), descending, ties to the lower index."""
    gates, experts = _module.route(x, router, k)
    return gates, experts


def expert_add(x: torch.Tensor, rows: list[int], weights: list[float], stacks: list[tuple[torch.Tensor, torch.Tensor]],
               expert: int, out: torch.Tensor) -> None:
    """out[rows] += weights[:, None] * expert(x[rows]) for one GeGLU expert; `stacks` holds the
    `weight_tensors` of the gate, up and down stacks (int8 or int4)."""
    (gate, gate_scales), (up, up_scales), (down, down_scales) = stacks
    _module.expert_add(x, rows, weights, gate, gate_scales, up, up_scales, down, down_scales, expert, out)


def attention_block(h: torch.Tensor, norms: list[torch.Tensor], eps: float, weights: list[torch.Tensor],
                    angles: tuple[torch.Tensor, torch.Tensor], kv_cache: tuple[torch.Tensor, torch.Tensor],
                    positions: torch.Tensor, key_valid: torch.Tensor, span: int, multiplier: float,
                    cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention half of a decoder layer in one call (the same numbers as the separate steps in
    `DecoderLayer.decode`): returns (h, the MoE's input)."""
    h, x = _module.attention_block(h, norms, eps, weights, *angles, *kv_cache, positions, key_valid, span,
                                   multiplier, cap)
    return h, x


def moe_block(x: torch.Tensor, h: torch.Tensor, router: torch.Tensor, k: int, stacks: list[torch.Tensor],
              post_scale: torch.Tensor, eps: float) -> torch.Tensor:
    """The MoE half of a decoder layer in one call: h + post_norm(the gated expert sum)."""
    return _module.moe_block(x, h, router, k, stacks, post_scale, eps)


def decode_layers(h: torch.Tensor, layers: list[list[torch.Tensor]], k_caches: list[torch.Tensor],
                  v_caches: list[torch.Tensor], angles: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
                  key_valid: torch.Tensor, span: int, eps: float, multiplier: float, cap: float,
                  top_k: int) -> torch.Tensor:
    """Every layer's `attention_block` and `moe_block` in one call (the same numbers)."""
    return _module.decode_layers(h, layers, k_caches, v_caches, *angles, positions, key_valid, span, eps, multiplier,
                                 cap, top_k)
