"""The release's file order, pickle layout and the restricted reader."""

from __future__ import annotations

import json
import re

import torch

from conftest import FIXTURE, SHARED
from grok1.config import GROK1, Grok1Config
from grok1.formats import xai
from grok1.loader import read_config
from grok1.quant import Int8Weight
from grok1.synth import _file_bytes

DTYPE_NAMES = {"float32": "float32", "int8": "int8", "bf16": "bfloat16"}


def _parse_shape(text: str) -> tuple[tuple[int, ...], str]:
    match = re.fullmatch(r"\[([\d, ]+)\] (\w+)", text.strip())
    assert match, text
    return tuple(int(n) for n in match.group(1).split(",")), DTYPE_NAMES[match.group(2)]


def test_derived_order_equals_the_770_row_table():
    doc = (SHARED / "docs" / "xai-checkpoint-format.md").read_text()
    rows = [line for line in doc.splitlines() if re.match(r"^\| \d+ \| `tensor", line)]
    assert len(rows) == 770
    order = xai.release_order(GROK1)
    assert len(order) == 770
    total_payload = 0
    for row, spec in zip(rows, order, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        index, file, path, kind, weight, scales, payload = cells
        i = int(index)
        assert file == f"`{xai.tensor_filename(i)}`"
        assert path == f"`{spec.path}`", i
        shape, dtype = _parse_shape(weight)
        assert shape == spec.shape, spec.path
        if spec.quantised:
            assert kind == "QuantizedWeight8bit" and dtype == "int8"
            scale_shape, scale_dtype = _parse_shape(scales)
            assert scale_shape == xai.scales_shape(spec) and scale_dtype == "bfloat16", spec.path
        else:
            assert kind == "ndarray" and dtype == "float32" and scales == "-"
        expected_payload = int(payload.replace(",", ""))
        assert _file_bytes(spec) == expected_payload, spec.path
        total_payload += expected_payload
    assert total_payload == 318_239_694_848


def test_derived_order_equals_fixture_param_order():
    config = read_config(FIXTURE)
    table = json.loads((FIXTURE / "param_order.json").read_text())["tensors"]
    order = xai.release_order(config)
    assert [t["path"] for t in table] == ["params/" + s.path for s in order]
    for t, spec in zip(table, order, strict=True):
        assert tuple(t["logical_shape"]) == spec.shape
        if spec.quantised:
            assert tuple(t["scales"]["shape"]) == xai.scales_shape(spec)


def test_lexicographic_layer_order():
    config = GROK1.replace(num_layers=12)
    layers = []
    for spec in xai.release_order(config):
        if spec.path.endswith("router/w"):
            layers.append(int(spec.path.split("decoder_layer_")[1].split("/")[0]))
    assert layers == [0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9]


def test_fixture_tensors_read_exactly_and_rewrite_byte_identical():
    config = read_config(FIXTURE)
    count = 0
    for item in xai.iter_release(FIXTURE, config):
        original = open(item.file, "rb").read()
        assert xai.tensor_file_bytes(item.value) == original, item.file
        if isinstance(item.value, Int8Weight):
            assert item.value.weight.dtype == torch.int8 and item.value.scales.dtype == torch.bfloat16
            expected_blocks = 8 if item.spec.row_parallel else 1
            assert item.value.blocks == expected_blocks
        count += 1
    assert count == 26


def test_expected_file_sizes_match_the_fixture_files():
    config = read_config(FIXTURE)
    for index, spec in enumerate(xai.release_order(config)):
        file = FIXTURE / "ckpt-0" / xai.tensor_filename(index)
        assert xai.expected_file_size(spec) == file.stat().st_size, spec.path


def test_dequantisation_rounds_product_to_bf16():
    weight = torch.tensor([[127, -3], [5, 1]], dtype=torch.int8)
    scales = torch.tensor([[0.0123, 1.7]], dtype=torch.bfloat16)
    w = Int8Weight.from_release(weight, scales).dequantize()
    assert w.dtype == torch.bfloat16
    exact = weight.double() * scales.double()
    assert torch.equal(w, exact.to(torch.bfloat16))  # one rounding of the exact product


def test_row_blocks_apply_per_input_block():
    weight = torch.ones(8, 3, dtype=torch.int8)
    scales = torch.arange(1, 1 + 4 * 3, dtype=torch.bfloat16).view(4, 3)
    w = Int8Weight.from_release(weight, scales).dequantize()
    for row in range(8):
        assert torch.equal(w[row], scales[row // 2])


def test_synth_models_round_trip(tmp_path):
    from grok1.synth import random_model, write_release

    config = Grok1Config(name="t", vocab_size=64, sequence_len=32, emb_size=64, key_size=16, num_q_heads=4,
                         num_kv_heads=2, num_layers=2, widening_factor=2.0, num_experts=4, num_selected_experts=2)
    write_release(tmp_path / "m", config, seed=3, progress=False)
    import grok1

    loaded = grok1.load(tmp_path / "m", dtype="float32", device="cpu")
    assert loaded.config == config
    fresh = random_model(config, seed=3, dtype=torch.float32)
    for (path, a), (_, b) in zip(loaded.named_official_weights(), fresh.named_official_weights(), strict=True):
        if isinstance(a, Int8Weight):
            assert torch.equal(a.weight, b.weight) and torch.equal(a.scales, b.scales), path
        else:
            assert torch.equal(a, b), path
