"""The batching engine in process: batched output equals solo output, rows join, leave and are reused."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from grok1.config import PRESETS
from grok1.engine import Engine, EngineStopped, Finished, QueueFull, Request, Token
from grok1.errors import Grok1Error
from grok1.generate import SamplingParams, generate_batch
from grok1.synth import random_model

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14], [20], [30, 31], [40, 41, 42, 43], [50, 51, 52, 53, 54, 55, 56, 57]]


@pytest.fixture(scope="module")
def tiny():
    return random_model(PRESETS["tiny"], seed=1, dtype=torch.float32)


@pytest.fixture()
def engine(tiny):
    eng = Engine(tiny, max_batch=4, max_queue=8)
    eng.start()
    yield eng
    eng.stop()


class Collector:
    """Gathers events per request index; `wait()` blocks until every sequence has finished."""

    def __init__(self, count: int) -> None:
        self.tokens: list[list[Token]] = [[] for _ in range(count)]
        self.finished: dict[int, Finished] = {}
        self.done = threading.Event()
        self.count = count

    def __call__(self, index: int, event) -> None:
        if isinstance(event, Token):
            self.tokens[index].append(event)
        else:
            self.finished[index] = event
            if len(self.finished) == self.count:
                self.done.set()

    def ids(self, index: int) -> list[int]:
        return [t.id for t in self.tokens[index]]

    def wait(self) -> Collector:
        assert self.done.wait(60), "the engine did not finish in time"
        return self


def run(engine: Engine, requests: list[Request]) -> Collector:
    collector = Collector(len(requests))
    engine.submit(requests, collector)
    return collector.wait()


def solo(model, request: Request) -> list[int]:
    return generate_batch(model, [request.prompt_ids], max_new_tokens=request.max_tokens, sampling=[request.sampling],
                          ignore_eos=True)[0].token_ids


def sampled(prompt: list[int], seed: int, max_tokens: int = 16) -> Request:
    return Request(prompt, max_tokens, SamplingParams(temperature=0.9, top_p=0.95, seed=seed), stop_ids=frozenset())


def test_batched_sequences_match_solo_generation(engine, tiny):
    requests = [sampled(p, seed) for seed, p in enumerate(PROMPTS)]  # 6 sequences through 4 rows
    out = run(engine, requests)
    for i, request in enumerate(requests):
        assert out.ids(i) == solo(tiny, request), i
        assert out.finished[i] == Finished("length", len(request.prompt_ids), 16)
    m = engine.metrics()
    assert m.running == 0 and m.waiting == 0 and m.finished["length"] == 6
    assert m.decode_rows > m.decode_steps  # rows really shared decode steps


def test_sequences_joining_mid_generation(engine, tiny):
    long_request = sampled(PROMPTS[5], 7, max_tokens=60)
    first = Collector(1)
    engine.submit([long_request], first)
    while len(first.tokens[0]) < 10:
        time.sleep(0.001)
    late = [sampled(PROMPTS[1], 8), sampled(PROMPTS[2], 9)]
    second = run(engine, late)
    first.wait()
    assert first.ids(0) == solo(tiny, long_request)
    for i, request in enumerate(late):
        assert second.ids(i) == solo(tiny, request)


def test_reused_rows_forget_the_previous_sequence(tiny):
    eng = Engine(tiny, max_batch=1, max_queue=4)
    eng.start()
    try:
        run(eng, [sampled(PROMPTS[5], 1, max_tokens=40)])  # fills row 0 up to position 47
        short = sampled(PROMPTS[2], 2, max_tokens=12)
        assert run(eng, [short]).ids(0) == solo(tiny, short)
        assert not eng._cache.key_valid[0, 13:].any()  # nothing of the first sequence is visible
    finally:
        eng.stop()


def test_greedy_stop_ids_and_logprobs(engine, tiny):
    greedy = Request(PROMPTS[0], 12, SamplingParams(temperature=0), stop_ids=frozenset(), logprobs=3)
    out = run(engine, [greedy])
    ids = out.ids(0)
    assert ids == solo(tiny, greedy)
    for token in out.tokens[0]:
        alternatives = token.top_logprobs
        assert len(alternatives) == 3 and alternatives[0][0] == token.id
        assert token.logprob == pytest.approx(alternatives[0][1])
        assert [lp for _, lp in alternatives] == sorted((lp for _, lp in alternatives), reverse=True)
    stop_at = ids[4]
    stopped = run(engine, [Request(PROMPTS[0], 12, SamplingParams(temperature=0), stop_ids=frozenset([stop_at]))])
    assert stopped.ids(0) == ids[: ids.index(stop_at) + 1]
    assert stopped.finished[0].reason == "stop"


def test_cancel_frees_the_row_for_a_waiting_sequence(tiny):
    eng = Engine(tiny, max_batch=1, max_queue=1)
    eng.start()
    try:
        first, second = Collector(1), Collector(1)
        [handle] = eng.submit([sampled(PROMPTS[0], 1, max_tokens=400)], first)
        while not first.tokens[0]:
            time.sleep(0.001)
        eng.submit([sampled(PROMPTS[1], 2, max_tokens=8)], second)
        with pytest.raises(QueueFull, match="capacity"):
            eng.submit([sampled(PROMPTS[2], 3)], Collector(1))
        assert eng.metrics().waiting == 1
        handle.cancel()
        first.wait()
        second.wait()
        assert first.finished[0].reason == "cancelled" and len(first.tokens[0]) < 400
        assert second.finished[0].reason == "length"
        m = eng.metrics()
        assert m.finished["cancelled"] == 1 and m.rejected == 1 and m.running == 0
    finally:
        eng.stop()


def test_invalid_requests_are_refused(engine):
    context = engine.context_len
    cases = [
        (Request([], 4), "empty"),
        (Request([5, 100000], 4), "outside the vocabulary"),
        (Request([5, 6], 0), "max_tokens"),
        (Request([5] * context, 1), "context"),
        (Request([5, 6], 4, SamplingParams(temperature=-1)), "temperature"),
    ]
    for request, message in cases:
        with pytest.raises(Grok1Error, match=message):
            engine.submit([request], Collector(1))
    assert engine.metrics().running == 0


def test_a_failing_step_ends_its_sequences_and_the_engine_goes_on(tiny, monkeypatch):
    eng = Engine(tiny, max_batch=2, max_queue=2)
    eng.start()
    try:
        calls = {"n": 0}
        forward = type(tiny).forward

        def flaky(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("simulated device error")
            return forward(self, *args, **kwargs)

        monkeypatch.setattr(type(tiny), "forward", flaky)
        out = run(eng, [sampled(PROMPTS[0], 1)])
        assert out.finished[0].reason == "error" and "simulated device error" in out.finished[0].error
        monkeypatch.setattr(type(tiny), "forward", forward)
        request = sampled(PROMPTS[1], 2)
        assert run(eng, [request]).ids(0) == solo(tiny, request)
        assert eng.metrics().alive
    finally:
        eng.stop()
    with pytest.raises(EngineStopped):
        eng.submit([sampled(PROMPTS[0], 1)], Collector(1))
