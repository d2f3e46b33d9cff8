"""`grok1 plan`: its arithmetic against figures worked out by hand for the released Grok-1."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from grok1 import plan
from grok1.config import GROK1, PRESETS
from grok1.errors import Grok1Error

# Grok-1, by hand. One layer:
#   attention int8 values: q 6144x6144 + k 6144x1024 + v 6144x1024 + o 6144x6144 = 88,080,384
#   attention bf16 scales: q 6144 + k 1024 + v 1024 + o 8 row blocks x 6144 = 57,344 values = 114,688 bytes
#   one expert int8: linear 6144x32768 + linear_v 6144x32768 + linear_1 32768x6144 = 603,979,776
#   one expert's bf16 scales: 32768 + 32768 + 8 x 6144 = 114,688 values = 229,376 bytes
#   router float32 6144x8x4 = 196,608; four norms float32 4x6144x4 = 98,304
ATTENTION = 88_080_384 + 114_688
EXPERT = 603_979_776 + 229_376
ROUTER_NORMS = 196_608 + 98_304
LAYER = ATTENTION + 8 * EXPERT + ROUTER_NORMS
EMBEDDING_F32 = 131_072 * 6144 * 4  # 3,221,225,472
FINAL_NORM = 6144 * 4
RELEASE = 64 * LAYER + EMBEDDING_F32 + FINAL_NORM
# A decoded token reads every layer's attention, router and norms, 2 of its 8 experts, the final norm,
# the output head (the bf16 table in a bf16 run) and one row of the input embedding.
ACTIVE_INT8_BF16_HEAD = 64 * (ATTENTION + 2 * EXPERT + ROUTER_NORMS) + FINAL_NORM + 131_072 * 6144 * 2 + 6144 * 2


def test_grok1_arithmetic():
    assert RELEASE == 318_239_694_848
    assert plan.release_bytes(GROK1) == RELEASE
    p = plan.parts(GROK1, "int8")
    assert p.per_expert == EXPERT
    assert p.active(2) == ACTIVE_INT8_BF16_HEAD == 84_612_780_032
    assert p.active(4) == ACTIVE_INT8_BF16_HEAD + 131_072 * 6144 * 2 + 6144 * 2  # float32 head: 86.2 GB
    assert p.weights(2) == RELEASE - 131_072 * 6144 * 2  # a bf16 run holds the bf16 table instead
    assert plan.native_bytes(GROK1, "int8") == RELEASE + 131_072 * 6144 * 2
    assert plan.kv_bytes_per_token(GROK1, 2) == 64 * 2 * 8 * 128 * 2 == 262_144
    assert plan.kv_bytes_per_token(GROK1, 2) * 8192 == 2 * 2**30
    # int4: half a byte per value plus a bf16 scale per 32 values; bf16: two bytes per value
    values = 64 * (88_080_384 + 8 * 603_979_776)
    assert plan.parts(GROK1, "int4").attention + plan.parts(GROK1, "int4").experts == values // 2 + values // 16
    assert plan.parts(GROK1, "bf16").attention + plan.parts(GROK1, "bf16").experts == 2 * values


def machine(**changes) -> plan.Machine:
    m = plan.Machine(ram=512 * 10**9, ram_source="given", ram_bandwidth=200e9, ram_bandwidth_source="given",
                     gpus=[("H100", 80 * 10**9)] * 8, gpu_source="given", gpu_bandwidth=3350e9,
                     gpu_bandwidth_source="given", disk_read=3e9, disk_source="given")
    for k, v in changes.items():
        setattr(m, k, v)
    return m


def test_placements_fit_and_roofline():
    by_name = {p.name: p for p in plan.placements(GROK1, "int8", machine(), 8192)}
    kv = 262_144 * 8192
    all_gpu = by_name["all on 8 GPUs"]
    assert all_gpu.fits and all_gpu.needs["gpu"] == RELEASE - 131_072 * 6144 * 2 + kv
    assert all_gpu.tokens_per_s == pytest.approx(3350e9 / ACTIVE_INT8_BF16_HEAD)
    assert by_name["all in RAM (CPU)"].tokens_per_s == pytest.approx(200e9 / ACTIVE_INT8_BF16_HEAD)
    hybrid = by_name["8 GPUs + CPU experts"]
    experts_active = 64 * 2 * EXPERT
    assert hybrid.tokens_per_s == pytest.approx(1 / ((ACTIVE_INT8_BF16_HEAD - experts_active) / 3350e9
                                                     + experts_active / 200e9))
    # 24 GB of RAM: only streaming fits; with no cache to speak of, expert bytes come at disk speed.
    small = {p.name: p for p in plan.placements(GROK1, "int8", machine(ram=24 * 10**9, gpus=[]), 8192)}
    assert set(small) == {"all in RAM (CPU)", "streamed from disk (--max-memory)"}
    assert not small["all in RAM (CPU)"].fits
    streamed = small["streamed from disk (--max-memory)"]
    assert streamed.fits
    resident = ACTIVE_INT8_BF16_HEAD - experts_active - 6144 * 2 + 0  # all but the experts (and the row)
    assert streamed.needs["ram"] == resident + kv + 2 * EXPERT
    cache = int(24e9 * 0.9) - resident - kv
    hit = cache / (64 * 8 * EXPERT)
    seconds = (ACTIVE_INT8_BF16_HEAD - experts_active + hit * experts_active) / 200e9 + (1 - hit) * experts_active / 3e9
    assert streamed.tokens_per_s == pytest.approx(1 / seconds)
    assert not {p.name: p for p in plan.placements(GROK1, "int8", machine(ram=8 * 10**9, gpus=[]), 8192)}[
        "streamed from disk (--max-memory)"].fits


def test_report_and_bad_input():
    r = plan.report(PRESETS["mid"], "int4", machine(disk_read=None), context=100)
    assert r["kv_bytes_at_context_bf16"] == 100 * plan.kv_bytes_per_token(PRESETS["mid"])
    assert {p["name"] for p in r["placements"] if p["tokens_per_s"] is None} == {"streamed from disk (--max-memory)"}
    with pytest.raises(Grok1Error, match="--context"):
        plan.report(GROK1, "int8", machine(), context=10_000)
    with pytest.raises(Grok1Error, match="quant"):
        plan.report(GROK1, "int3", machine())


def run_plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grok1", "plan", *args], capture_output=True, text=True)


def test_cli_prints_the_grok1_table():
    proc = run_plan("--preset", "grok-1", "--ram-bandwidth", "30", "--disk-read", "1.5")  # RAM, GPUs detected
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for fragment in ("318.24 GB (318,239,694,848 bytes)", "84.61 GB", "86.22 GB", "262,144 bytes = 256 KiB per token",
                     "2.00 GiB at the full 8192-token context", "GB = 10^9 bytes", "streamed from disk", "detected"):
        assert fragment in out, fragment
    as_json = json.loads(run_plan("--preset", "grok-1", "--ram", "64GB", "--gpu", "24GBx2", "--ram-bandwidth", "50",
                                  "--disk-read", "2", "--json").stdout)
    assert as_json["release_bytes"] == RELEASE and as_json["machine"]["ram"] == 64 * 10**9
    assert [p["fits"] for p in as_json["placements"]] == [False, False, False, True]
    bad = run_plan("--gpu", "lots")
    assert bad.returncode == 1 and bad.stderr.startswith("grok1: error:") and "--gpu" in bad.stderr
    assert "Traceback" not in bad.stderr
