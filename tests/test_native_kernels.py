"""grok1's own CPU kernels for the fast decode path (grok1/kernels.py) against the tensor operations
they replace, and the fused decode step against the official fixture."""

from __future__ import annotations

import platform
import shutil

import numpy as np
import pytest
import torch

import grok1
from conftest import FIXTURE, relative_error
from grok1 import kernels
from grok1.config import PRESETS
from grok1.model import Grok1, MoE, RMSNorm, attend, rope_angles, rotary
from grok1.quant import Int8Weight, geglu, quantize_int4, quantize_int8


def test_kernels_build_here():
    # Where they apply (x86-64 Linux with AVX2 and a compiler) the fast decode path must not silently
    # fall back to the slower one.
    flags = open("/proc/cpuinfo").read() if platform.system() == "Linux" else ""
    if platform.machine() == "x86_64" and " avx2" in flags and shutil.which("c++"):
        assert kernels.native() is not None
        assert kernels.native().simd() in ("avx2", "avx512")


needs_native = pytest.mark.skipif(kernels.native() is None, reason="no C++ compiler for grok1's CPU kernels")


def stack(experts: int, in_features: int, out_features: int, blocks: int, seed: int) -> Int8Weight:
    gen = torch.Generator().manual_seed(seed)
    return Int8Weight.from_release(*quantize_int8(torch.randn(experts, in_features, out_features, generator=gen), blocks))


@needs_native
@pytest.mark.parametrize("in_features,blocks", [(256, 1), (256, 8), (688, 8), (344, 1), (96, 1)])
@pytest.mark.parametrize("rows", [1, 3])
def test_int8_linear_matches_dequantised_matmul(in_features, blocks, rows):
    weight = stack(3, in_features, 80, blocks, in_features + blocks)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows)).bfloat16()
    for expert in range(3):
        reference = x.float() @ weight.dequantize(expert).float()
        exact_weights = x.float() @ (weight.qweight[expert].float() * weight.scales[expert].float()[..., None]
                                     ).transpose(-1, -2).reshape(in_features, 80)
        out = kernels.linear(x, weight, expert, float_out=True)
        assert out.dtype == torch.float32 and out.shape == (rows, 80)
        assert relative_error(out, exact_weights) < 1e-5  # scales applied after accumulation, in float32
        assert relative_error(out, reference) < 5e-3  # vs the official bf16(q*s) weights
        assert torch.equal(weight.linear(x, expert), out.bfloat16())  # Int8Weight routes decode rows here


@needs_native
def test_int8_geglu_matches_the_separate_steps():
    gate, up = stack(2, 256, 96, 1, 1), stack(2, 256, 96, 1, 2)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    for expert in range(2):
        g = kernels.linear(x, gate, expert, float_out=True)
        u = kernels.linear(x, up, expert, float_out=True)
        reference = (torch.nn.functional.gelu(g, approximate="tanh") * u).bfloat16()
        fused = geglu(gate, up, x, expert)
        assert fused.dtype == torch.bfloat16
        assert relative_error(fused.float(), reference.float()) < 4e-3


@needs_native
def test_bf16_linear_matches_matmul():
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(300, 128, generator=gen).bfloat16()
    x = torch.randn(2, 128, generator=gen).bfloat16()
    out = kernels.bf16_linear(x, w)
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), x.float() @ w.float().T) < 4e-3


@needs_native
def test_norms_match_rmsnorm():
    gen = torch.Generator().manual_seed(7)
    h = (torch.randn(3, 128, generator=gen) * 5).bfloat16()
    y = torch.randn(3, 128, generator=gen).bfloat16()
    pre, post = RMSNorm(1e-5), RMSNorm(1e-5)
    pre.scale = torch.rand(128, generator=gen) + 0.5
    post.scale = torch.rand(128, generator=gen) + 1.5
    ulp = 2.0**-7  # one bf16 step relative to the value

    def close(a, b):
        return torch.all((a.float() - b.float()).abs() <= ulp * b.float().abs() + 1e-6)

    assert close(kernels.rms_norm(h, pre.scale, 1e-5), pre(h))
    summed, normed = kernels.add_rms_norm(h, y, post.scale, pre.scale, 1e-5)
    expected = h + post(y)
    assert close(summed, expected) and close(normed, pre(expected))
    only, same = kernels.add_rms_norm(h, y.float(), post.scale, None, 1e-5)
    assert torch.equal(only, same) and close(only, expected)


@needs_native
def test_route_matches_the_model():
    cfg = PRESETS["tiny"]
    moe = MoE(cfg)
    gen = torch.Generator().manual_seed(3)
    moe.router = torch.randn(cfg.emb_size, cfg.num_experts, generator=gen) * 0.3
    x = torch.randn(4, cfg.emb_size, generator=gen).bfloat16()
    gates, experts = kernels.route(x, moe.router, cfg.num_selected_experts)
    ref_gates, ref_experts = moe.route(x)
    assert torch.equal(experts, ref_experts)
    assert torch.allclose(gates, ref_gates.bfloat16().float(), rtol=0, atol=2e-3 * ref_gates.max().item())


