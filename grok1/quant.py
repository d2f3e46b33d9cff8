"""Weight storage types. Each holds a projection (or a stack of expert projections) and gives the
matrix the model multiplies with through `dequantize(expert=None)` -> [in, out].

- `Int8Weight`: the release's int8 values with blocked bfloat16 scales, dequantised exactly as the
  official code does: `bf16(float(q) * scale)`, an exact int8->bf16 conversion followed by a bfloat16
  multiply, so the product is rounded to bfloat16 even when activations are float32.
- `Int4Weight`: 4-bit values in groups of 32 along the input with one bfloat16 scale per group (the
  information of GGUF Q4_0).
- `BF16Weight`: plain bfloat16 values.

Storage is output-major ([out, in] per block), the orientation weight-only matmul kernels read; the
release stores input-major ([in, out]) and is transposed when read.

Release scales have the input axis reduced to `blocks` rows: 1 for the column-parallel matrices, 8 for
the two row-parallel ones (attention output, expert down projection), where row block b covers input
rows b*in/blocks .. (b+1)*in/blocks - 1. `Int8Weight` keeps that structure: `qweight` is
[..., blocks, out, in/blocks] and `scales` [..., blocks, out].
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import kernels

INT4_GROUP = 32


class Int8Weight(nn.Module):
    """int8 values [..., blocks, out, in/blocks] with bfloat16 scales [..., blocks, out]."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        if qweight.dtype != torch.int8:
            raise TypeError(f"weight must be int8, got {qweight.dtype}")
        if scales.dtype != torch.bfloat16:
            raise TypeError(f"scales must be bfloat16, got {scales.dtype}")
        if qweight.dim() != scales.dim() + 1 or scales.dim() < 2 or qweight.shape[:-1] != scales.shape:
            raise ValueError(f"blocked weight {tuple(qweight.shape)} and scales {tuple(scales.shape)} do not match")
        self.register_buffer("qweight", qweight, persistent=True)
        self.register_buffer("scales", scales, persistent=True)

    @classmethod
    def from_release(cls, weight: torch.Tensor, scales: torch.Tensor) -> Int8Weight:
        """From the release's layout: weight [..., in, out], scales [..., blocks, out]."""
        if weight.dtype != torch.int8:
            raise TypeError(f"weight must be int8, got {weight.dtype}")
        if weight.dim() != scales.dim() or weight.dim() < 2:
            raise ValueError(f"weight {tuple(weight.shape)} and scales {tuple(scales.shape)} must have the same rank >= 2")
        *lead, k, n = weight.shape
        blocks = scales.shape[-2]
        if blocks == 0 or k % blocks:
            raise ValueError(f"{blocks} scale row blocks do not divide the input size {k}")
        if list(scales.shape[:-2]) != lead or scales.shape[-1] != n:
            raise ValueError(f"scales {tuple(scales.shape)} do not match weight {tuple(weight.shape)}")
        blocked = weight.reshape(*lead, blocks, k // blocks, n).transpose(-1, -2).contiguous()
        return cls(blocked, scales)

    @property
    def blocks(self) -> int:
        return self.qweight.shape[-3]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[-3] * self.qweight.shape[-1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[-2]

    @property
    def weight(self) -> torch.Tensor:
        """The int8 values in the release's layout [..., in, out] (a copy)."""
        *lead, g, n, kb = self.qweight.shape
        return self.qweight.transpose(-1, -2).reshape(*lead, g * kb, n)

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        """The bfloat16 matrix [in, out] the official code multiplies with (one expert's, for a stack)."""
        q = self.qweight if expert is None else self.qweight[expert]
        s = self.scales if expert is None else self.scales[expert]
        *lead, g, n, kb = q.shape
        w = q.to(torch.bfloat16) * s.unsqueeze(-1)  # [.., g, out, in/g], one bf16 rounding
        # Contiguous [in, out]: matmul results depend (in the last bits) on the operand's layout, and
        # every weight type hands the fidelity path the same layout.
        return w.transpose(-1, -2).reshape(*lead, g * kb, n).contiguous()

    def linear(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """Fast path: `x @ W` ([M, in] -> [M, out], x's dtype) with a weight-only int8 kernel that applies
        the scales after accumulation (not the official bf16(q*s) rounding). Blocks are summed in
        float32 and rounded once."""
        if kernels.applies(x):
            return kernels.linear(x, self, expert)
        q = self.qweight if expert is None else self.qweight[expert]
        s = self.scales if expert is None else self.scales[expert]
        g, _, kb = q.shape
        if g == 1:
            return int8_matmul(x.contiguous(), q[0], s[0])
        total = None
        for b in range(g):
            part = int8_matmul(x[:, b * kb : (b + 1) * kb].contiguous(), q[b], s[b]).float()
            total = part if total is None else total + part
        return total.to(x.dtype)

    def extra_repr(self) -> str:
        return f"int8 {tuple(self.qweight.shape)}, scales {tuple(self.scales.shape)} bf16"


class Int4Weight(nn.Module):
    """4-bit values in groups of 32 along the input, one bfloat16 scale per group.

    `packed` is uint8 [..., out, in/32, 16]: byte j of a group holds value j in its low nibble and
    value j+16 in its high nibble, each stored as q+8 (q in -8..7), the Q4_0 arrangement.
    `scales` is bfloat16 [..., out, in/32]. Value = q * scale.
    """

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        if packed.dtype != torch.uint8 or scales.dtype != torch.bfloat16:
            raise TypeError(f"int4 weights are uint8 + bfloat16, got {packed.dtype} + {scales.dtype}")
        if packed.shape[:-1] != scales.shape or packed.shape[-1] != INT4_GROUP // 2:
            raise ValueError(f"packed int4 {tuple(packed.shape)} and scales {tuple(scales.shape)} do not match")
        self.register_buffer("packed", packed, persistent=True)
        self.register_buffer("scales", scales, persistent=True)
        self._kernel_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def in_features(self) -> int:
        return self.packed.shape[-2] * INT4_GROUP

    @property
    def out_features(self) -> int:
        return self.packed.shape[-3]

    def values(self, expert: int | None = None) -> torch.Tensor:
        """int8 values q in -8..7, [..., out, in]."""
        p = self.packed if expert is None else self.packed[expert]
        low = (p & 0x0F).to(torch.int8) - 8
        high = (p >> 4).to(torch.int8) - 8
        q = torch.cat([low, high], dim=-1)  # [..., out, groups, 32]
        return q.reshape(*q.shape[:-2], q.shape[-2] * INT4_GROUP)

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        s = self.scales if expert is None else self.scales[expert]
        q = self.values(expert)
        w = q.view(*q.shape[:-1], -1, INT4_GROUP).float() * s.float().unsqueeze(-1)
        return w.to(torch.bfloat16).reshape(q.shape).transpose(-1, -2).contiguous()

    def _kernel_usable(self, x: torch.Tensor) -> bool:
        kernel = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and self.out_features % 16 == 0
        return kernel and x.device.type == "cpu" and x.dtype == torch.bfloat16

    def _packed_for_kernel(self, expert: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        key = -1 if expert is None else expert
        if key not in self._kernel_cache:
            q = self.values(expert).to(torch.int32) + 8  # [out, in], 0..15
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 2)
            s = self.scales if expert is None else self.scales[expert]  # [out, groups]
            scale_and_zero = torch.stack([s.t(), torch.zeros_like(s.t())], dim=-1).contiguous()
            self._kernel_cache[key] = (packed, scale_and_zero)
        return self._kernel_cache[key]

    def prepare(self) -> None:
        """Packs every expert for the CPU kernel now rather than on first use (load time, not decode)."""
        if self.packed.device.type == "cpu" and self.out_features % 16 == 0:
            for expert in range(self.packed.shape[0]) if self.packed.dim() == 4 else [None]:
                self._packed_for_kernel(expert)

    def linear(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        """Fast path through PyTorch's int4 weight-only kernel (packed for it at load time)."""
        if kernels.applies(x) and kernels.weight_tensors(self) is not None:
            return kernels.linear(x, self, expert)
        if not self._kernel_usable(x):
            return x @ self.dequantize(expert).to(x.dtype)
        packed, scale_and_zero = self._packed_for_kernel(expert)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), packed, INT4_GROUP, scale_and_zero)

    def extra_repr(self) -> str:
        return f"int4 {tuple(self.packed.shape)}, scales {tuple(self.scales.shape)} bf16"


class BF16Weight(nn.Module):
    """Plain bfloat16 values [..., out, in]."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        if weight.dtype != torch.bfloat16:
            raise TypeError(f"weight must be bfloat16, got {weight.dtype}")
        self.register_buffer("weight", weight, persistent=True)

    @property
    def in_features(self) -> int:
        return self.weight.shape[-1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[-2]

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        w = self.weight if expert is None else self.weight[expert]
        return w.transpose(-1, -2).contiguous()

    def linear(self, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
        w = self.weight if expert is None else self.weight[expert]
        return torch.nn.functional.linear(x, w.to(x.dtype))


QuantizedWeight = Int8Weight | Int4Weight | BF16Weight


@contextmanager
def resident(weight: nn.Module, expert: int | None) -> Iterator[tuple[nn.Module, int | None]]:
    """(module, index) holding an expert's weights in memory for the block: the weight itself, or for
    weights read from disk on demand (grok1/memory.py) the expert's module just read."""
    if hasattr(weight, "resident"):
        with weight.resident(expert) as module:
            yield module, 0
    else:
        yield weight, expert


def gelu_tanh(u: torch.Tensor) -> torch.Tensor:
    """jax.nn.gelu's default (approximate=True)."""
    return torch.nn.functional.gelu(u, approximate="tanh")


def geglu(gate: QuantizedWeight, up: QuantizedWeight, x: torch.Tensor, expert: int | None = None) -> torch.Tensor:
    """Fast path: gelu_tanh(x @ W_gate) * (x @ W_up), rounded to x's dtype (the down projection's
    input). Two int8 or int4 matrices at decode sizes are read in one pass by grok1's own kernel."""
    if kernels.applies(x):
        with resident(gate, expert) as (gate_w, index), resident(up, expert) as (up_w, _):
            if kernels.weight_tensors(gate_w) is not None and kernels.weight_tensors(up_w) is not None:
                return kernels.geglu(x, gate_w, up_w, index)
    gate_proj = gate.linear(x, expert).float()
    up_proj = up.linear(x, expert).float()
    return (up_proj * gelu_tanh(gate_proj)).to(x.dtype)

_INT8_KERNEL_FAILED: set[str] = set()


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (q [N, K] int8 * scales [N])^T with PyTorch's weight-only int8 kernel where the
    device has one, else a plain fallback (which converts q to x's dtype for the call)."""
    device = x.device.type
    # The CPU kernel silently computes garbage (or crashes) unless the input size is a multiple of 16.
    if x.shape[-1] % 16 == 0 and device not in _INT8_KERNEL_FAILED and hasattr(torch, "_weight_int8pack_mm"):
        try:
            return torch._weight_int8pack_mm(x, q, scales.to(x.dtype))
        except (RuntimeError, NotImplementedError):
            _INT8_KERNEL_FAILED.add(device)
    return (x @ q.to(x.dtype).t()) * scales.to(x.dtype)


def quantize_int8(w: torch.Tensor, blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output column and per input-row block, the way the release is laid out.

    w is [..., in, out]. scale = bf16(absmax / 127); q = clip(rint(w / scale), -127, 127). Returns
    (q int8 [..., in, out], scales bf16 [..., blocks, out]), the release's layout.
    """
    *lead, k, n = w.shape
    if k % blocks:
        raise ValueError(f"{blocks} row blocks do not divide the input size {k}")
    w32 = w.float().reshape(*lead, blocks, k // blocks, n)
    absmax = w32.abs().amax(dim=-2, keepdim=True)
    scales = (absmax / 127.0).to(torch.bfloat16)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    q = torch.clamp(torch.round(w32 / safe), -127, 127).to(torch.int8)
    return q.reshape(*lead, k, n), scales.squeeze(-2)


def quantize_int4(w_out_in: torch.Tensor) -> Int4Weight:
    """Q4_0's rule per group of 32 inputs: scale = v / -8 where v is the value of largest magnitude,
    q = clamp(round(x / scale), -8, 7). Input [..., out, in] (any float dtype)."""
    *lead, n, k = w_out_in.shape
    if k % INT4_GROUP:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of {INT4_GROUP}")
    x = w_out_in.float().reshape(*lead, n, k // INT4_GROUP, INT4_GROUP)
    index = x.abs().argmax(dim=-1, keepdim=True)
    extreme = torch.gather(x, -1, index)
    scales = (extreme / -8.0).to(torch.bfloat16)
    safe = torch.where(scales == 0, torch.ones_like(scales), scales).float()
    q = torch.clamp(torch.round(x / safe), -8, 7).to(torch.int16) + 8
    packed = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
    return Int4Weight(packed, scales.squeeze(-1))
