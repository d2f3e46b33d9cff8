"""Shared test helpers. Reference data is read in place from ../shared (beside the clone)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURE = SHARED / "fixtures" / "official-tiny"
TOKENIZER_DIR = SHARED / "grok-1-tokenizer"

if not FIXTURE.is_dir():  # fail loudly: these checks are the project's definition of correct
    raise RuntimeError(f"reference data not found at {SHARED}; it must sit beside the repository as ../shared")

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def fixture_cases() -> list[dict]:
    return json.loads((FIXTURE / "cases.json").read_text())["cases"]


@pytest.fixture(scope="session")
def fixture_arrays():
    return np.load(FIXTURE / "cases.npz")


@pytest.fixture(scope="session")
def greedy() -> dict:
    return json.loads((FIXTURE / "greedy.json").read_text())


@pytest.fixture(scope="session")
def official_f32():
    import grok1

    return grok1.load(FIXTURE, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def official_bf16():
    import grok1

    return grok1.load(FIXTURE, dtype="bfloat16", device="cpu", exact=True)


def relative_error(ours: torch.Tensor | np.ndarray, ref: torch.Tensor | np.ndarray) -> float:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))


def top2_margin(logits: torch.Tensor) -> torch.Tensor:
    top = torch.topk(logits.float(), 2, dim=-1).values
    return top[..., 0] - top[..., 1]