@needs_native
def test_attention_decode_matches_the_model():
    cfg = PRESETS["tiny"]
    b, hq, hkv, dk, slots = 3, cfg.num_q_heads, cfg.num_kv_heads, cfg.key_size, 40
    gen = torch.Generator().manual_seed(11)
    positions = torch.tensor([5, 17, 0])
    k_cache = torch.randn(b, hkv, slots, dk, generator=gen).bfloat16()
    v_cache = torch.randn(b, hkv, slots, dk, generator=gen).bfloat16()
    key_valid = torch.rand(b, slots, generator=gen) > 0.3
    key_valid[torch.arange(b), positions] = True
    key_valid[2] = False  # a row whose only key is a pad: a fully masked softmax (uniform weights)
    q = (torch.randn(b, hq * dk, generator=gen) * 4).bfloat16()
    k = torch.randn(b, hkv * dk, generator=gen).bfloat16()
    v = torch.randn(b, hkv * dk, generator=gen).bfloat16()
    span = 32
    cos, sin = rope_angles(positions[:, None], dk, cfg.rope_base)

    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    angles = (cos, sin)
    q_rot = rotary(q.view(b, 1, hq, dk), angles)
    k_rot = rotary(k.view(b, 1, hkv, dk), angles)
    ref_k[torch.arange(b), :, positions] = k_rot[:, 0]
    ref_v[torch.arange(b), :, positions] = v.view(b, hkv, dk)
    mask = key_valid[:, None, :span] & (torch.arange(span)[None, None, :] <= positions[:, None, None])
    reference = attend(q_rot, ref_k[:, :, :span], ref_v[:, :, :span], mask, cfg).view(b, -1)

    out = kernels.attention_decode(q, k, v, cos.view(b, dk), sin.view(b, dk), k_cache, v_cache, positions,
                                   key_valid, span, cfg.attn_output_multiplier, cfg.attn_logit_softcap)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)  # RoPE'd keys written bit-exactly
    assert relative_error(out.float(), reference.float()) < 1e-2
    assert torch.allclose(out[2].float(), ref_v[2, :, :span].float().mean(dim=1).repeat_interleave(hq // hkv, 0).reshape(-1),
                          atol=2e-2)


@needs_native
def test_expert_add_matches_the_separate_steps():
    gate, up, down = stack(4, 128, 64, 1, 1), stack(4, 128, 64, 1, 2), stack(4, 64, 128, 8, 3)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    rows, weights = [0, 2], [0.25, 0.625]
    out = torch.zeros(3, 128)
    kernels.expert_add(x, rows, weights, [kernels.weight_tensors(w) for w in (gate, up, down)], 1, out)
    hidden = geglu(gate, up, x[rows], 1)
    expected = torch.zeros(3, 128)
    expected.index_add_(0, torch.tensor(rows), torch.tensor(weights)[:, None] * down.linear(hidden, 1).float())
    assert torch.equal(out, expected)  # the memory-capped model takes the separate steps: same numbers


@needs_native
def test_fused_decode_on_the_official_fixture(fixture_cases, fixture_arrays, monkeypatch):
    """Token-by-token decoding through the fused steps against xAI's bf16 logits, with the core bound."""
    model = grok1.load(FIXTURE)
    steps_in_one_call = []
    original = kernels.decode_layers
    monkeypatch.setattr(kernels, "decode_layers", lambda *a: steps_in_one_call.append(1) or original(*a))
    for name in ("len64", "left_padded_len20"):
        case = next(c for c in fixture_cases if c["name"] == name)
        tokens = torch.from_numpy(fixture_arrays[case["tokens_key"]].astype(np.int64))
        ref16, ref32 = fixture_arrays[case["logits_bf16_key"]][0], fixture_arrays[case["logits_f32_key"]][0]
        cache = model.new_cache(1, tokens.shape[1])
        with torch.no_grad():
            first = model(tokens[:, :1], cache, torch.tensor([0]))
            steps = [model(tokens[:, i : i + 1], cache, torch.tensor([i])) for i in range(1, tokens.shape[1])]
        ours = torch.cat([first] + steps, dim=1)[0].numpy()
        # A pad query with no earlier real key attends uniformly to every key slot there is: the whole
        # sequence in a full forward, the cache so far when decoding. Only real tokens are compared.
        real = tokens[0].numpy() != 0
        ours, ref16, ref32 = ours[real], ref16[real], ref32[real]
        error, bound = np.abs(ours - ref16).mean(), 2 * np.abs(ref16 - ref32).mean()
        print(f"{name}: mean |fused decode - official bf16| {error:.4f}, bound {bound:.4f}, "
              f"argmax agreement {(ours.argmax(-1) == ref16.argmax(-1)).mean():.3f}")
        assert error <= bound, name
        assert (ours.argmax(-1) == ref16.argmax(-1)).mean() >= 0.9, name
    assert len(steps_in_one_call) == 64 + 20  # every token went through the fused steps


needs_int4 = pytest.mark.skipif(kernels.native() is None or not kernels.native().has_int4(),
                                reason="grok1's int4 kernel needs AVX-512 VNNI")


@needs_int4
@pytest.mark.parametrize("in_features", [128, 96, 2816])  # 96 = 3 groups: the scalar tail alone
@pytest.mark.parametrize("rows", [1, 4])
def test_int4_linear_matches_dequantised_matmul(in_features, rows):
    gen = torch.Generator().manual_seed(in_features + rows)
    weight = quantize_int4(torch.randn(2, 48, in_features, generator=gen))
    x = torch.randn(rows, in_features, generator=gen).bfloat16()
    for expert in range(2):
        reference = x.float() @ weight.dequantize(expert).float()
        out = kernels.linear(x, weight, expert, float_out=True)
        # Activations as int8 per group of 32 (llama.cpp's Q8_0): about 0.3 % of the result.
        assert relative_error(out, reference) < 1e-2
        assert torch.equal(weight.linear(x, expert), out.bfloat16())


@needs_int4
def test_int4_expert_add_matches_the_separate_steps():
    gen = torch.Generator().manual_seed(9)
    gate, up = quantize_int4(torch.randn(3, 64, 128, generator=gen)), quantize_int4(torch.randn(3, 64, 128, generator=gen))
    down = quantize_int4(torch.randn(3, 128, 64, generator=gen))
    x = torch.randn(2, 128, generator=gen).bfloat16()
    out = torch.zeros(2, 128)
    kernels.expert_add(x, [1], [0.5], [kernels.weight_tensors(w) for w in (gate, up, down)], 2, out)
    hidden = geglu(gate, up, x[[1]], 2)
    expected = torch.zeros(2, 128)
    expected[1] = 0.5 * down.linear(hidden, 2).float()[0]
    assert torch.equal(out, expected)
    reference = torch.nn.functional.gelu(x[[1]].float() @ gate.dequantize(2).float(), approximate="tanh") * (
        x[[1]].float() @ up.dequantize(2).float())
    assert relative_error(hidden.float(), reference) < 2e-2


@needs_native
@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_layer_blocks_equal_the_separate_calls(quant, tmp_path):
    """The one-call attention and MoE halves against the step-by-step path (taken when a parallel sum
    sits in between: an identity sum here), bit for bit."""
    if quant == "int4" and not kernels.native().has_int4():
        pytest.skip("no int4 kernel on this CPU")
    from grok1.config import Grok1Config
    from grok1.convert import convert_to_native
    from grok1.synth import write_release

    path = FIXTURE
    if quant == "int4":  # the fixture's expert size (688) is no multiple of int4's groups of 32
        config = Grok1Config(name="small", vocab_size=512, sequence_len=64, emb_size=128, key_size=32, num_q_heads=4,
                             num_kv_heads=2, num_layers=2, widening_factor=3.0, num_experts=4, num_selected_experts=2)
        write_release(tmp_path / "rel", config, seed=2, progress=False)
        path = tmp_path / "int4"
        convert_to_native(tmp_path / "rel", path, quant="int4", progress=False)
    blocks, steps = grok1.load(path), grok1.load(path)
    for layer in steps.layers:
        layer.attn.reduce = layer.moe.reduce = lambda t: t
    tokens = torch.tensor([[5, 9, 300, 41, 7, 77, 12, 3]])
    outs = []
    for model in (blocks, steps):
        cache = model.new_cache(1, 16)
        with torch.no_grad():
            model(tokens[:, :4], cache, torch.tensor([0]))
            outs.append(torch.cat([model(tokens[:, i : i + 1], cache, torch.tensor([i])) for i in range(4, 8)], dim=1))
    assert torch.equal(outs[0], outs[1])


@needs_native
def test_one_call_step_equals_layer_by_layer(monkeypatch):
    """kernels.decode_layers (every layer in one call, with the gathered plan) against the layer-by-layer
    calls, bit for bit; and the plan follows a replaced weight."""
    tokens = torch.tensor([[5, 9, 300, 41, 7, 77, 12, 3]])

    def decode(model):
        cache = model.new_cache(1, 16)
        with torch.no_grad():
            model(tokens[:, :4], cache, torch.tensor([0]))
            return torch.cat([model(tokens[:, i : i + 1], cache, torch.tensor([i])) for i in range(4, 8)], dim=1)

    one_call = decode(grok1.load(FIXTURE))
    with monkeypatch.context() as patch:
        patch.setattr(Grok1, "_layer_plan", lambda self: None)
        layer_by_layer = decode(grok1.load(FIXTURE))
    assert torch.equal(one_call, layer_by_layer)

    model = grok1.load(FIXTURE)
    before = decode(model)
    path = "transformer/decoder_layer_0/multi_head_attention/query/w"
    query = model.layers[0].attn.query
    model.set_weight(path, Int8Weight(query.qweight.clone(), query.scales * 2))
    assert not torch.equal(decode(model), before)  # the new weight is used, not the gathered old one
