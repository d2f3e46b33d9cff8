"""Grok-1, the math of xai-org/grok-1's `model.py`, in plain PyTorch.

Section numbers (§) refer to `shared/docs/grok1-architecture.md`. `act` is the activation dtype
(bfloat16 by default, float32 for checking against the official float32 path). The casts written
here are the official code's: they are what makes the float32 path reproduce the official logits
(weights are bf16(q*s), the MoE output and its post-norm are always bf16).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import kernels
from .config import Grok1Config
from .quant import Int4Weight, Int8Weight, geglu, gelu_tanh, quantize_int4

MASKED_LOGIT = -1e30  # the official fill value: a fully masked row softmaxes to uniform weights, not NaN
# Attention is evaluated in query chunks so that the [heads, queries, keys] score tensor stays below this.
ATTENTION_SCORE_BUDGET_BYTES = 256 * 1024 * 1024
KEY_SPAN_STEP = 64

ROW_PARALLEL = ("multi_head_attention/linear", "moe/linear_1")


@functools.lru_cache(maxsize=64)
def scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A Python float the way JAX's weak typing applies it: rounded to the array's dtype first.
    (Made once per value, dtype and device: a decode step uses the same few every time.)"""
    return torch.tensor(value, dtype=dtype, device=device)


@functools.lru_cache(maxsize=16)
def rope_inverse_frequencies(dk: int, base: int, device: torch.device) -> torch.Tensor:
    """§5.2: 1 / base^(2i/dk), float32 [dk/2]."""
    exponents = torch.arange(0, dk, 2, dtype=torch.float32, device=device)
    return 1.0 / (base ** (exponents / dk))


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of the official tree: its path (without `params/`) and logical shape."""

    path: str
    shape: tuple[int, ...]
    quantised: bool

    @property
    def row_parallel(self) -> bool:
        return any(self.path.endswith(p + "/w") for p in ROW_PARALLEL)


def parameter_specs(config: Grok1Config) -> dict[str, ParamSpec]:
    """Every parameter of the model by official path, in numeric layer order."""
    d, e, f = config.emb_size, config.num_experts, config.ffn_size
    specs = [
        ParamSpec("language_model/in_out_embed/embeddings", (config.vocab_size, d), False),
        ParamSpec("language_model/rms_norm/scale", (d,), False),
    ]
    for i in range(config.num_layers):
        prefix = f"transformer/decoder_layer_{i}/"
        specs += [
            ParamSpec(prefix + "moe/linear/w", (e, d, f), True),
            ParamSpec(prefix + "moe/linear_1/w", (e, f, d), True),
            ParamSpec(prefix + "moe/linear_v/w", (e, d, f), True),
            ParamSpec(prefix + "multi_head_attention/key/w", (d, config.kv_proj_size), True),
            ParamSpec(prefix + "multi_head_attention/linear/w", (config.q_proj_size, d), True),
            ParamSpec(prefix + "multi_head_attention/query/w", (d, config.q_proj_size), True),
            ParamSpec(prefix + "multi_head_attention/value/w", (d, config.kv_proj_size), True),
            ParamSpec(prefix + "rms_norm/scale", (d,), False),
            ParamSpec(prefix + "rms_norm_1/scale", (d,), False),
            ParamSpec(prefix + "rms_norm_2/scale", (d,), False),
            ParamSpec(prefix + "rms_norm_3/scale", (d,), False),
            ParamSpec(prefix + "router/w", (d, e), False),
        ]
    return {s.path: s for s in specs}


# ---- building blocks ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """§4: computed in float32, returned in the *input's* dtype; the scale is a plain multiplier."""

    def __init__(self, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.scale: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        mean_squared = x32.square().mean(dim=-1, keepdim=True)
        normed = x32 * torch.rsqrt(mean_squared + self.eps)
        return (self.scale.float() * normed).to(x.dtype)


def project(x: torch.Tensor, w: Int8Weight, fast: bool = False) -> torch.Tensor:
    """`x @ W`. Fidelity path: the bf16-dequantised weight cast to the activation dtype (official
    `Linear`). Fast path: the weight type's own kernel (scales applied after accumulation)."""
    if fast:
        return w.linear(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)
    return x @ w.dequantize().to(x.dtype)


def rope_angles(positions: torch.Tensor, dk: int, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """§5.2: cos and sin of the RoPE angles [B, T, 1, dk] (float32), shared by q and k of every layer."""
    inv_freq = rope_inverse_frequencies(dk, base, positions.device)
    phase = positions.to(torch.float32)[..., None] * inv_freq  # [B, T, dk/2]
    theta = torch.cat([phase, phase], dim=-1)[:, :, None, :]
    return torch.cos(theta), torch.sin(theta)


def rotary(x: torch.Tensor, angles: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """§5.2 RoPE, half-split (rotate_half), over the whole head dim, in float32; x is [B, T, H, dk]."""
    cos, sin = angles
    dk = x.shape[-1]
    x32 = x.float()
    rotated_half = torch.cat([-x32[..., dk // 2 :], x32[..., : dk // 2]], dim=-1)
    return (x32 * cos + rotated_half * sin).to(x.dtype)


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, config: Grok1Config
) -> torch.Tensor:
    """§5.3-5.6. q [B, Tq, Hq, dk]; k, v [B, Hkv, S, dk]; mask [B, Tq, S] (True = visible).

    The soft-cap between the scores and the softmax rules out fused attention kernels, so the score
    tensor is built explicitly, one chunk of queries at a time, to bound its size for long prompts.
    """
    b, tq, hq, dk = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    act = q.dtype
    # Query head h uses kv head h // g (contiguous groups), so heads split as [Hkv, G].
    q = q.view(b, tq, hkv, g, dk).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, Tq, dk]
    k_t = k.transpose(-1, -2)
    out = torch.empty(b, hkv, g, tq, dk, dtype=act, device=q.device)
    chunk = max(1, ATTENTION_SCORE_BUDGET_BYTES // max(1, b * hq * s * 4))
    multiplier, cap = config.attn_output_multiplier, config.attn_logit_softcap
    for start in range(0, tq, chunk):
        stop = min(tq, start + chunk)
        n = stop - start
        q_chunk = q[:, :, :, start:stop].reshape(b, hkv, g * n, dk)
        scores = (q_chunk @ k_t).float().view(b, hkv, g, n, s)  # rounded to act first, as the official einsum
        scores = scores * multiplier
        scores = cap * torch.tanh(scores / cap)
        visible = mask[:, None, None, start:stop, :]
        scores = scores.masked_fill(~visible, MASKED_LOGIT)
        probs = torch.softmax(scores, dim=-1).to(act)
        out[:, :, :, start:stop] = (probs.view(b, hkv, g * n, s) @ v).view(b, hkv, g, n, dk)
    return out.permute(0, 3, 1, 2, 4).reshape(b, tq, hq * dk)


class Attention(nn.Module):
    """§5: GQA with RoPE, logit multiplier, 30*tanh soft-cap; no biases."""

    def __init__(self, config: Grok1Config) -> None:
        super().__init__()
        self.config = config
        self.fast = False  # weight-only kernels instead of the official dequantise-then-matmul
        # Tensor parallelism (grok1/parallel.py): this rank's heads, and the sum of the output
        # projection's partial products over ranks. Without it: all heads, nothing to sum.
        self.num_q_heads = config.num_q_heads
        self.num_kv_heads = config.num_kv_heads
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.query: Int8Weight | None = None
        self.key: Int8Weight | None = None
        self.value: Int8Weight | None = None
        self.linear: Int8Weight | None = None

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        angles: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        cfg = self.config
        b, t, _ = x.shape
        q = project(x, self.query, self.fast).view(b, t, self.num_q_heads, cfg.key_size)
        k = project(x, self.key, self.fast).view(b, t, self.num_kv_heads, cfg.key_size)
        v = project(x, self.value, self.fast).view(b, t, self.num_kv_heads, cfg.value_size)
        q = rotary(q, angles)
        k = rotary(k, angles)
        if kv_cache is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
        else:
            cache_k, cache_v = kv_cache  # [B, Hkv, S_max, dk], keys stored after RoPE
            rows = torch.arange(b, device=x.device)[:, None].expand(b, t)
            cache_k[rows, :, positions] = k.to(cache_k.dtype)
            cache_v[rows, :, positions] = v.to(cache_v.dtype)
            span = mask.shape[-1]
            keys, values = cache_k[:, :, :span], cache_v[:, :, :span]
        attended = attend(q, keys.to(x.dtype), values.to(x.dtype), mask, cfg)
        out = project(attended, self.linear, self.fast)
        return out if self.reduce is None else self.reduce(out)


class MoE(nn.Module):
    """§6: fp32 router softmax, top-k on the probabilities, un-renormalised gates, GeGLU experts.

    Only the experts some token selected are evaluated, each on just the tokens routed to it.
    """

    def __init__(self, config: Grok1Config) -> None:
        super().__init__()
        self.config = config
        self.fast = False
        # Expert parallelism (grok1/parallel.py): the experts this rank holds (its weight stacks start
        # at local_experts.start), and the sum of the gated outputs over ranks.
        self.local_experts = range(config.num_experts)
        self.reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.router: torch.Tensor | None = None  # [D, E] float32
        self.linear: Int8Weight | None = None  # [E, D, F] gate projection (through GELU)
        self.linear_v: Int8Weight | None = None  # [E, D, F] up projection
        self.linear_1: Int8Weight | None = None  # [E, F, D] down projection

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates (raw softmax probabilities) and expert indices [N, k], descending, ties to the lower index."""
        router_logits = x.float() @ self.router.float()
        router_probs = torch.softmax(router_logits, dim=-1)
        probs, experts = torch.sort(router_probs, dim=-1, descending=True, stable=True)
        k = self.config.num_selected_experts
        return probs[:, :k], experts[:, :k]

    def expert_ffn(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """§6.2/6.4: up/gate projections in act, the rest in float32; returns float32."""
        act = x.dtype
        if self.fast:
            # Weight-only kernels take activations in act, so the GeGLU product is rounded to act
            # before the down projection (the fidelity path keeps it in float32).
            hidden = geglu(self.linear, self.linear_v, x, expert)
            return self.linear_1.linear(hidden, expert).float()
        gate_proj = (x @ self.linear.dequantize(expert).to(act)).float()
        up_proj = (x @ self.linear_v.dequantize(expert).to(act)).float()
        hidden = up_proj * gelu_tanh(gate_proj)
        return hidden @ self.linear_1.dequantize(expert).float()

    def group_by_expert(self, experts: torch.Tensor) -> dict[int, tuple[list[int], list[int]]]:
        """(rows, slots) routed to each of this rank's experts. Grouping happens on the host (the one
        sync a MoE layer needs), so each chosen expert runs once on all its tokens. With expert
        parallelism a rank runs only its own experts; the reduce adds the other ranks' shares."""
        groups: dict[int, tuple[list[int], list[int]]] = {}
        for row, chosen in enumerate(experts.tolist()):
            for slot, expert in enumerate(chosen):
                if expert in self.local_experts:
                    rows, slots = groups.setdefault(expert, ([], []))
                    rows.append(row)
                    slots.append(slot)
        for weight in (self.linear, self.linear_v, self.linear_1):
            if hasattr(weight, "prefetch"):  # weights read from disk on demand start reading these now
                weight.prefetch(list(groups))
        return groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        tokens = x.reshape(b * t, d)
        gates, experts = self.route(tokens)
        groups = self.group_by_expert(experts)
        expert_out = torch.zeros(b * t, gates.shape[1], d, dtype=torch.float32, device=x.device)
        for expert, (rows, slots) in groups.items():
            expert_out[rows, slots] = self.expert_ffn(tokens[rows], expert - self.local_experts.start)
        # §6.3: gates rounded to bf16, f32 sum over the selected experts, output always bf16.
        combined = (gates.to(torch.bfloat16).float()[..., None] * expert_out).sum(dim=1)
        if self.reduce is not None:
            combined = self.reduce(combined)  # every rank's experts' share, still float32
        return combined.to(torch.bfloat16).view(b, t, d)


    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Fast decode path (grok1/kernels.py): x bfloat16 [N, D] -> the gated expert sum, float32
        [N, D] (every rank's share). Same steps as `forward`, with the routing, each int8/int4 expert
        and its gated accumulation done in one call each."""
        gates, experts = kernels.route(x, self.router, self.config.num_selected_experts)
        groups = self.group_by_expert(experts)
        gate_rows = gates.tolist()
        out = torch.zeros(x.shape, dtype=torch.float32)
        stacks = [kernels.weight_tensors(w) for w in (self.linear, self.linear_v, self.linear_1)]
        for expert, (rows, slots) in groups.items():
            local = expert - self.local_experts.start
            weights = [gate_rows[r][s] for r, s in zip(rows, slots, strict=True)]
            if None not in stacks:
                kernels.expert_add(x, rows, weights, stacks, local, out)
            else:
                index = torch.tensor(rows)
                gated = torch.tensor(weights)[:, None] * self.expert_ffn(x[index], local)
                out.index_add_(0, index, gated)
        return out if self.reduce is None else self.reduce(out)


class DecoderLayer(nn.Module):
    """§3.4: sandwich norms around attention and the MoE."""

    def __init__(self, config: Grok1Config) -> None:
        super().__init__()
        self.rms_norm = RMSNorm(config.rms_norm_eps)
        self.rms_norm_1 = RMSNorm(config.rms_norm_eps)
        self.rms_norm_2 = RMSNorm(config.rms_norm_eps)
        self.rms_norm_3 = RMSNorm(config.rms_norm_eps)
        self.attn = Attention(config)
        self.moe = MoE(config)

    def forward(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | None,
        angles: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        h = h + self.rms_norm_1(self.attn(self.rms_norm(h), positions, mask, kv_cache, angles))
        # The MoE output is bf16, so its post-norm is bf16 too; in f32 mode the add promotes to f32.
        h = h + self.rms_norm_3(self.moe(self.rms_norm_2(h)))
        return h

    def decode(
        self,
        h: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        key_valid: torch.Tensor,
        span: int,
        angles: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Fast path for one new token per row (h bfloat16 [B, D], positions [B]): the steps of
        `forward`, with the small operations between the matrix products fused (grok1/kernels.py)."""
        attn, moe, eps = self.attn, self.moe, self.rms_norm.eps
        cfg = attn.config
        cos, sin = angles[0].view(h.shape[0], -1), angles[1].view(h.shape[0], -1)
        norms = [self.rms_norm.scale, self.rms_norm_1.scale, self.rms_norm_2.scale]
        projections = [kernels.weight_tensors(w) for w in (attn.query, attn.key, attn.value, attn.linear)]
        if attn.reduce is None and None not in projections:
            # Everything up to the MoE's input in one call (no tensor-parallel sum in between).
            weights = [t for pair in projections for t in pair]
            h, x = kernels.attention_block(h, norms, eps, weights, (cos, sin), kv_cache, positions, key_valid, span,
                                           cfg.attn_output_multiplier, cfg.attn_logit_softcap)
        else:
            x = kernels.rms_norm(h, norms[0], eps)
            q, k, v = attn.query.linear(x), attn.key.linear(x), attn.value.linear(x)
            attended = kernels.attention_decode(q, k, v, cos, sin, *kv_cache, positions, key_valid, span,
                                                cfg.attn_output_multiplier, cfg.attn_logit_softcap)
            out = attn.linear.linear(attended)
            if attn.reduce is not None:
                out = attn.reduce(out)
            h, x = kernels.add_rms_norm(h, out, norms[1], norms[2], eps)
        stacks = [kernels.weight_tensors(w) for w in (moe.linear, moe.linear_v, moe.linear_1)]
        if moe.reduce is None and None not in stacks and len(moe.local_experts) == cfg.num_experts:
            # The whole MoE half in one call: experts in memory, no expert-parallel sum.
            return kernels.moe_block(x, h, moe.router, cfg.num_selected_experts, [t for pair in stacks for t in pair],
                                     self.rms_norm_3.scale, eps)
        h, _ = kernels.add_rms_norm(h, moe.decode(x), self.rms_norm_3.scale, None, eps)
        return h


class KVCache:
    """A static cache: per layer K (after RoPE) and V as [B, Hkv, max_len, dk], plus which slots hold
    real (non-pad) tokens. Each row has its own positions, so rows of different lengths share a batch."""

    def __init__(
        self,
        config: Grok1Config,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        num_kv_heads: int | None = None,  # a tensor-parallel rank's own kv heads
    ) -> None:
        shape = (batch_size, num_kv_heads or config.num_kv_heads, max_len, config.key_size)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.max_len = max_len
        self.batch_size = batch_size

    def reset_rows(self, rows: list[int]) -> None:
        self.key_valid[rows] = False

    def view_rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as a cache that shares this one's memory: a forward through the view
        reads and writes those rows of this cache (used to prefill or decode part of a batch)."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows {start}..{stop - 1} are outside the cache's {self.batch_size} rows")
        view = object.__new__(KVCache)
        view.k = [k[start:stop] for k in self.k]
        view.v = [v[start:stop] for v in self.v]
        view.key_valid = self.key_valid[start:stop]
        view.max_len = self.max_len
        view.batch_size = stop - start
        return view


class Grok1(nn.Module):
    """The language model: embedding, decoder layers, final norm, tied output projection."""

    def __init__(self, config: Grok1Config, activation_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.config = config
        self.activation_dtype = activation_dtype
        self.embeddings: torch.Tensor | None = None  # [V, D], also the output projection
        self.head: Int8Weight | Int4Weight | None = None  # optional quantised table for the fast path's logits
        self.rms_norm = RMSNorm(config.rms_norm_eps)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.vocab_shard = None  # vocab-parallel lookup and logits gather (grok1/parallel.py)
        self.forget_layer_plan()

    # ---- weights -------------------------------------------------------------------------------
    def _slot(self, path: str) -> tuple[nn.Module, str]:
        if path == "language_model/in_out_embed/embeddings":
            return self, "embeddings"
        if path == "language_model/rms_norm/scale":
            return self.rms_norm, "scale"
        prefix, _, rest = path.partition("/decoder_layer_")
        index, _, name = rest.partition("/")
        if prefix != "transformer" or not index.isdigit() or int(index) >= len(self.layers):
            raise KeyError(path)
        layer = self.layers[int(index)]
        table = {
            "rms_norm/scale": (layer.rms_norm, "scale"),
            "rms_norm_1/scale": (layer.rms_norm_1, "scale"),
            "rms_norm_2/scale": (layer.rms_norm_2, "scale"),
            "rms_norm_3/scale": (layer.rms_norm_3, "scale"),
            "router/w": (layer.moe, "router"),
            "moe/linear/w": (layer.moe, "linear"),
            "moe/linear_v/w": (layer.moe, "linear_v"),
            "moe/linear_1/w": (layer.moe, "linear_1"),
            "multi_head_attention/query/w": (layer.attn, "query"),
            "multi_head_attention/key/w": (layer.attn, "key"),
            "multi_head_attention/value/w": (layer.attn, "value"),
            "multi_head_attention/linear/w": (layer.attn, "linear"),
        }
        if name not in table:
            raise KeyError(path)
        return table[name]

    def set_weight(self, path: str, value: torch.Tensor | Int8Weight) -> None:
        """Place one official parameter (path without `params/`)."""
        self.forget_layer_plan()
        module, attr = self._slot(path)
        if isinstance(value, nn.Module):
            setattr(module, attr, value)
        else:
            if attr in module._buffers:
                module._buffers[attr] = value
            else:
                if hasattr(module, attr):
                    delattr(module, attr)
                module.register_buffer(attr, value)

    def missing_weights(self) -> list[str]:
        missing = []
        for path in parameter_specs(self.config):
            module, attr = self._slot(path)
            if getattr(module, attr, None) is None:
                missing.append(path)
        return missing

    def named_official_weights(self) -> Iterator[tuple[str, torch.Tensor | Int8Weight]]:
        for path in parameter_specs(self.config):
            module, attr = self._slot(path)
            yield path, getattr(module, attr)

    @property
    def device(self) -> torch.device:
        return self.embeddings.device

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for this model (for this rank's kv heads when tensor-parallel)."""
        heads = self.layers[0].attn.num_kv_heads if len(self.layers) else None
        return KVCache(self.config, batch_size, max_len, self.activation_dtype, self.device, num_kv_heads=heads)

    @property
    def fast(self) -> bool:
        return self.layers[0].attn.fast if len(self.layers) else False

    def quantize_head(self, kind: str = "int8") -> Grok1:
        """Fast path only: compute the logits from a quantised copy of the tied embedding (lossy):
        int8 with one scale per row (half the bf16 head's bytes per token) or int4 in groups of 32
        (Q4_0's rule, about a quarter)."""
        if kind == "int4":
            self.head = quantize_int4(self.embeddings)
            return self
        table = self.embeddings.float()
        scales = (table.abs().amax(dim=1) / 127.0).clamp_min(1e-12).to(torch.bfloat16)
        q = torch.clamp(torch.round(table / scales.float()[:, None]), -127, 127).to(torch.int8)
        self.head = Int8Weight(q[None], scales[None])
        return self

    def use_fast_kernels(self, enabled: bool = True) -> Grok1:
        """Fast path (weight-only kernels) or fidelity path (the official arithmetic)."""
        for layer in self.layers:
            layer.attn.fast = enabled
            layer.moe.fast = enabled
        self.forget_layer_plan()
        return self

    def forget_layer_plan(self) -> None:
        """Drops the tensors gathered for one-call decoding; anything that replaces a weight or changes
        how layers compute (set_weight, moving the model, tensor/expert parallelism) calls this."""
        self.__dict__["_plan"] = None

    def _layer_plan(self) -> list[list[torch.Tensor]] | None:
        """Per layer, the 19 tensors `kernels.decode_layers` takes; None where some layer cannot run as
        one call (weights read from disk on demand, types without a kernel, a parallel sum between the
        halves). Gathered once, then reused every step until forget_layer_plan()."""
        plan = self.__dict__.get("_plan")
        if plan is None:
            plan = []
            for layer in self.layers:
                attn, moe = layer.attn, layer.moe
                weights = [kernels.weight_tensors(w) for w in (attn.query, attn.key, attn.value, attn.linear,
                                                                moe.linear, moe.linear_v, moe.linear_1)]
                if (None in weights or attn.reduce is not None or moe.reduce is not None
                        or len(moe.local_experts) != self.config.num_experts):
                    plan = False
                    break
                flat = [t for pair in weights for t in pair]
                plan.append([layer.rms_norm.scale, layer.rms_norm_1.scale, layer.rms_norm_2.scale, *flat[:8],
                             moe.router, *flat[8:], layer.rms_norm_3.scale])
            self.__dict__["_plan"] = plan
        return plan or None

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .float() ... replace tensors
        self.forget_layer_plan()
        return super()._apply(fn, *args, **kwargs)

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        start_pos: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float32 logits [B, T, V] for token ids [B, T] (pad id 0 is masked as a key).

        With a `cache`, row b's tokens sit at positions start_pos[b] + 0..T-1: their keys and values
        are written there and they attend to every earlier valid slot of that row.
        With `logits_index` [B], only position logits_index[b] of each row is projected: [B, 1, V].
        """
        cfg, act = self.config, self.activation_dtype
        b, t = tokens.shape
        device = self.embeddings.device
        tokens = tokens.to(device)
        is_token = tokens > cfg.pad_token  # §3.1: only keys are masked by padding
        steps = torch.arange(t, device=device)
        # One new token per row on the fast path: fused CPU steps (grok1/kernels.py) take the cache's
        # validity row and positions directly, so no mask is built.
        fused_decode = (cache is not None and t == 1 and self.fast and act == torch.bfloat16
                        and kernels.serves(b, device))
        if cache is None:
            positions = steps.expand(b, t)
            causal = steps[None, :, None] >= steps[None, None, :]
            mask = is_token[:, None, :] & causal
        else:
            if start_pos is None:
                raise ValueError("a KV cache needs start_pos")
            positions = start_pos.to(device)[:, None] + steps
            last = int(positions.max())
            if last >= cache.max_len:
                raise ValueError(f"position {last} is beyond the KV cache length {cache.max_len}")
            # Attend over a key span rounded up to a multiple of KEY_SPAN_STEP (the extra slots are
            # masked): the score shapes then change every KEY_SPAN_STEP decode steps, not every step,
            # so the CPU matmul libraries reuse their prepared kernels.
            span = min(cache.max_len, -(-(last + 1) // KEY_SPAN_STEP) * KEY_SPAN_STEP)
            rows = torch.arange(b, device=device)[:, None].expand(b, t)
            cache.key_valid[rows, positions] = is_token
            if not fused_decode:
                slots = torch.arange(span, device=device)
                mask = cache.key_valid[:, None, :span] & (slots[None, None, :] <= positions[:, :, None])

        shard = self.vocab_shard
        rows = self.embeddings[tokens] if shard is None else shard.lookup(self.embeddings, tokens)
        h = rows.to(act) * scalar(cfg.embedding_multiplier_scale, act, device)
        angles = rope_angles(positions, cfg.key_size, cfg.rope_base)
        if fused_decode:
            h = h.view(b, -1)
            plan = self._layer_plan()
            if plan is not None:  # every layer in one call
                cos, sin = angles[0].view(b, -1), angles[1].view(b, -1)
                h = kernels.decode_layers(h, plan, cache.k, cache.v, (cos, sin), positions[:, 0], cache.key_valid, span,
                                          cfg.rms_norm_eps, cfg.attn_output_multiplier, cfg.attn_logit_softcap,
                                          cfg.num_selected_experts)
            else:
                for i, layer in enumerate(self.layers):
                    h = layer.decode(h, positions[:, 0], (cache.k[i], cache.v[i]), cache.key_valid, span, angles)
            h = h.view(b, 1, -1)
        else:
            for i, layer in enumerate(self.layers):
                kv = None if cache is None else (cache.k[i], cache.v[i])
                h = layer(h, positions, mask, kv, angles)
        if logits_index is not None and not fused_decode:  # one position per row: nothing to pick
            h = h[torch.arange(b, device=device), logits_index.to(device)][:, None, :]
        y = kernels.rms_norm(h.view(b, -1), self.rms_norm.scale, self.rms_norm.eps).view(b, 1, -1) if fused_decode \
            else self.rms_norm(h)
        if self.head is not None and self.fast and shard is None:
            logits = self.head.linear(y.reshape(-1, y.shape[-1])).view(*y.shape[:-1], -1)
        elif fused_decode and self.embeddings.dtype == torch.bfloat16:
            logits = kernels.bf16_linear(y.view(b, -1), self.embeddings).view(b, 1, -1)
        else:
            logits = y @ self.embeddings.to(act).T
        logits = (logits * scalar(cfg.output_multiplier_scale, act, device)).float()
        return logits if shard is None else shard.gather(logits)


def attention_score_bytes(config: Grok1Config, batch: int, queries: int, keys: int) -> int:
    """Largest score tensor `attend` builds, for tests and planning."""
    row = batch * config.num_q_heads * keys * 4
    chunk = max(1, ATTENTION_SCORE_BUDGET_BYTES // max(1, row))
    return min(queries, chunk) * row


__all__ = ["Grok1", "KVCache", "ParamSpec", "parameter_specs"]
