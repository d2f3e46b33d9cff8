"""Memory-capped models: experts read from the files on demand, bit-identical to the mapped model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import grok1
from grok1.config import Grok1Config
from grok1.convert import convert_to_native
from grok1.errors import CheckpointError, Grok1Error
from grok1.formats import native
from grok1.memory import PAGE, StreamedWeight, memory_needs
from grok1.synth import write_release

# Experts of 3 x 1 MiB (emb 512 x FFN 2048, int8): large enough that page granularity does not matter.
MB_EXPERTS = Grok1Config(name="mb-experts", vocab_size=512, sequence_len=256, emb_size=512, key_size=64,
                         num_q_heads=4, num_kv_heads=2, num_layers=4, widening_factor=6.0, num_experts=8,
                         num_selected_experts=2)
PROMPT = [5, 17, 99, 300, 4, 8, 250, 33]


SMALL = MB_EXPERTS.replace(name="small", emb_size=128, key_size=32, num_layers=2, widening_factor=3.0)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    write_release(root / "release", MB_EXPERTS, seed=1, progress=False)
    write_release(root / "small-release", SMALL, seed=1, progress=False)
    out = {"int8": root / "int8"}
    convert_to_native(root / "release", out["int8"], progress=False)
    for quant in ("int4", "bf16"):  # the other weight types on a smaller model
        out[quant] = root / quant
        convert_to_native(root / "small-release", out[quant], quant=quant, progress=False)
    return out


def needs_of(path, dtype=torch.bfloat16):
    ckpt = native.NativeCheckpoint(path)
    return memory_needs(ckpt, grok1.loader.read_config(path), dtype)


def io_read_bytes() -> int:
    with open("/proc/self/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("read_bytes:"))


def drop_cached_pages(path) -> None:
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.parametrize("quant,dtype", [("int8", "bfloat16"), ("int8", "float32"), ("int4", "bfloat16"),
                                         ("bf16", "bfloat16")])
def test_streamed_model_is_bit_identical(models, quant, dtype):
    path = models[quant]
    mapped = grok1.load(path, dtype=dtype)
    needs = needs_of(path, mapped.activation_dtype)
    streamed = grok1.load(path, dtype=dtype, max_memory=needs.minimum)  # room for one layer's experts only
    assert isinstance(streamed.layers[0].moe.linear, StreamedWeight)
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        assert torch.equal(mapped(tokens), streamed(tokens))
    if dtype == "bfloat16":  # the KV-cache path too (float32 runs the slower fidelity arithmetic)
        a = grok1.generate(mapped, PROMPT, max_new_tokens=5, temperature=0, ignore_eos=True)
        b = grok1.generate(streamed, PROMPT, max_new_tokens=5, temperature=0, ignore_eos=True)
        assert a == b
    store = streamed.expert_store
    assert store.allocated <= store.budget
    assert store.counters.evictions > 0  # the cap was binding
    store.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux's per-process I/O counters")
def test_decode_reads_the_active_experts_not_the_model(models):
    """Bytes read from disk per decoded token (/proc/self/io) = the selected experts' bytes."""
    path = models["int8"]
    needs = needs_of(path)
    model = grok1.load(path, max_memory=needs.minimum)  # no room to cache: every use is read
    store = model.expert_store
    if not store.reader.direct:
        pytest.skip("the file system refuses O_DIRECT")
    drop_cached_pages(path)
    per_expert = needs.expert_total // (MB_EXPERTS.num_layers * MB_EXPERTS.num_experts)
    assert per_expert >= 3 * 2**20
    active_experts = per_expert * MB_EXPERTS.num_selected_experts * MB_EXPERTS.num_layers
    marks = []
    for _ in grok1.stream(model, PROMPT, max_new_tokens=9, temperature=0, ignore_eos=True):
        marks.append((io_read_bytes(), store.snapshot()))
    decoded = len(marks) - 1
    io_per_token = (marks[-1][0] - marks[0][0]) / decoded
    own_per_token = (marks[-1][1]["bytes_read"] - marks[0][1]["bytes_read"]) / decoded
    assert abs(io_per_token - active_experts) <= 0.2 * active_experts, (io_per_token, active_experts)
    assert abs(own_per_token - io_per_token) <= 0.05 * io_per_token
    assert io_per_token < 0.3 * needs.expert_total  # 2 of 8 experts, not the layer
    store.close()


