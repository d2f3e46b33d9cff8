"""Generation: batched prefill into a static KV cache, one-token decode steps, sampling, streaming.

Sampling follows the official `sample_token` semantics: temperature, then the nucleus filter
(keep every token whose logit is >= the logit at which the ascending cumulative probability
first reaches 1 - top_p, ties included), then a Gumbel-max draw. Each row draws from its own
seeded generator, so a request gives the same tokens alone or in a batch. Temperature 0 is greedy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import Grok1Error
from .model import Grok1


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None

    def validate(self) -> None:
        if not (self.temperature >= 0):
            raise Grok1Error(f"temperature must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise Grok1Error(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise Grok1Error(f"top_k must be >= 0, got {self.top_k}")


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and the official nucleus filter on one row of float32 logits [V]."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ascending = torch.sort(logits).values
        cumulative = torch.cumsum(torch.softmax(ascending, dim=-1), dim=-1)
        threshold_index = int(torch.searchsorted(cumulative, torch.tensor([1.0 - params.top_p], device=cumulative.device)))
        threshold_index = min(threshold_index, ascending.shape[-1] - 1)
        logits = logits.masked_fill(logits < ascending[threshold_index], float("-inf"))
    return logits


class Sampler:
    """One row's sampler with its own random stream."""

    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        if self.params.temperature == 0:
            return int(torch.argmax(logits))
        filtered = filter_logits(logits.float(), self.params)
        uniform = torch.rand(filtered.shape, generator=self.generator, dtype=torch.float32)
        uniform = uniform.clamp_(min=torch.finfo(torch.float32).tiny, max=1.0 - 2**-24)
        gumbel = -torch.log(-torch.log(uniform))
        return int(torch.argmax(filtered.cpu() + gumbel))


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass
class Generation:
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS) or "length"


def _check_prompts(model: Grok1, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    vocab = model.config.vocab_size
    checked = []
    for n, prompt in enumerate(prompts):
        ids = [int(i) for i in prompt]
        if not ids:
            raise Grok1Error(f"prompt {n} is empty")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise Grok1Error(f"prompt {n}: token id {bad[0]} is outside the vocabulary 0..{vocab - 1}")
        if len(ids) > model.config.sequence_len:
            raise Grok1Error(
                f"prompt {n} has {len(ids)} tokens, more than the context of {model.config.sequence_len}"
            )
        checked.append(ids)
    return checked


@torch.inference_mode()
def stream_batch(
    model: Grok1,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: SamplingParams | Sequence[SamplingParams] | None = None,
    stop_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    stats: GenerationStats | None = None,
) -> Iterator[tuple[int, int]]:
    """Yields (row, token id) as each row produces tokens; rows stop independently.

    Prompts of different lengths share one batch: each row has its own positions in the cache.
    """
    if max_new_tokens < 0:
        raise Grok1Error(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    prompts = _check_prompts(model, prompts)
    cfg = model.config
    batch = len(prompts)
    if sampling is None:
        sampling = SamplingParams()
    params = [sampling] * batch if isinstance(sampling, SamplingParams) else list(sampling)
    if len(params) != batch:
        raise Grok1Error(f"{len(params)} sampling settings for {batch} prompts")
    samplers = [Sampler(p) for p in params]
    stops = set() if ignore_eos else set(stop_ids if stop_ids is not None else [cfg.eos_token])
    stats = stats if stats is not None else GenerationStats()
    lengths = [len(p) for p in prompts]
    # Generation ends at the context length, as the official runner's max_len does.
    budgets = [min(max_new_tokens, cfg.sequence_len - n) for n in lengths]
    if max(budgets) <= 0:
        return
    device = model.device
    cache_len = max(n + b for n, b in zip(lengths, budgets, strict=True))
    cache = model.new_cache(batch, cache_len)

    longest = max(lengths)
    tokens = torch.full((batch, longest), cfg.pad_token, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.tensor(prompt)
    started = time.perf_counter()
    logits = model(
        tokens.to(device),
        cache=cache,
        start_pos=torch.zeros(batch, dtype=torch.long, device=device),
        logits_index=torch.tensor([n - 1 for n in lengths], device=device),
    )[:, 0]
    logits = logits.cpu()
    stats.prefill_s += time.perf_counter() - started
    stats.prompt_tokens += sum(lengths)

    produced = [0] * batch
    active = [b > 0 for b in budgets]
    positions = list(lengths)  # next cache slot of each row
    last = [cfg.pad_token] * batch
    while True:
        for row in range(batch):
            if not active[row]:
                continue
            token = samplers[row](logits[row])
            produced[row] += 1
            stats.new_tokens += 1
            last[row] = token
            yield row, token
            if token in stops or produced[row] >= budgets[row]:
                active[row] = False
        if not any(active):
            return
        step_tokens = torch.tensor([[t] for t in last], dtype=torch.long)
        # Finished rows rewrite their last slot with a pad token: harmless, and keeps shapes static.
        step_pos = torch.tensor([min(p, cache_len - 1) for p in positions], dtype=torch.long)
        for row in range(batch):
            if not active[row]:
                step_tokens[row, 0] = cfg.pad_token
        started = time.perf_counter()
        logits = model(step_tokens.to(device), cache=cache, start_pos=step_pos.to(device))[:, -1].cpu()
        stats.decode_s += time.perf_counter() - started
        stats.decode_steps += 1
        positions = [p + 1 if active[r] else p for r, p in enumerate(positions)]


def generate_batch(
    model: Grok1,
    prompts: Sequence[Sequence[int]],
    **kwargs,
) -> list[Generation]:
    results = [Generation(list(p)) for p in prompts]
    ignore_eos = kwargs.get("ignore_eos", False)
    stop_ids = kwargs.get("stop_ids")
    stops = set() if ignore_eos else set(stop_ids if stop_ids is not None else [model.config.eos_token])
    for row, token in stream_batch(model, prompts, **kwargs):
        results[row].token_ids.append(token)
    for r in results:
        if r.token_ids and r.token_ids[-1] in stops:
            r.finish_reason = "stop"
        else:
            r.finish_reason = "length"
    return results


def generate(model: Grok1, prompt_ids: Sequence[int], **kwargs) -> list[int]:
    """New token ids for one prompt. Keyword arguments as `stream`."""
    return list(stream(model, prompt_ids, **kwargs))


def stream(
    model: Grok1,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yields new token ids for one prompt as they are sampled."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    for _, token in stream_batch(
        model,
        [prompt_ids],
        max_new_tokens=max_new_tokens,
        sampling=params,
        stop_ids=stop_ids,
        ignore_eos=ignore_eos,
        stats=stats,
    ):
        yield token


class StopStringFilter:
    """Holds back streamed text that could be the start of a stop string; reports when one appears."""

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self.stops = [s for s in stop_strings if s]
        self.buffer = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.buffer = self.buffer[: min(hits)], ""
            return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.buffer)), 0, -1):
                if self.buffer.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold :]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out
