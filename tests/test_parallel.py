"""Tensor and expert parallelism (grok1/parallel.py): placements, weight slices, and the model run by
2 and 4 gloo processes (and by two one-process "nodes") against the single-process model and the
official fixture. The multi-process runs are a few torchrun launches that each check many things."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import grok1
from conftest import FIXTURE, relative_error, top2_margin
from grok1 import parallel
from grok1.cli import main as cli_main
from grok1.config import GROK1, Grok1Config
from grok1.convert import convert_to_native
from grok1.errors import Grok1Error
from grok1.quant import BF16Weight, Int8Weight, quantize_int4, quantize_int8
from grok1.synth import write_release

WORKER = Path(__file__).with_name("parallel_worker.py")
sys.path.insert(0, str(WORKER.parent))
from parallel_worker import SECOND_NEW_TOKENS, SECOND_PROMPTS, second_tokens  # noqa: E402

F32_BOUND = 2e-3
NEAR_TIE = 0.01
# 2 kv heads (split over 2 ranks, replicated over 4), 2 experts (one per rank at 2, each expert's FFN
# halved at 4), top-1 routing, a vocabulary of 250 (uneven over 4 ranks).
SECOND = Grok1Config(name="parallel-second", vocab_size=250, sequence_len=128, emb_size=64, key_size=16,
                     num_q_heads=8, num_kv_heads=2, num_layers=2, widening_factor=3.0, num_experts=2,
                     num_selected_experts=1)
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---- placements --------------------------------------------------------------------------------


def test_grok1_placements():
    for n in (1, 2, 4, 8):
        ranks = parallel.plan_all(GROK1, n)
        assert [len(p.q_heads) for p in ranks] == [48 // n] * n
        assert [len(p.kv_heads) for p in ranks] == [8 // n] * n
        assert [len(p.experts) for p in ranks] == [8 // n] * n
        assert sum(len(p.vocab) for p in ranks) == GROK1.vocab_size
        for p in ranks:  # a query head h reads kv head h // 6
            assert {h // 6 for h in p.q_heads} == set(p.kv_heads)
    # 16 ranks: kv heads replicated on pairs of ranks, each expert's FFN split in two
    ranks = parallel.plan_all(GROK1, 16)
    assert [p.kv_heads.start for p in ranks] == [r // 2 for r in range(16)]
    assert all(len(p.q_heads) == 3 and {h // 6 for h in p.q_heads} == set(p.kv_heads) for p in ranks)
    assert [(p.experts.start, p.ffn.start, len(p.ffn)) for p in ranks[:3]] == [(0, 0, 16384), (0, 16384, 16384),
                                                                              (1, 0, 16384)]


@pytest.mark.parametrize("n,field", [(3, "num_kv_heads"), (6, "num_kv_heads"), (12, "num_q_heads")])
def test_unsplittable_sizes_are_refused_by_name(n, field):
    with pytest.raises(Grok1Error, match=field):
        parallel.plan(GROK1, n, 0)


def test_uneven_experts_and_vocabulary():
    config = Grok1Config(name="x", vocab_size=10, emb_size=32, key_size=8, num_q_heads=4, num_kv_heads=4,
                         num_layers=1, widening_factor=2.0, num_experts=6, num_selected_experts=2)
    with pytest.raises(Grok1Error, match="num_experts"):
        parallel.plan(config, 4, 0)
    config = config.replace(num_experts=4)
    assert [len(p.vocab) for p in parallel.plan_all(config, 4)] == [3, 3, 2, 2]
    with pytest.raises(Grok1Error, match="vocab_size"):
        parallel.plan(config.replace(vocab_size=3), 4, 0)


def test_cli_refuses_before_waiting_for_other_ranks(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    assert cli_main(["generate", "--model", str(FIXTURE), "--token-ids", "5,6"]) == 1
    err = capsys.readouterr().err
    assert "num_kv_heads (8)" in err and "Traceback" not in err
    assert not torch.distributed.is_initialized()


# ---- weight slices -----------------------------------------------------------------------------


def _weights() -> dict[str, object]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 128, 96, generator=gen)  # [E, in, out]
    return {
        "int8 (1 block)": Int8Weight.from_release(*quantize_int8(w, 1)),
        "int8 (8 blocks)": Int8Weight.from_release(*quantize_int8(w, 8)),
        "int4": quantize_int4(w.transpose(-1, -2)),
        "bf16": BF16Weight(w.transpose(-1, -2).contiguous().bfloat16()),
    }


@pytest.mark.parametrize("kind", ["int8 (1 block)", "int8 (8 blocks)", "int4", "bf16"])
@pytest.mark.parametrize("cut", [
    parallel.Cut(experts=range(1, 2)),
    parallel.Cut(out=range(24, 48)),
    parallel.Cut(rows=range(64, 128)),
    parallel.Cut(rows=range(32, 64)),  # whole blocks of 16 rows, or inside the single block
    parallel.Cut(experts=range(0, 1), rows=range(96, 128)),
])
def test_cut_weight_is_the_slice_of_the_matrix(kind, cut):
    w = _weights()[kind]
    full = torch.stack([w.dequantize(e) for e in range(2)])  # [E, in, out]
    part = parallel.cut_weight(w, cut)
    e = cut.experts or range(2)
    rows = cut.rows or range(128)
    out = cut.out or range(96)
    expected = full[e.start : e.stop, rows.start : rows.stop, out.start : out.stop]
    got = torch.stack([part.dequantize(i) for i in range(len(e))])
    assert torch.equal(got, expected)


def test_cut_inside_a_scale_block_and_refusals():
    w = _weights()["int8 (1 block)"]  # one block of 128 rows: any row range lies inside it
    part = parallel.cut_weight(w, parallel.Cut(rows=range(40, 56)))
    assert torch.equal(part.dequantize(1), w.dequantize(1)[40:56])
    w8 = _weights()["int8 (8 blocks)"]  # blocks of 16 rows
    with pytest.raises(Grok1Error, match="scale blocks"):
        parallel.cut_weight(w8, parallel.Cut(rows=range(8, 40)), "moe.linear_1")
    with pytest.raises(Grok1Error, match="int4 groups"):
        parallel.cut_weight(_weights()["int4"], parallel.Cut(rows=range(16, 64)))
    # the release layout gives the same slices as the stored layout
    q, s = quantize_int8(torch.randn(2, 128, 96, generator=torch.Generator().manual_seed(0)), 8)
    for cut in (parallel.Cut(rows=range(32, 64)), parallel.Cut(rows=range(20, 28)), parallel.Cut(out=range(5, 9))):
        try:
            expected = parallel.cut_weight(Int8Weight.from_release(q, s), cut)
        except Grok1Error:
            with pytest.raises(Grok1Error):
                parallel.cut_release(q, s, cut, "x")
            continue
        got = parallel.cut_release(q, s, cut, "x")
        assert torch.equal(got.dequantize(1), expected.dequantize(1))


# ---- multi-process runs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def second_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel-second")
    release = write_release(root / "release", SECOND, seed=3, progress=False)
    paths = {}
    for quant in ("int8", "int4"):
        paths[quant] = root / quant
        convert_to_native(release, paths[quant], quant=quant, progress=False)
    return paths


def _torchrun(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.fixture(scope="module", params=[2, 4])
def run(request, second_models, tmp_path_factory):
    """One launch of N ranks running every multi-process check on the fixture and the second config."""
    n = request.param
    out = tmp_path_factory.mktemp(f"world{n}")
    models = [str(second_models["int8"])] + ([str(second_models["int4"])] if n == 4 else [])
    _torchrun(["--standalone", "--nproc-per-node", str(n), str(WORKER), str(out), str(FIXTURE), *models])
    return n, np.load(out / "results.npz"), json.loads((out / "results.json").read_text())


def assert_same_logits(ours: np.ndarray, single: torch.Tensor) -> None:
    """Within the float32 bound, argmax equal except at near-ties of the single-process logits."""
    assert relative_error(ours, single) <= F32_BOUND, relative_error(ours, single)
    differ = torch.from_numpy(ours).argmax(-1) != single.argmax(-1)
    assert bool((top2_margin(single)[differ] < NEAR_TIE).all())


def assert_same_greedy(ours: list[int], single: list[int], margins: list[float]) -> None:
    """Identical up to the first step where the single-process model's top two were a near-tie."""
    ties = [i for i, m in enumerate(margins) if m < NEAR_TIE]
    upto = ties[0] + 1 if ties else len(single)
    assert ours[:upto] == single[:upto]