def test_cache_keeps_the_most_used_experts(models):
    path = models["int8"]
    needs = needs_of(path)
    roomy = grok1.load(path, max_memory=needs.resident + needs.expert_total + 64 * PAGE * 4)
    grok1.generate(roomy, PROMPT, max_new_tokens=3, temperature=0)
    before = roomy.expert_store.snapshot()
    grok1.generate(roomy, PROMPT, max_new_tokens=3, temperature=0)  # everything is cached now
    after = roomy.expert_store.snapshot()
    assert after["bytes_read"] == before["bytes_read"] and after["hits"] > before["hits"]
    roomy.expert_store.close()

    # A budget for one layer plus 3 experts' stacks: the experts used most stay, a new one goes first.
    model = grok1.load(path, max_memory=needs.minimum + needs.per_layer_selected // 2)
    store = model.expert_store
    stacks = [0, 1, 2]  # layer 0's linear, linear_v, linear_1 (registration order)
    for _ in range(5):
        for stack in stacks:
            with store.use(stack, 7):
                pass
    for expert in range(7):  # a pass over the other experts of the layer: more than the budget holds
        for stack in stacks:
            with store.use(stack, expert):
                pass
    cached = {key for key, entry in store.entries.items() if entry.state == "ready"}
    assert {(s, 7) for s in stacks} <= cached
    assert store.allocated <= store.budget
    store.close()


def test_too_small_max_memory_says_how_much_is_needed(models, tmp_path):
    path = models["int8"]
    needs = needs_of(path)
    with pytest.raises(Grok1Error, match=f"at least .* \\({needs.minimum} bytes\\)"):
        grok1.load(path, max_memory=needs.minimum - 1)
    with pytest.raises(Grok1Error, match="cannot read the max_memory"):
        grok1.load(path, max_memory="lots")
    with pytest.raises(Grok1Error, match="native format"):
        grok1.load(tmp_path, max_memory="1GB")
    proc = subprocess.run([sys.executable, "-m", "grok1", "generate", "--model", str(path), "--token-ids", "5,6",
                           "--max-memory", "1MB", "--json"], capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("grok1: error: --max-memory 1.00 MB is less than this model needs")
    assert "KV cache" in proc.stderr and "at least" in proc.stderr


def test_truncated_shard_refused_with_max_memory(models, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(models["int8"], dst)
    shard = sorted(dst.glob("*.safetensors"))[-1]
    size = os.path.getsize(shard)
    with open(shard, "r+b") as fh:
        fh.truncate(size - 4096)
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        grok1.load(dst, max_memory="1GB")

    # Cut after loading: the expert read that runs into the end says so, naming the shard.
    with open(shard, "r+b") as fh:
        fh.truncate(size)
    model = grok1.load(dst, max_memory="1GB")
    with open(shard, "r+b") as fh:
        fh.truncate(size // 2)
    with pytest.raises(CheckpointError, match=f"{shard.name}.*truncated"):
        grok1.generate(model, PROMPT, max_new_tokens=2, temperature=0)
    model.expert_store.close()


def test_cli_reports_reads_and_hit_rate(models):
    path = models["int8"]
    cmd = [sys.executable, "-m", "grok1", "generate", "--model", str(path), "--token-ids", "5,17,99",
           "--max-new-tokens", "6", "--temperature", "0", "--ignore-eos", "--json", "--max-memory", "30MB"]
    capped = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    mapped = grok1.load(path)
    assert capped["token_ids"] == grok1.generate(mapped, [5, 17, 99], max_new_tokens=6, temperature=0, ignore_eos=True)
    stats = capped["stats"]
    assert stats["bytes_read_per_token"] > 0 and 0 <= stats["expert_cache_hit_rate"] <= 1
    assert stats["io_read_bytes_per_token"] >= 0
