"""The release's 8-bit weights: int8 values with bfloat16 scales, dequantised exactly as the official code.

A projection is stored input-major (`x @ w`, w of shape [in, out]); an expert stack adds a leading
expert axis. Scales have the same rank with the input axis reduced to `blocks` rows: 1 for the
column-parallel matrices, 8 for the two row-parallel ones (attention output, expert down
projection), where row block b covers input rows b*in/blocks .. (b+1)*in/blocks - 1.

The official dequantisation is `bf16(float(q) * scale)`: an exact int8->bf16 conversion followed by a
bfloat16 multiply, so the product is rounded to bfloat16 even when activations are float32.
"""

from __future__ import annotations

import torch
from torch import nn


class Int8Weight(nn.Module):
    """An int8 matrix (or stack of expert matrices) with blocked bfloat16 scales."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        if weight.dtype != torch.int8:
            raise TypeError(f"weight must be int8, got {weight.dtype}")
        if scales.dtype != torch.bfloat16:
            raise TypeError(f"scales must be bfloat16, got {scales.dtype}")
        if weight.dim() != scales.dim() or weight.dim() < 2:
            raise ValueError(f"weight {tuple(weight.shape)} and scales {tuple(scales.shape)} must have the same rank >= 2")
        in_features, blocks = weight.shape[-2], scales.shape[-2]
        if blocks == 0 or in_features % blocks:
            raise ValueError(f"{blocks} scale row blocks do not divide the input size {in_features}")
        if scales.shape[:-2] != weight.shape[:-2] or scales.shape[-1] != weight.shape[-1]:
            raise ValueError(f"scales {tuple(scales.shape)} do not match weight {tuple(weight.shape)}")
        self.register_buffer("weight", weight, persistent=True)
        self.register_buffer("scales", scales, persistent=True)

    @property
    def in_features(self) -> int:
        return self.weight.shape[-2]

    @property
    def out_features(self) -> int:
        return self.weight.shape[-1]

    @property
    def blocks(self) -> int:
        return self.scales.shape[-2]

    def dequantize(self, expert: int | None = None) -> torch.Tensor:
        """The bfloat16 matrix [in, out] the official code multiplies with (one expert's, for a stack)."""
        weight = self.weight if expert is None else self.weight[expert]
        scales = self.scales if expert is None else self.scales[expert]
        *lead, k, n = weight.shape
        g = scales.shape[-2]
        blocked = weight.reshape(*lead, g, k // g, n).to(torch.bfloat16) * scales.unsqueeze(-2)
        return blocked.reshape(*lead, k, n)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)} int8, scales={tuple(self.scales.shape)} bf16"


def quantize_int8(w: torch.Tensor, blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output column and per input-row block, the way the release is laid out.

    scale = bf16(absmax / 127); q = clip(rint(w / scale), -127, 127). Returns (q int8, scales bf16)
    with the input axis of the scales reduced to `blocks`.
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