@pytest.fixture(scope="module")
def single_f32_logits(official_f32, fixture_cases, fixture_arrays) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {case["name"]: official_f32(torch.from_numpy(fixture_arrays[case["tokens_key"]].astype(np.int64)))
                for case in fixture_cases}


def test_fixture_float32_logits(run, single_f32_logits, fixture_cases, fixture_arrays):
    n, arrays, _ = run
    for case in fixture_cases:
        ours = arrays[f"fixture_float32__{case['name']}"]
        official = fixture_arrays[case["logits_f32_key"]]
        assert relative_error(ours, official) <= F32_BOUND
        assert (ours.argmax(-1) == official.argmax(-1)).all()
        assert_same_logits(ours, single_f32_logits[case["name"]])


def test_fixture_bfloat16_logits(run, fixture_cases, fixture_arrays):
    n, arrays, _ = run
    for case in fixture_cases:
        ref16, ref32 = fixture_arrays[case["logits_bf16_key"]], fixture_arrays[case["logits_f32_key"]]
        gap = np.abs(ref16 - ref32).mean()
        for tag in ("bf16_exact", "bf16_fast"):
            ours = arrays[f"fixture_{tag}__{case['name']}"]
            assert np.abs(ours - ref16).mean() <= 2 * gap, (tag, case["name"])


