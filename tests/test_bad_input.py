"""Bad checkpoints and configs are refused with a message naming the file and the parameter."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

import grok1
from conftest import FIXTURE
from grok1.errors import CheckpointError, ConfigError
from grok1.formats import xai
from grok1.quant import Int8Weight

KEY_FILE = "tensor00005_000"  # transformer/decoder_layer_0/multi_head_attention/key/w
KEY_PATH = "transformer/decoder_layer_0/multi_head_attention/key/w"


@pytest.fixture()
def model_dir(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(FIXTURE, dst, ignore=shutil.ignore_patterns("*.npz", "*.json", "*.md"))
    shutil.copy(FIXTURE / "config.json", dst / "config.json")
    for f in (dst / "ckpt-0").iterdir():
        f.chmod(0o644)
    return dst


def run_cli(model_dir) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grok1", "generate", "--model", str(model_dir), "--token-ids", "5,6,7",
         "--max-new-tokens", "2", "--json", "--device", "cpu"],
        capture_output=True, text=True,
    )


def assert_cli_refuses(model_dir, *fragments: str) -> str:
    proc = run_cli(model_dir)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("grok1: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, (fragment, proc.stderr)
    assert proc.stdout == ""
    return proc.stderr


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_pickle_calling_outside_allow_list_is_refused_and_nothing_runs(model_dir, tmp_path, protocol):
    marker = tmp_path / "pwned"
    (model_dir / "ckpt-0" / KEY_FILE).write_bytes(pickle.dumps(_RunsCommand(f"touch {marker}"), protocol=protocol))
    with pytest.raises(CheckpointError) as err:
        grok1.load(model_dir, device="cpu")
    assert KEY_FILE in str(err.value) and KEY_PATH in str(err.value)
    assert "system" in str(err.value)
    assert not marker.exists()
    assert_cli_refuses(model_dir, KEY_FILE, KEY_PATH, "refusing to load global")
    assert not marker.exists()


def test_builtins_eval_refused(model_dir, tmp_path):
    marker = tmp_path / "pwned"
    payload = b"cbuiltins\neval\n(V__import__('os').system('touch " + str(marker).encode() + b"')\ntR."
    (model_dir / "ckpt-0" / KEY_FILE).write_bytes(payload)
    assert_cli_refuses(model_dir, KEY_FILE, "builtins.eval")
    assert not marker.exists()


def test_truncated_tensor_file(model_dir):
    path = model_dir / "ckpt-0" / "tensor00002_000"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_cli_refuses(model_dir, "tensor00002_000", "transformer/decoder_layer_0/moe/linear/w", "truncated")


def test_missing_tensor_file(model_dir):
    (model_dir / "ckpt-0" / KEY_FILE).unlink()
    assert_cli_refuses(model_dir, KEY_FILE, KEY_PATH, "missing tensor file")


def test_shape_disagrees_with_config(model_dir):
    wrong = Int8Weight.from_release(torch.zeros(128, 128, dtype=torch.int8), torch.ones(1, 128, dtype=torch.bfloat16))
    (model_dir / "ckpt-0" / KEY_FILE).write_bytes(xai.tensor_file_bytes(wrong))
    assert_cli_refuses(model_dir, KEY_FILE, KEY_PATH, "[128, 128]", "[128, 256]")


def test_quantised_matrix_stored_as_plain_array(model_dir):
    (model_dir / "ckpt-0" / KEY_FILE).write_bytes(xai.tensor_file_bytes(torch.zeros(128, 256)))
    assert_cli_refuses(model_dir, KEY_FILE, KEY_PATH, "expected an int8 QuantizedWeight8bit")


def test_norm_stored_with_wrong_dtype(model_dir):
    # An int8 array where a float32 norm scale belongs (tensor00001 = final norm).
    good = (model_dir / "ckpt-0" / "tensor00001_000").read_bytes()
    bad = good.replace(b"\x8c\x02f4", b"\x8c\x02i1")
    (model_dir / "ckpt-0" / "tensor00001_000").write_bytes(bad)
    assert_cli_refuses(model_dir, "tensor00001_000", "language_model/rms_norm/scale")


def test_scale_blocks_must_divide_input(model_dir):
    import io

    spec_file = "tensor00006_000"  # decoder_layer_0 attention output projection [512, 128], 8 blocks in the release
    buf = io.BytesIO()
    buf.write(b"\x80\x04")
    emitter = xai._PickleEmitter(buf)
    emitter.quantized_weight(torch.zeros(512, 128, dtype=torch.int8), torch.ones(7, 128, dtype=torch.bfloat16))
    emitter.finish()
    (model_dir / "ckpt-0" / spec_file).write_bytes(buf.getvalue())
    assert_cli_refuses(model_dir, spec_file, "multi_head_attention/linear/w", "7 scale row blocks do not divide")


@pytest.mark.parametrize(
    "section,field,value",
    [("TransformerConfig", "num_q_heads", "16"), ("TransformerConfig", "widening_factor", None),
     ("LanguageModelConfig", "vocab_size", 512.0), ("TransformerConfig", "num_layers", True)],
)
def test_config_with_wrong_type(model_dir, section, field, value):
    config = json.loads((model_dir / "config.json").read_text())
    config[section][field] = value
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError):
        grok1.load(model_dir, device="cpu")
    assert_cli_refuses(model_dir, "config.json", f"{section}.{field}")


def test_config_not_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    assert_cli_refuses(model_dir, "config.json", "not valid JSON")


def test_config_for_a_different_model(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["TransformerConfig"]["num_layers"] = 1
    (model_dir / "config.json").write_text(json.dumps(config))
    assert_cli_refuses(model_dir, "tensor00014_000", "more")


def test_not_a_model_directory(tmp_path):
    assert_cli_refuses(tmp_path, "ckpt-0")
    assert_cli_refuses(tmp_path / "nope", "no such model directory")
