"""The `grok1` command end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grok1.tokenizer import Tokenizer


def grok1(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "grok1", *args], capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "model"
    proc = grok1("demo", "--dir", str(path), "--max-new-tokens", "16")
    assert "RANDOM weights" in proc.stdout
    assert "tok/s" in proc.stderr and "peak RSS" in proc.stderr
    return path


def test_demo_writes_a_release_layout_model(demo_dir):
    assert (demo_dir / "config.json").is_file() and (demo_dir / "tokenizer.model").is_file()
    assert len(list((demo_dir / "ckpt-0").iterdir())) == 26


def test_generate_json_with_text(demo_dir):
    out = json.loads(grok1("generate", "--model", str(demo_dir), "--prompt", "The model", "--max-new-tokens", "8",
                           "--seed", "3", "--json", "--ignore-eos").stdout)
    tok = Tokenizer(demo_dir / "tokenizer.model")
    assert out["prompt_token_ids"] == tok.encode("The model")
    assert len(out["token_ids"]) == 8
    decoder = tok.stream_decoder(at_start=False)
    assert out["text"] == "".join(decoder.push(i) for i in out["token_ids"]) + decoder.flush()
    assert out["stats"]["peak_rss_mb"] > 0 and out["stats"]["decode_tokens_per_s"] > 0


def test_streamed_text_equals_json_text(demo_dir):
    args = ["generate", "--model", str(demo_dir), "--prompt", "The model", "--max-new-tokens", "10", "--seed", "5",
            "--ignore-eos"]
    streamed = grok1(*args).stdout
    as_json = json.loads(grok1(*args, "--json").stdout)
    assert streamed == "The model" + as_json["text"] + "\n"


def test_stop_string(demo_dir):
    base = ["generate", "--model", str(demo_dir), "--prompt", "The model", "--max-new-tokens", "12", "--seed", "5",
            "--ignore-eos", "--json"]
    full = json.loads(grok1(*base).stdout)["text"]
    stop = full[3:5]
    cut = json.loads(grok1(*base, "--stop", stop).stdout)
    assert cut["text"] == full[: full.index(stop)]
    assert cut["finish_reason"] == "stop"


def test_synth_refuses_existing_destination(tmp_path):
    grok1("synth", str(tmp_path / "m"), "--layers", "1")
    proc = grok1("synth", str(tmp_path / "m"), "--layers", "1", check=False)
    assert proc.returncode != 0 and "already exists" in proc.stderr and "Traceback" not in proc.stderr
    grok1("synth", str(tmp_path / "m"), "--layers", "1", "--force")


def test_synth_refuses_invalid_shape(tmp_path):
    proc = grok1("synth", str(tmp_path / "m"), "--q-heads", "6", "--kv-heads", "4", check=False)
    assert proc.returncode != 0 and "num_q_heads" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m").exists()


def test_interrupted_synth_leaves_nothing(tmp_path):
    from grok1.config import PRESETS
    from grok1.synth import write_release

    calls = []

    def failing(spec):
        calls.append(spec)
        if len(calls) == 5:
            raise KeyboardInterrupt
        import torch

        from grok1.synth import synth_tensor

        return synth_tensor(spec, PRESETS["tiny"], torch.Generator().manual_seed(0))

    with pytest.raises(KeyboardInterrupt):
        write_release(tmp_path / "m", PRESETS["tiny"], tensor_fn=failing, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["--token-ids", "1,x"], "comma-separated"),
        (["--token-ids", "1,999999"], "outside the vocabulary"),
        (["--token-ids", "1,2", "--top-p", "0"], "top_p"),
    ],
)
def test_generate_errors(demo_dir, args, message):
    proc = grok1("generate", "--model", str(demo_dir), *args, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr


def test_prompt_needs_a_tokenizer(tmp_path):
    grok1("synth", str(tmp_path / "m"), "--layers", "1")
    proc = grok1("generate", "--model", str(tmp_path / "m"), "--prompt", "hi", check=False)
    assert proc.returncode != 0 and "tokenizer" in proc.stderr and "Traceback" not in proc.stderr