def test_fixture_greedy_continuations(run, greedy):
    n, _, report = run
    assert report["fixture_greedy"] == greedy["argmax_loop"]["f32"]  # no near-tie on the fixture


def test_second_config(run, second_models):
    n, arrays, report = run
    for name, quant in (("second", "int8"), ("second_int4", "int4")):
        if f"{name}__logits" not in arrays:
            continue
        single = grok1.load(second_models[quant], dtype="float32")
        with torch.no_grad():
            assert_same_logits(arrays[f"{name}__logits"], single(second_tokens()))
        for prompt, ours in zip(SECOND_PROMPTS, report[f"{name}_greedy"], strict=True):
            tokens = grok1.generate(single, prompt, max_new_tokens=SECOND_NEW_TOKENS, temperature=0, ignore_eos=True)
            with torch.no_grad():
                steps = single(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1 :]
            assert_same_greedy(ours, tokens, top2_margin(steps).tolist())


def test_a_load_error_on_one_rank_stops_every_rank(run):
    n, _, report = run
    outcomes = report["one_rank_fails"]
    assert outcomes[1] == "CheckpointError (rank 1): a file only rank 1 reads is broken"
    others = [o for r, o in enumerate(outcomes) if r != 1]
    assert all(o.startswith("Grok1Error (rank None): rank(s) 1 could not load") for o in others)


def _replicated_bytes(model: grok1.Grok1, world_size: int) -> int:
    """Norms and routers, plus the k/v projections when the kv heads are replicated."""
    kv_replicated = model.config.num_kv_heads % world_size != 0
    total = 0
    for path, value in model.named_official_weights():
        if "norm" in path or "router" in path or (kv_replicated and ("/key/" in path or "/value/" in path)):
            tensors = [value] if isinstance(value, torch.Tensor) else list(value.buffers())
            total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def test_each_rank_holds_its_share_of_the_weights(run, official_f32, second_models):
    n, _, report = run
    for key, model in (("fixture_bytes", official_f32), ("second_bytes", grok1.load(second_models["int8"], dtype="float32"))):
        total, replicated = parallel.weight_bytes(model), _replicated_bytes(model, n)
        for held in report[key]:
            assert held <= 1.10 * total / n + replicated, (key, held, total)
            assert held >= 0.90 * (total - replicated) / n, (key, held, total)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_generate_via_cli(greedy):
    """torchrun --nnodes 2, one process per "node" on this host, running `-m grok1 generate`."""
    prompt = greedy["prompts"][2]
    port = _free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
               "-m", "grok1", "generate", "--model", str(FIXTURE), "--token-ids", ",".join(map(str, prompt)),
               "--temperature", "0", "--max-new-tokens", str(greedy["num_new_tokens"]), "--dtype", "float32",
               "--devices", "cpu", "--json", "--ignore-eos"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV))
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-4000:]
    result = json.loads(outputs[0][0])
    assert result["token_ids"] == greedy["argmax_loop"]["f32"][2]
    assert result["stats"]["ranks"] == 2
    assert outputs[1][0] == ""  # only rank 0 prints
