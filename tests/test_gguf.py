"""GGUF: grok1's export run by llama.cpp (llama-cpp-python), GGUF files run by grok1, bad files refused.

Figures are printed (`pytest -s tests/test_gguf.py`); docs/gguf.md records them.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import subprocess
import sys

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
from llama_cpp import _internals as llama_internals

import grok1
from conftest import TOKENIZER_DIR, relative_error, top2_margin
from grok1 import cli
from grok1.config import PRESETS, Grok1Config
from grok1.errors import CheckpointError, Grok1Error
from grok1.formats import gguf as G
from grok1.loader import read_weights
from grok1.synth import random_model, train_demo_tokenizer, write_release
from grok1.tokenizer import Tokenizer

TINY = PRESETS["tiny"]  # emb 256 = 8 query heads x 32 (llama.cpp needs heads x head dim = emb), 8 experts top-2
PROMPT_LENGTHS = (5, 17, 40)
NEW_TOKENS = 24
QT = gguf.GGMLQuantizationType


# ---- fixtures and helpers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


@pytest.fixture(scope="module")
def release(work):
    return write_release(work / "tiny", TINY, seed=3, progress=False)


@pytest.fixture(scope="module")
def reference(release):
    """grok1's own float32 path on the release-format model."""
    return grok1.load(release, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def f32_file(release, work):
    dst = work / "tiny-f32.gguf"
    proc = run_cli("convert", str(release), str(dst), "--quant", "f32", "--quiet")
    assert "placeholder vocabulary" in proc.stdout
    return dst


@pytest.fixture(scope="module")
def q8_file(release, work):
    return export(release, work / "tiny-q8_0.gguf", "q8_0")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(1, TINY.vocab_size, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]  # no pad id 0


def export(src, dst, quant: str, **kwargs) -> str:
    config, weights, _ = read_weights(src)
    G.write_gguf(weights, config, dst, quant=quant, progress=False, **kwargs)
    return dst


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "grok1", *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def llama(path, **kwargs) -> llama_cpp.Llama:
    """llama.cpp with an f32 KV cache and logits at every position."""
    return llama_cpp.Llama(
        str(path), n_ctx=128, n_batch=128, logits_all=True, type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32, n_threads=2, verbose=False, **kwargs,
    )


def llama_logits(llm: llama_cpp.Llama, tokens: list[int]) -> torch.Tensor:
    llm.reset()
    llm.eval(tokens)
    return torch.from_numpy(np.array(llm.scores[: len(tokens)], dtype=np.float32))


def llama_greedy(llm: llama_cpp.Llama, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval(out[-1:])
    return out


@torch.no_grad()
def grok1_logits(model, tokens: list[int]) -> torch.Tensor:
    return model(torch.tensor([tokens]))[0]


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """Mean KL(P || Q) over positions."""
    p, q = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


class _GGMLTensor(ctypes.Structure):
    """The head of ggml's `struct ggml_tensor` (ggml.h of the vendored llama.cpp), up to its name."""

    _fields_ = [
        ("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
    ]


@contextlib.contextmanager
def llama_routing(monkeypatch):
    """Records llama.cpp's chosen experts (its `ffn_moe_topk-<layer>` tensors) through the scheduler's
    eval callback: yields {layer: [int32 [tokens, k] per decode call]}."""
    seen: dict[int, list[np.ndarray]] = {}

    @llama_cpp.ggml_backend_sched_eval_callback
    def observe(pointer, ask, _user):
        t = ctypes.cast(pointer, ctypes.POINTER(_GGMLTensor)).contents
        name = t.name.decode()
        if not name.startswith("ffn_moe_topk-"):
            return not ask
        if not ask:
            k, n = t.ne[0], t.ne[1]
            chosen = [[ctypes.c_int32.from_address(t.data + i * t.nb[0] + j * t.nb[1]).value for i in range(k)]
                      for j in range(n)]
            seen.setdefault(int(name.rsplit("-", 1)[1]), []).append(np.array(chosen))
        return True

    original = llama_internals.LlamaContext.__init__

    def with_callback(self, *, model, params, verbose=True):
        params.cb_eval = observe
        original(self, model=model, params=params, verbose=verbose)

    monkeypatch.setattr(llama_internals.LlamaContext, "__init__", with_callback)
    try:
        yield seen
    finally:
        monkeypatch.undo()


@contextlib.contextmanager
def grok1_routing(model):
    """grok1's chosen experts per layer for each forward: {layer: [int64 [tokens, k]]}."""
    seen: dict[int, list[np.ndarray]] = {}
    handles = []
    for i, layer in enumerate(model.layers):
        def record(module, args, _out, i=i):
            _, experts = module.route(args[0].reshape(-1, args[0].shape[-1]))
            seen.setdefault(i, []).append(experts.numpy())
        handles.append(layer.moe.register_forward_hook(record))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def routing_differences(ours: dict, theirs: dict) -> list[float]:
    """Per layer, the share of positions whose set of chosen experts differs."""
    shares = []
    for layer in sorted(ours):
        a = np.sort(np.concatenate(ours[layer]), -1)
        b = np.sort(np.concatenate(theirs[layer]), -1)
        shares.append(float((a != b).any(-1).mean()))
    return shares


# ---- layout and metadata -------------------------------------------------------------------------


def test_file_layout_and_metadata(f32_file, release):
    reader = gguf.GGUFReader(f32_file)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith(("GGUF.", "tokenizer.ggml.tokens",
                                                                                    "tokenizer.ggml.scores", "tokenizer.ggml.token_type"))}
    assert meta["general.architecture"] == "grok"
    expected = {
        "grok.embedding_length": 256, "grok.block_count": 2, "grok.feed_forward_length": TINY.ffn_size,
        "grok.expert_count": 8, "grok.expert_used_count": 2, "grok.attention.head_count": 8,
        "grok.attention.head_count_kv": 2, "grok.attention.key_length": 32, "grok.rope.dimension_count": 32,
        "grok.context_length": TINY.sequence_len, "tokenizer.ggml.model": "llama", "tokenizer.ggml.add_bos_token": False,
        G.PLACEHOLDER_KEY: True,
    }
    assert {k: meta[k] for k in expected} == expected
    for key, value in [("grok.embedding_scale", TINY.embedding_multiplier_scale), ("grok.logit_scale", TINY.output_multiplier_scale),
                       ("grok.attention.output_scale", TINY.attn_output_multiplier), ("grok.attn_logit_softcapping", 30.0),
                       ("grok.attention.layer_norm_rms_epsilon", 1e-5)]:
        assert meta[key] == np.float32(value), key
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == TINY.vocab_size and tokens[:3] == ["[PAD]", "[BOS]", "[EOS]"] and tokens[3] == "[PLACEHOLDER_3]"

    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == 2 + 12 * TINY.num_layers
    d, f, e, kv = 256, TINY.ffn_size, 8, 64
    ne = {"token_embd.weight": [d, 512], "output_norm.weight": [d], "blk.1.attn_q.weight": [d, d],
          "blk.1.attn_k.weight": [d, kv], "blk.1.attn_output.weight": [d, d], "blk.1.ffn_gate_inp.weight": [d, e],
          "blk.1.ffn_gate_exps.weight": [d, f, e], "blk.1.ffn_up_exps.weight": [d, f, e],
          "blk.1.ffn_down_exps.weight": [f, d, e], "blk.1.layer_output_norm.weight": [d]}
    assert {n: tensors[n].shape.tolist() for n in ne} == ne
    assert {t.tensor_type for t in tensors.values()} == {QT.F32}

    # Values: bf16(int8 * scale), transposed to [out, in]; vectors and the embedding table as they are.
    official = dict((p, v) for p, v in read_weights(release)[1])
    gate = official["transformer/decoder_layer_1/moe/linear/w"]
    assert np.array_equal(tensors["blk.1.ffn_gate_exps.weight"].data, gate.dequantize().float().transpose(1, 2).numpy())
    query = official["transformer/decoder_layer_1/multi_head_attention/query/w"]
    assert np.array_equal(tensors["blk.1.attn_q.weight"].data, query.dequantize().float().T.numpy())
    assert np.array_equal(tensors["token_embd.weight"].data, official["language_model/in_out_embed/embeddings"].numpy())
    assert np.array_equal(tensors["blk.1.ffn_gate_inp.weight"].data, official["transformer/decoder_layer_1/router/w"].T.numpy())


def test_quantised_exports_keep_vectors_f32_and_fall_back_for_partial_blocks(q8_file):
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(q8_file).tensors}
    assert types["blk.0.attn_norm.weight"] == types["blk.0.ffn_gate_inp.weight"] == QT.F32
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up_exps.weight"] == types["token_embd.weight"] == QT.Q8_0
    # ffn_down's rows are the FFN width, 344: not whole blocks of 32, so F16 as llama.cpp's quantizer does.
    assert TINY.ffn_size % 32 and types["blk.0.ffn_down_exps.weight"] == QT.F16


# ---- llama.cpp runs grok1's export --------------------------------------------------------------


def test_llama_cpp_runs_f32_export_like_grok1(f32_file, reference, prompts, monkeypatch):
    with llama_routing(monkeypatch) as theirs:
        llm = llama(f32_file)
        for prompt in prompts:
            ours_seq = prompt + grok1.generate(reference, prompt, max_new_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
            theirs.clear()
            with grok1_routing(reference) as ours:
                expected = grok1_logits(reference, ours_seq)
            got = llama_logits(llm, ours_seq)
            rel = relative_error(got, expected)
            agree = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
            flips = routing_differences(ours, theirs)
            same_route = np.all([np.sort(np.concatenate(ours[i]), -1) == np.sort(np.concatenate(theirs[i]), -1)
                                 for i in ours], axis=(0, 2))
            rel_same_route = relative_error(got[same_route], expected[same_route])
            # Greedy continuations agree up to the first step where grok1's top-2 margin is below 0.1.
            margins = top2_margin(expected[len(prompt) - 1 : -1])
            close = [i for i, m in enumerate(margins.tolist()) if m < 0.1]
            steps = close[0] if close else NEW_TOKENS
            greedy = llama_greedy(llm, prompt, NEW_TOKENS)
            print(f"f32 prompt {len(prompt)}+{NEW_TOKENS}: rel {rel:.2e} ({rel_same_route:.2e} where the experts agree), "
                  f"argmax {agree:.3f}, routing differs {flips}, greedy checked for {steps}/{NEW_TOKENS} steps "
                  f"(margin), all {NEW_TOKENS} equal: {greedy == ours_seq[len(prompt):]}")
            assert rel <= 1e-2 and agree >= 0.98
            # Only near-tied expert choices differ (grok1's MoE output is bf16, as the official code's).
            assert rel_same_route <= 5e-3 and max(flips) <= 0.05
            assert greedy[:steps] == ours_seq[len(prompt) : len(prompt) + steps]


def test_llama_cpp_runs_q8_0_export(q8_file, reference, prompts, monkeypatch):
    """Q8_0 quantises the weights and llama.cpp also quantises activations to Q8_0 for those matmuls:
    expert choices with small margins flip, and a flipped choice changes that position's output."""
    with llama_routing(monkeypatch) as theirs:
        llm = llama(q8_file)
        rels, flips = [], []
        for prompt in prompts:
            theirs.clear()
            with grok1_routing(reference) as ours:
                expected = grok1_logits(reference, prompt)
            got = llama_logits(llm, prompt)
            rels.append(relative_error(got, expected))
            flips.append(routing_differences(ours, theirs))
    print(f"q8_0 vs grok1 float32: rel {[f'{r:.3f}' for r in rels]}, routing differs per layer {flips}")
    assert rels[0] < 0.1  # the 5-token prompt: few positions, routing intact
    assert all(r < 0.5 for r in rels)


# ---- grok1 runs GGUF files ------------------------------------------------------------------------


def test_f32_round_trip_is_bit_identical(f32_file, reference, prompts):
    model = grok1.load(f32_file, dtype="float32", device="cpu")
    assert model.config == reference.config
    for prompt in prompts:
        assert torch.equal(grok1_logits(model, prompt), grok1_logits(reference, prompt))
    assert isinstance(model.layers[0].moe.linear, G.GGUFWeight)


def test_cli_generates_from_gguf(f32_file, reference, prompts):
    ids = ",".join(map(str, prompts[0]))
    out = json.loads(run_cli("generate", "--model", str(f32_file), "--token-ids", ids, "--max-new-tokens", "8",
                             "--temperature", "0", "--dtype", "float32", "--ignore-eos", "--json", "--device", "cpu").stdout)
    assert out["token_ids"] == grok1.generate(reference, prompts[0], max_new_tokens=8, temperature=0, ignore_eos=True)


def test_f32_round_trip_bfloat16_path(f32_file, release, prompts):
    # The exact (fidelity) bf16 arithmetic on both: GGUF weights have no weight-only kernel path.
    ours, theirs = grok1.load(f32_file, device="cpu", exact=True), grok1.load(release, device="cpu", exact=True)
    assert torch.equal(grok1_logits(ours, prompts[1]), grok1_logits(theirs, prompts[1]))


def test_q8_0_round_trip(q8_file, reference, prompts):
    model = grok1.load(q8_file, dtype="float32", device="cpu")
    weights = dict(read_weights(q8_file)[1])
    for path, original in reference.named_official_weights():
        if path.endswith("/w") and "router" not in path:
            assert relative_error(weights[path].dequantize(), original.dequantize().float()) < 0.01, path
    kls, top1, flips = [], [], []
    for prompt in prompts:
        with grok1_routing(model) as ours, grok1_routing(reference) as theirs:
            got, expected = grok1_logits(model, prompt), grok1_logits(reference, prompt)
        kls.append(kl_divergence(expected, got))
        top1.append(float((got.argmax(-1) == expected.argmax(-1)).float().mean()))
        flips.append(routing_differences(ours, theirs))
    print(f"q8_0 round trip: mean KL {np.mean(kls):.4f} ({[round(k, 4) for k in kls]}), top-1 {[round(t, 3) for t in top1]}, "
          f"routing differs per layer {flips}")
    assert np.mean(kls) < 0.2 and np.mean(top1) > 0.6


def independent_gguf(path, config: Grok1Config, seed: int = 5) -> None:
    """A `grok` GGUF written with the gguf package's GGUFWriter straight from GROK_GGUF.md's tables
    (not grok1's exporter), with the alternative name post_ffw_norm in the last layer. The matrices
    are F32 and the embedding F16: llama.cpp rounds activations to a weight's type before each matmul,
    which flips near-tied expert choices for F16/BF16 layer weights, but not after the last layer."""
    model = random_model(config, seed=seed, dtype=torch.float32)
    w = dict(model.named_official_weights())

    def matrix(path):  # official [.., in, out] -> llama.cpp's [.., out, in]
        value = w[path]
        value = value.dequantize().float() if hasattr(value, "dequantize") else value.float()
        return value.transpose(-1, -2).contiguous().numpy()

    writer = gguf.GGUFWriter(str(path), "grok")
    writer.add_context_length(config.sequence_len)
    writer.add_embedding_length(config.emb_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.ffn_size)
    writer.add_head_count(config.num_q_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_selected_experts)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_embedding_scale(config.embedding_multiplier_scale)
    writer.add_logit_scale(config.output_multiplier_scale)
    writer.add_attn_output_scale(config.attn_output_multiplier)
    writer.add_attn_logit_softcapping(30.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"t{i}" for i in range(config.vocab_size)])
    writer.add_token_scores([0.0] * config.vocab_size)
    writer.add_token_types([1] * config.vocab_size)
    writer.add_tensor("token_embd.weight", w["language_model/in_out_embed/embeddings"].numpy().astype(np.float16))
    writer.add_tensor("output_norm.weight", w["language_model/rms_norm/scale"].numpy())
    for i in range(config.num_layers):
        p, b = f"transformer/decoder_layer_{i}/", f"blk.{i}."
        post = "post_ffw_norm" if i == config.num_layers - 1 else "layer_output_norm"
        for name, key in [("attn_norm", "rms_norm/scale"), ("attn_output_norm", "rms_norm_1/scale"),
                          ("ffn_norm", "rms_norm_2/scale"), (post, "rms_norm_3/scale")]:
            writer.add_tensor(b + name + ".weight", w[p + key].numpy())
        writer.add_tensor(b + "ffn_gate_inp.weight", matrix(p + "router/w"))
        for name, key in [("attn_q", "query"), ("attn_k", "key"), ("attn_v", "value"), ("attn_output", "linear")]:
            writer.add_tensor(b + name + ".weight", matrix(p + f"multi_head_attention/{key}/w"))
        for name, key in [("ffn_gate_exps", "linear"), ("ffn_up_exps", "linear_v"), ("ffn_down_exps", "linear_1")]:
            writer.add_tensor(b + name + ".weight", matrix(p + f"moe/{key}/w"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_independently_written_gguf_runs_like_llama_cpp(work):
    # Not the tiny shape: one kv head, 4 experts top-1, 3 layers, its own multipliers.
    config = Grok1Config(name="indep", vocab_size=300, sequence_len=256, emb_size=128, key_size=32, num_q_heads=4,
                         num_kv_heads=1, num_layers=3, widening_factor=3.0, num_experts=4, num_selected_experts=1,
                         embedding_multiplier_scale=128**0.5, attn_output_multiplier=32**-0.5, output_multiplier_scale=0.5)
    path = work / "independent.gguf"
    independent_gguf(path, config)
    model = grok1.load(path, dtype="float32", device="cpu")
    for f in dataclasses.fields(config):  # GGUF holds f32: the multipliers come back rounded to f32
        ours, theirs = getattr(model.config, f.name), getattr(config, f.name)
        assert (np.float32(ours) == np.float32(theirs)) if isinstance(theirs, float) else (f.name == "name" or ours == theirs)
    llm = llama(path)
    gen = torch.Generator().manual_seed(11)
    for n in PROMPT_LENGTHS:
        tokens = torch.randint(1, config.vocab_size, (n,), generator=gen).tolist()
        got, expected = grok1_logits(model, tokens), llama_logits(llm, tokens)
        rel = relative_error(got, expected)
        agree = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
        differ = got.argmax(-1) != expected.argmax(-1)
        print(f"independent GGUF, {n} tokens: grok1 vs llama.cpp rel {rel:.2e}, argmax {agree:.3f}, "
              f"top-2 margins where they differ {top2_margin(got[differ]).tolist()}")
        assert rel <= 1e-2
        assert bool((top2_margin(got[differ]) < 0.1).all())  # argmax differs only at near-ties


def test_llama_cpp_k_quants_load_in_grok1(f32_file, work):
    """llama.cpp's own quantizer (Q4_K_M: Q4_K, Q5_K, Q6_K, Q8_0 and F16 here) makes a file grok1 runs."""
    dst = work / "tiny-q4_k_m.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32_file).encode(), str(dst).encode(), params) == 0
    types = {t.tensor_type for t in gguf.GGUFReader(dst).tensors}
    assert {QT.Q4_K, QT.Q6_K} <= types
    model = grok1.load(dst, dtype="float32", device="cpu")
    # Every weight as gguf's reference dequantiser reads it.
    for name, t in G.GGUFModel(dst).tensors.items():
        if t.qtype not in (QT.F32, QT.F16):
            expected = gguf.quants.dequantize(t.data, t.qtype)
            got = G.dequantize_raw(torch.from_numpy(np.array(t.data)), t.qtype, t.shape)
            assert torch.equal(got, torch.from_numpy(expected)), name
    tokens = list(range(3, 8))
    got, expected = grok1_logits(model, tokens), llama_logits(llama(dst), tokens)
    print(f"Q4_K_M by llama.cpp, 5 tokens: grok1 vs llama.cpp rel {relative_error(got, expected):.3f}")
    assert relative_error(got, expected) < 0.1


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q4_K, QT.Q6_K, QT.BF16, QT.F16])
def test_torch_dequantisers_match_gguf_reference(qtype):
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(int(qtype))
    if qtype in (QT.BF16, QT.F16):
        values = rng.standard_normal((12, 64), dtype=np.float32)
        raw = (values.astype(np.float16) if qtype == QT.F16 else gguf.quants.quantize(values, QT.BF16)).view(np.uint8)
        shape = (12, 64)
    else:
        raw = rng.integers(0, 256, (12, size), dtype=np.uint8)  # one block per row
        for at in {QT.Q8_0: [0], QT.Q4_0: [0], QT.Q4_K: [0, 2], QT.Q6_K: [size - 2]}[qtype]:  # finite f16 scales
            raw[:, at : at + 2] = rng.uniform(-0.1, 0.1, (12, 1)).astype(np.float16).view(np.uint8)
        shape = (12, block)
    expected = gguf.quants.dequantize(raw, qtype)
    got = G.dequantize_raw(torch.from_numpy(raw), qtype, shape)
    assert torch.equal(got, torch.from_numpy(expected))


# ---- split files ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_set(release, work):
    dst = work / "split" / "tiny.gguf"
    plan_files = run_cli("convert", str(release), str(dst), "--quant", "f32", "--split-max-size", "7M", "--quiet")
    assert "tiny-00001-of-0000" in plan_files.stdout
    return sorted((work / "split").iterdir())


def test_split_export_names_and_keys(split_set):
    count = len(split_set)
    assert count >= 3
    assert [p.name for p in split_set] == [f"tiny-{i:05d}-of-{count:05d}.gguf" for i in range(1, count + 1)]
    total = 0
    for index, part in enumerate(split_set):
        reader = gguf.GGUFReader(part)
        assert reader.fields["split.no"].contents() == index and reader.fields["split.no"].types == [gguf.GGUFValueType.UINT16]
        assert reader.fields["split.count"].contents() == count and reader.fields["split.count"].types == [gguf.GGUFValueType.UINT16]
        assert reader.fields["split.tensors.count"].types == [gguf.GGUFValueType.INT32]
        assert ("general.architecture" in reader.fields) == (index == 0)
        assert sum(t.n_bytes for t in reader.tensors) <= 7_000_000 or len(reader.tensors) == 1
        total += len(reader.tensors)
    assert total == reader.fields["split.tensors.count"].contents() == 26


def test_split_set_runs_in_grok1_and_llama_cpp(split_set, f32_file, reference, prompts):
    model = grok1.load(split_set[0], dtype="float32", device="cpu")
    assert torch.equal(grok1_logits(model, prompts[1]), grok1_logits(reference, prompts[1]))
    assert torch.equal(llama_logits(llama(split_set[0]), prompts[1]), llama_logits(llama(f32_file), prompts[1]))
    with pytest.raises(CheckpointError, match="open the first part"):
        grok1.load(split_set[1], device="cpu")


# ---- tokenizer ------------------------------------------------------------------------------------


def test_sentencepiece_reader_matches_sentencepiece():
    sp_path = TOKENIZER_DIR / "tokenizer.model"
    model = G.read_sentencepiece(sp_path)
    sp = Tokenizer(sp_path).sp
    assert len(model.pieces) == sp.get_piece_size() == 131072
    assert model.pieces == [sp.id_to_piece(i) for i in range(len(model.pieces))]
    assert model.scores == [sp.get_score(i) for i in range(len(model.pieces))]
    kinds = {G.CONTROL: sp.is_control, G.UNKNOWN: sp.is_unknown, G.BYTE: sp.is_byte, G.UNUSED: sp.is_unused}
    for kind, check in kinds.items():
        assert [i for i, t in enumerate(model.types) if t == kind] == [i for i in range(len(model.types)) if check(i)]
    assert [i for i, t in enumerate(model.types) if t == G.USER_DEFINED] == list(range(4, 69))
    assert model.normalizer == "identity" and model.add_dummy_prefix


def test_llama_cpp_tokenises_like_grok1(work):
    """The real tokenizer in a vocabulary-only GGUF (grok1's metadata writer), tokenised by llama.cpp."""
    path = work / "grok-1-vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "grok")
    for kv in G.grok_metadata(grok1.GROK1, 0) + G.tokenizer_metadata(grok1.GROK1, TOKENIZER_DIR / "tokenizer.model"):
        if kv.key != "general.architecture":  # GGUFWriter writes it
            writer.add_key_value(kv.key, kv.value, kv.vtype, sub_type=kv.item_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    cases = json.loads((TOKENIZER_DIR / "cases.json").read_text())["cases"]
    different = []
    for case in cases:
        ids = llm.tokenize(case["text"].encode("utf-8"), add_bos=False, special=False) if case["text"] else []
        if ids != case["ids"]:
            different.append(case["text"])
    print(f"llama.cpp tokenises {len(cases) - len(different)}/{len(cases)} reference strings exactly; differ: {different}")
    # The rest hold a user-defined piece like <|separator|>, which llama.cpp treats as a special token
    # (no dummy prefix before it at the start, a space prefix after it); see docs/gguf.md.
    assert len(cases) - len(different) == 39
    assert all("<|" in text for text in different)


def test_export_embeds_the_models_tokenizer(release, work):
    tokenizer = train_demo_tokenizer(str(work / "demo-tokenizer"))
    dst = export(release, work / "with-tokenizer.gguf", "q8_0", tokenizer=tokenizer)
    reader = gguf.GGUFReader(dst)
    tok = Tokenizer(tokenizer)
    pieces = reader.fields["tokenizer.ggml.tokens"].contents()
    assert pieces[: tok.vocab_size] == [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert all(p.startswith("[PLACEHOLDER_") for p in pieces[tok.vocab_size :])
    assert G.PLACEHOLDER_KEY not in reader.fields
    llm = llama_cpp.Llama(str(dst), vocab_only=True, verbose=False)
    text = "The model reads a sequence of tokens and"
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text)


# ---- the convert command --------------------------------------------------------------------------


def test_convert_refuses_to_overwrite_and_bad_types(f32_file, release, capsys):
    assert cli.main(["convert", str(release), str(f32_file), "--quant", "f32", "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert cli.main(["convert", str(release), str(f32_file.parent / "x.gguf"), "--quant", "int8", "--quiet"]) == 1
    assert "unknown GGUF type" in capsys.readouterr().err
    assert cli.main(["convert", str(release), str(f32_file.parent / "nat"), "--quant", "q8_0", "--quiet"]) == 1
    assert "unknown --quant" in capsys.readouterr().err


def test_export_from_a_native_directory(release, work, prompts):
    from grok1.convert import convert_to_native

    native_dir = work / "native-for-gguf"
    convert_to_native(release, native_dir, progress=False)
    out = work / "from-native.gguf"
    assert cli.main(["convert", str(native_dir), str(out), "--quant", "f32", "--quiet"]) == 0
    direct = grok1.load(release, dtype="float32", device="cpu")
    via = grok1.load(out, dtype="float32", device="cpu")
    assert torch.equal(grok1_logits(via, prompts[0]), grok1_logits(direct, prompts[0]))


def test_interrupted_export_leaves_nothing(release, work):
    config, weights, _ = read_weights(release)

    def failing():
        for i, item in enumerate(weights):
            if i == 5:
                raise KeyboardInterrupt
            yield item

    out = work / "interrupted"
    out.mkdir()
    with pytest.raises(KeyboardInterrupt):
        G.write_gguf(failing(), config, out / "m.gguf", quant="q8_0", progress=False, split_max_size=5_000_000)
    assert list(out.iterdir()) == []


def test_gguf_to_gguf_requantises(q8_file, work, reference, prompts):
    dst = export(q8_file, work / "from-q8_0-to-f32.gguf", "f32")
    a = grok1.load(dst, dtype="float32", device="cpu")
    b = grok1.load(q8_file, dtype="float32", device="cpu")
    assert torch.equal(grok1_logits(a, prompts[0]), grok1_logits(b, prompts[0]))


# ---- bad input ------------------------------------------------------------------------------------


def rewrite(src, dst, *, arch: str = "grok", drop: str | None = None, replace: dict | None = None,
            add: dict | None = None) -> None:
    """A copy of a GGUF through GGUFWriter, with a tensor dropped, replaced or added as (array, type)."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for t in reader.tensors:
        if t.name == drop:
            continue
        data, qtype = (replace or {}).get(t.name, (t.data, t.tensor_type))
        writer.add_tensor(t.name, np.ascontiguousarray(data), raw_dtype=qtype if data.dtype == np.uint8 else None)
    for name, (data, _) in (add or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def assert_refused(path, *fragments: str, cli_too: bool = False) -> None:
    with pytest.raises(CheckpointError) as err:
        grok1.load(path, device="cpu")
    for fragment in (str(path), *fragments):
        assert fragment in str(err.value), (fragment, str(err.value))
    if cli_too:
        proc = run_cli("generate", "--model", str(path), "--token-ids", "5,6", "--json", "--device", "cpu", check=False)
        assert proc.returncode == 1 and proc.stderr.startswith("grok1: error:") and "Traceback" not in proc.stderr
        assert all(f in proc.stderr for f in fragments) and proc.stdout == ""


def test_other_architecture(f32_file, work):
    path = work / "llama-arch.gguf"
    rewrite(f32_file, path, arch="llama")
    assert_refused(path, "'llama'", "grok", cli_too=True)


def test_missing_tensor(f32_file, work):
    path = work / "missing.gguf"
    rewrite(f32_file, path, drop="blk.1.attn_v.weight")
    assert_refused(path, "missing tensor blk.1.attn_v.weight", "decoder_layer_1/multi_head_attention/value/w", cli_too=True)


def test_untied_output_projection(f32_file, work):
    path = work / "untied.gguf"
    reader = gguf.GGUFReader(f32_file)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rewrite(f32_file, path, add={"output.weight": (np.array(embd.data), None)})
    assert_refused(path, "output.weight", "untied")


def test_wrong_shape(f32_file, work):
    path = work / "wrong-shape.gguf"
    rewrite(f32_file, path, replace={"blk.0.attn_k.weight": (np.zeros((32, 256), np.float32), None)})
    assert_refused(path, "blk.0.attn_k.weight", "{256, 32}", "{256, 64}")


def test_unsupported_quant_type(f32_file, work):
    block, size = gguf.GGML_QUANT_SIZES[QT.IQ4_NL]
    path = work / "iq4_nl.gguf"
    rewrite(f32_file, path, replace={"blk.0.attn_q.weight": (np.zeros((256, 256 // block * size), np.uint8), QT.IQ4_NL)})
    assert_refused(path, "blk.0.attn_q.weight", "IQ4_NL", "supported: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K")


def test_truncated_file(f32_file, work):
    path = work / "truncated.gguf"
    data = f32_file.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    assert_refused(path, "truncated", "tensor blk.", cli_too=True)
    path.write_bytes(data[:3000])  # cut inside the metadata
    assert_refused(path, "truncated or corrupt")


def test_missing_split_part(split_set, work):
    parts = work / "split-missing"
    parts.mkdir()
    for p in split_set:
        if p != split_set[1]:
            (parts / p.name).write_bytes(p.read_bytes())
    assert_refused(parts / split_set[0].name, "missing part 2", str(parts / split_set[1].name))


def test_not_a_gguf_file(work):
    path = work / "text.gguf"
    path.write_text("hello")
    assert_refused(path, "not a GGUF file")
    assert_refused(work / "absent.gguf", "no such GGUF file")
    with pytest.raises(Grok1Error):
        G.parse_size("lots")
