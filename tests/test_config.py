"""Hyper-parameters: presets, derived sizes, the official config.json, validation."""

from __future__ import annotations

import json

import pytest

from conftest import FIXTURE
from grok1.config import GROK1, PRESETS, Grok1Config, ffn_size
from grok1.errors import ConfigError


def test_released_grok1():
    assert (GROK1.vocab_size, GROK1.emb_size, GROK1.num_layers) == (131072, 6144, 64)
    assert (GROK1.num_q_heads, GROK1.num_kv_heads, GROK1.key_size) == (48, 8, 128)
    assert (GROK1.num_experts, GROK1.num_selected_experts, GROK1.sequence_len) == (8, 2, 8192)
    assert GROK1.ffn_size == 32768
    assert GROK1.num_parameters() == 315_684_820_992


def test_ffn_size_formula():
    assert ffn_size(128, 8) == 688  # 682 rounded up to a multiple of 8
    assert PRESETS["mid"].ffn_size == 2816
    assert PRESETS["tiny"].ffn_size == 344


def test_presets_carry_the_released_multipliers():
    for config in PRESETS.values():
        assert config.attn_output_multiplier == 0.08838834764831845
        assert config.embedding_multiplier_scale == 78.38367176906169
        assert config.output_multiplier_scale == 0.5773502691896257


def test_reads_official_fixture_config():
    config = Grok1Config.from_file(FIXTURE / "config.json")
    assert (config.vocab_size, config.emb_size, config.key_size) == (512, 128, 32)
    assert (config.num_q_heads, config.num_kv_heads, config.num_layers, config.sequence_len) == (16, 8, 2, 256)
    assert config.ffn_size == json.loads((FIXTURE / "config.json").read_text())["derived"]["ffn_size"]


def test_round_trip(tmp_path):
    config = PRESETS["mid"]
    config.save(tmp_path / "config.json")
    assert Grok1Config.from_file(tmp_path / "config.json") == config


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(num_q_heads=6, num_kv_heads=4), "num_q_heads"),
        (dict(num_selected_experts=9), "num_selected_experts"),
        (dict(key_size=31), "key_size"),
        (dict(num_layers=0), "num_layers"),
        (dict(vocab_size=-1), "vocab_size"),
        (dict(eos_token=600, vocab_size=512), "eos_token"),
        (dict(emb_size=2.5), "emb_size"),
        (dict(widening_factor="8"), "widening_factor"),
    ],
)
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        GROK1.replace(**changes)


def test_missing_field_in_config_json(tmp_path):
    data = json.loads((FIXTURE / "config.json").read_text())
    del data["TransformerConfig"]["key_size"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="TransformerConfig.key_size"):
        Grok1Config.from_file(tmp_path / "config.json")
