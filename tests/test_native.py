"""The native format: conversion, instant memory-mapped loading, verification, resumable writes."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import grok1
from conftest import FIXTURE, relative_error
from grok1.config import Grok1Config
from grok1.convert import convert_to_native
from grok1.errors import CheckpointError, Grok1Error
from grok1.formats import native
from grok1.quant import Int4Weight, quantize_int4
from grok1.synth import write_release
from grok1.verify import verify

SMALL = Grok1Config(name="small", vocab_size=256, sequence_len=64, emb_size=128, key_size=32, num_q_heads=4,
                    num_kv_heads=2, num_layers=2, widening_factor=3.0, num_experts=4, num_selected_experts=2)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp("native") / "tiny"
    convert_to_native(FIXTURE, dst, progress=False)
    return dst


def _cases(fixture_arrays, fixture_cases):
    for case in fixture_cases:
        yield case, torch.from_numpy(fixture_arrays[case["tokens_key"]].astype(np.int64))


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_converted_fixture_is_bit_identical_to_the_release(converted, fixture_cases, fixture_arrays, dtype):
    direct = grok1.load(FIXTURE, dtype=dtype, device="cpu")
    mapped = grok1.load(converted, dtype=dtype, device="cpu")
    for case, tokens in _cases(fixture_arrays, fixture_cases):
        with torch.no_grad():
            a, b = direct(tokens), mapped(tokens)
        assert torch.equal(a, b), case["name"]
        if dtype == "float32":
            assert relative_error(b, fixture_arrays[case["logits_f32_key"]]) <= 2e-3


def test_layout_and_safetensors_interop(converted):
    from safetensors import safe_open

    index = json.loads((converted / native.INDEX_FILE).read_text())
    assert index["metadata"]["quant"] == "int8" and index["metadata"]["format"] == "grok1-native"
    assert set(index["weight_map"]) == set(index["checksums"])
    name = "transformer.decoder_layer_0.multi_head_attention.linear.qweight"
    shard = converted / index["weight_map"][name]
    with safe_open(str(shard), framework="pt") as f:
        via_library = f.get_tensor(name)
    ours = native.NativeCheckpoint(converted).tensor(name)
    assert via_library.shape == (8, 128, 64) and torch.equal(via_library, ours)
    assert (converted / "config.json").is_file()


def test_load_maps_without_copying_or_reading(converted):
    ckpt_bytes = sum(os.path.getsize(converted / s) for s in os.listdir(converted) if s.endswith(".safetensors"))
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    model = grok1.load(converted, device="cpu")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    # Touching every page of the weights would take ckpt_bytes / 4096 faults; mapping takes a handful.
    assert faults < ckpt_bytes / 4096 / 4, faults
    weight = model.layers[0].moe.linear.qweight
    assert weight.dtype == torch.int8
    buffers = [np.frombuffer(m, dtype=np.uint8) for m in model.checkpoint._maps.values()]
    inside = any(b.ctypes.data <= weight.data_ptr() < b.ctypes.data + b.size for b in buffers)
    assert inside, "the int8 weight is not a view of the mapped shard"


def test_int4_and_bf16_conversion(tmp_path):
    write_release(tmp_path / "rel", SMALL, seed=2, progress=False)
    convert_to_native(tmp_path / "rel", tmp_path / "int8", progress=False)
    convert_to_native(tmp_path / "rel", tmp_path / "int4", quant="int4", progress=False)
    convert_to_native(tmp_path / "int8", tmp_path / "int4b", quant="int4", progress=False)  # re-quantise native
    convert_to_native(tmp_path / "rel", tmp_path / "bf16", quant="bf16", progress=False)
    m8 = grok1.load(tmp_path / "int8", dtype="float32")
    m4 = grok1.load(tmp_path / "int4", dtype="float32")
    m4b = grok1.load(tmp_path / "int4b", dtype="float32")
    mbf = grok1.load(tmp_path / "bf16", dtype="float32")
    assert isinstance(m4.layers[0].moe.linear, Int4Weight)
    for (path, a), (_, b) in zip(m4.named_official_weights(), m4b.named_official_weights(), strict=True):
        if isinstance(a, Int4Weight):
            assert torch.equal(a.packed, b.packed) and torch.equal(a.scales, b.scales), path
    for (path, w8), (_, w16) in zip(m8.named_official_weights(), mbf.named_official_weights(), strict=True):
        if hasattr(w8, "qweight"):  # bf16 stores exactly the release's bf16(q * s)
            assert torch.equal(w8.dequantize(), w16.dequantize()), path
    tokens = torch.randint(1, SMALL.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        l8, l4, lbf = m8(tokens), m4(tokens), mbf(tokens)
    assert relative_error(lbf, l8) < 1e-4
    assert 0 < relative_error(l4, l8) < 1.0  # lossy; figures for realistic sizes are in docs/native-format.md


def test_int4_quantisation_rule():
    w = torch.randn(3, 64)
    q = quantize_int4(w)
    values = q.values()
    assert values.min() >= -8 and values.max() <= 7
    deq = q.dequantize().t().float()
    groups = w.view(3, 2, 32)
    extreme_idx = groups.abs().argmax(-1)
    # The largest-magnitude value of each group maps to -8 and is reproduced up to the bf16 scale.
    assert torch.all(values.view(3, 2, 32).gather(-1, extreme_idx[..., None]) == -8)
    assert relative_error(deq, w) < 0.12


def test_verify_names_a_flipped_byte(tmp_path, converted):
    dst = tmp_path / "copy"
    shutil.copytree(converted, dst)
    ckpt = native.NativeCheckpoint(dst)
    victim = "transformer.decoder_layer_1.moe.linear_v.qweight"
    info = ckpt.shards[ckpt.location[victim]]
    _, _, start, end = info.entries[victim]
    del ckpt
    shard = info.file
    with open(shard, "r+b") as fh:
        fh.seek(info.data_start + (start + end) // 2)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0x10]))
    report = verify(dst, progress=False)
    assert not report.ok and len(report.problems) == 1 and victim in report.problems[0]
    proc = subprocess.run([sys.executable, "-m", "grok1", "verify", str(dst), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 1 and victim in proc.stdout and "Traceback" not in proc.stderr
    with pytest.raises(CheckpointError, match=victim):
        grok1.load(dst, verify=True)
    grok1.load(dst)  # without verification the load is instant and does not read the data


def test_truncated_shard_refused_at_load(tmp_path, converted):
    dst = tmp_path / "copy"
    shutil.copytree(converted, dst)
    shard = next(dst.glob("*.safetensors"))
    with open(shard, "r+b") as fh:
        fh.truncate(os.path.getsize(shard) - 1000)
    with pytest.raises(CheckpointError, match="truncated"):
        grok1.load(dst)
    assert not verify(dst, progress=False).ok


def test_verify_release(tmp_path):
    assert verify(FIXTURE, progress=False).ok
    src = tmp_path / "rel"
    shutil.copytree(FIXTURE / "ckpt-0", src / "ckpt-0")
    shutil.copy(FIXTURE / "config.json", src)
    for f in (src / "ckpt-0").iterdir():
        f.chmod(0o644)
    (src / "ckpt-0" / "tensor00003_000").unlink()
    data = (src / "ckpt-0" / "tensor00014_000").read_bytes()
    (src / "ckpt-0" / "tensor00014_000").write_bytes(data[:-100])
    report = verify(src, progress=False)
    assert len(report.problems) == 2
    assert "tensor00003_000" in report.problems[0] and "decoder_layer_0/moe/linear_1/w" in report.problems[0]
    assert "tensor00014_000" in report.problems[1] and "truncated" in report.problems[1]


def _broken_source(tmp_path, how: str):
    src = tmp_path / "src"
    shutil.copytree(FIXTURE / "ckpt-0", src / "ckpt-0")
    shutil.copy(FIXTURE / "config.json", src)
    for f in (src / "ckpt-0").iterdir():
        f.chmod(0o644)
    target = src / "ckpt-0" / "tensor00004_000"
    if how == "missing":
        target.unlink()
    elif how == "truncated":
        target.write_bytes(target.read_bytes()[:5000])
    else:
        from grok1.formats import xai
        from grok1.quant import Int8Weight

        wrong = Int8Weight.from_release(torch.zeros(8, 128, 680, dtype=torch.int8), torch.ones(8, 1, 680, dtype=torch.bfloat16))
        target.write_bytes(xai.tensor_file_bytes(wrong))
    return src


@pytest.mark.parametrize("how,message", [("missing", "missing tensor file"), ("truncated", "truncated"),
                                         ("shape", "[8, 128, 680]")])
def test_converter_stops_on_bad_source_and_leaves_nothing(tmp_path, how, message):
    src = _broken_source(tmp_path, how)
    proc = subprocess.run([sys.executable, "-m", "grok1", "convert", str(src), str(tmp_path / "dst"), "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "tensor00004_000" in proc.stderr and "decoder_layer_0/moe/linear_v/w" in proc.stderr and message in proc.stderr
    assert not (tmp_path / "dst").exists() and not (tmp_path / "dst.partial").exists()


def test_existing_destination_needs_force(tmp_path, converted):
    (tmp_path / "dst").mkdir()
    with pytest.raises(Grok1Error, match="already exists"):
        convert_to_native(FIXTURE, tmp_path / "dst", progress=False)
    convert_to_native(FIXTURE, tmp_path / "dst", progress=False, force=True)
    assert verify(tmp_path / "dst", progress=False).ok


def test_killed_conversion_resumes(tmp_path):
    config = SMALL.replace(emb_size=256, num_layers=8, widening_factor=8.0, num_experts=8, vocab_size=4096)
    write_release(tmp_path / "rel", config, seed=4, progress=False)
    dst = tmp_path / "out"
    state = tmp_path / "out.partial" / ".convert-state.json"
    cmd = [sys.executable, "-m", "grok1", "convert", str(tmp_path / "rel"), str(dst), "--shard-size", "1MB", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            done = len(json.loads(state.read_text())["done"])
        except (OSError, ValueError, KeyError):
            done = 0
        if done >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the conversion finished before it could be interrupted"
    assert not dst.exists()  # nothing that looks like a model
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert "resumed" in rerun.stdout
    assert not (tmp_path / "out.partial").exists()
    assert verify(dst, progress=False).ok
    direct = grok1.load(tmp_path / "rel", dtype="float32")
    resumed = grok1.load(dst, dtype="float32")
    tokens = torch.randint(1, config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(direct(tokens), resumed(tokens))
