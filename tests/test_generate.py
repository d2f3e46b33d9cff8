"""Sampling semantics, reproducibility, stopping."""

from __future__ import annotations

import pytest
import torch

from grok1.config import PRESETS
from grok1.errors import Grok1Error
from grok1.generate import Sampler, SamplingParams, StopStringFilter, filter_logits, generate, generate_batch
from grok1.synth import random_model


@pytest.fixture(scope="module")
def tiny():
    return random_model(PRESETS["tiny"], seed=1, dtype=torch.float32)


def kept(logits, **kw) -> list[int]:
    out = filter_logits(torch.tensor(logits), SamplingParams(temperature=1.0, **kw))
    return [i for i, v in enumerate(out.tolist()) if v != float("-inf")]


def test_nucleus_follows_official_semantics():
    logits = [3.0, 2.0, 1.0, 0.0]  # probabilities 0.644, 0.237, 0.087, 0.032
    assert kept(logits, top_p=0.5) == [0]
    assert kept(logits, top_p=0.7) == [0, 1]
    assert kept(logits, top_p=0.9) == [0, 1, 2]
    assert kept(logits, top_p=1.0) == [0, 1, 2, 3]
    assert kept([2.0, 2.0, 0.0], top_p=0.3) == [0, 1]  # ties with the threshold logit are kept


def test_top_k():
    assert kept([0.5, 3.0, 1.0, 2.0], top_k=2) == [1, 3]


def test_temperature_zero_is_greedy():
    assert Sampler(SamplingParams(temperature=0))(torch.tensor([0.1, 5.0, 4.9])) == 1


def test_sampling_frequencies_follow_softmax():
    sampler = Sampler(SamplingParams(temperature=1.0, seed=0))
    logits = torch.tensor([0.0, 1.0, 2.0])
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sampler(logits)] += 1
    expected = torch.softmax(logits, 0)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.03)


def test_invalid_sampling_parameters():
    for params in (SamplingParams(temperature=-1), SamplingParams(top_p=0), SamplingParams(top_p=1.5), SamplingParams(top_k=-2)):
        with pytest.raises(Grok1Error):
            params.validate()


def test_seed_reproducibility(tiny):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, ignore_eos=True)
    a = generate(tiny, [5, 6, 7], seed=42, **kw)
    b = generate(tiny, [5, 6, 7], seed=42, **kw)
    c = generate(tiny, [5, 6, 7], seed=43, **kw)
    assert a == b and len(a) == 12
    assert a != c


def test_seeded_rows_sample_the_same_alone_or_in_a_batch(tiny):
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20]]
    params = [SamplingParams(temperature=0.9, seed=s) for s in (1, 2, 3)]
    batch = generate_batch(tiny, prompts, max_new_tokens=10, sampling=params, ignore_eos=True)
    for prompt, p, result in zip(prompts, params, batch, strict=True):
        alone = generate_batch(tiny, [prompt], max_new_tokens=10, sampling=[p], ignore_eos=True)[0]
        assert result.token_ids == alone.token_ids


def test_stops_on_eos_unless_ignored(tiny):
    greedy = generate(tiny, [5, 6, 7], max_new_tokens=10, temperature=0, ignore_eos=True)
    stop_at = greedy[3]
    stopped = generate(tiny, [5, 6, 7], max_new_tokens=10, temperature=0, stop_ids=[stop_at])
    assert stopped == greedy[: greedy.index(stop_at) + 1]
    result = generate_batch(tiny, [[5, 6, 7]], max_new_tokens=10, sampling=SamplingParams(temperature=0), stop_ids=[stop_at])[0]
    assert result.finish_reason == "stop"


def test_generation_stops_at_the_context_length(tiny):
    context = tiny.config.sequence_len
    out = generate(tiny, [5] * (context - 3), max_new_tokens=10, temperature=0, ignore_eos=True)
    assert len(out) == 3


def test_bad_prompts(tiny):
    with pytest.raises(Grok1Error, match="outside the vocabulary"):
        generate(tiny, [5, 100000], max_new_tokens=2)
    with pytest.raises(Grok1Error, match="empty"):
        generate(tiny, [], max_new_tokens=2)
    with pytest.raises(Grok1Error, match="more than the context"):
        generate(tiny, [5] * (tiny.config.sequence_len + 1), max_new_tokens=2)


def test_stop_string_filter_holds_back_partial_matches():
    f = StopStringFilter(["<stop>"])
    pieces = [f.push(c) for c in "Hello <st"]
    assert "".join(pieces) == "Hello "
    assert f.push("op> world") == ""
    assert f.stopped
    g = StopStringFilter(["<stop>"])
    assert g.push("a <s") == "a " and g.push("x") == "<sx" and g.flush() == ""
