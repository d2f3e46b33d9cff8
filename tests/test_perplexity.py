"""Perplexity and reference comparisons."""

from __future__ import annotations

import math

import torch

from grok1.config import PRESETS
from grok1.perplexity import evaluate, windows
from grok1.synth import random_model


def test_windows():
    assert list(windows(list(range(10)), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(windows(list(range(9)), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_perplexity_equals_direct_computation():
    model = random_model(PRESETS["tiny"], seed=3, dtype=torch.float32)
    ids = torch.randint(1, 512, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    result = evaluate(model, ids, context=16)
    nll, count = 0.0, 0
    for start in range(0, 39, 16):
        chunk = torch.tensor([ids[start : start + 16]])
        if chunk.shape[1] < 2:
            continue
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk)[0, :-1], dim=-1)
        nll -= float(logp[torch.arange(chunk.shape[1] - 1), chunk[0, 1:]].sum())
        count += chunk.shape[1] - 1
    assert result["tokens"] == count == 15 + 15 + 7  # each window predicts all but its first token
    assert math.isclose(result["perplexity"], math.exp(nll / count), rel_tol=1e-5)


def test_reference_against_itself_and_a_perturbed_copy():
    model = random_model(PRESETS["tiny"], seed=3, dtype=torch.float32)
    ids = torch.randint(1, 512, (33,), generator=torch.Generator().manual_seed(1)).tolist()
    same = evaluate(model, ids, context=32, reference=model)
    assert same["mean_kl"] < 1e-6 and same["top1_agreement"] == 1.0
    other = random_model(PRESETS["tiny"], seed=3, dtype=torch.bfloat16)
    other.use_fast_kernels(True)
    diff = evaluate(other, ids, context=32, reference=model)
    assert diff["mean_kl"] > 0 and math.isclose(diff["reference_perplexity"], same["perplexity"], rel_tol=1e-5)
