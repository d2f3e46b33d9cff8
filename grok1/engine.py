"""Continuous batching: one thread owns the model and decodes every running request in one batch.

The engine keeps a KV cache of `max_batch` rows. A submitted sequence waits in a bounded queue
until a row is free; between two decode steps the engine prefills the newly admitted prompts
straight into their rows (contiguous rows together, through a view of the big cache), then samples
one token for every running row, each with its own `Sampler` (its own seeded generator), and runs
one decode step over all running rows, each at its own position. Free rows inside the batch are fed
the pad token at position 0, which touches nothing a running row can see. Sequences leave the batch
as soon as they finish or are cancelled, and their rows are reused (their key-valid flags cleared).

Because rows never see each other and each draws from its own generator, a request's tokens do not
depend on what else is running (up to floating-point differences between batch shapes, which only
matter where two logits nearly tie). The engine knows nothing about HTTP or text: it takes token
ids and reports `Token` and `Finished` events through a callback, from its own thread.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .errors import Grok1Error
from .generate import Sampler, SamplingParams
from .model import Grok1, KVCache

log = logging.getLogger("grok1.engine")

RATE_WINDOW_S = 10.0  # tokens per second are averaged over this window
FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass
class Request:
    """One sequence to generate from a prompt of token ids."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] | None = None  # token ids that end the sequence; None = the model's EOS
    logprobs: int | None = None  # None: none; k >= 0: each token's log-probability and the k most likely


@dataclass(frozen=True)
class Token:
    """A sampled token; log-probabilities are of the model's raw distribution (before temperature)."""

    id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass(frozen=True)
class Finished:
    """The last event of a sequence. reason: stop (a stop id was sampled), length, cancelled, error."""

    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = Token | Finished
EventCallback = Callable[[int, Event], None]


class QueueFull(Grok1Error):
    """The engine holds as many sequences as it accepts (running plus waiting)."""


class EngineStopped(Grok1Error):
    """The engine is not running (stopped, or failed to start)."""


class Handle:
    """A submitted sequence: `cancel()` frees its row (or its place in the queue) before the next step."""

    def __init__(self, engine: Engine, request: Request, index: int, on_event: EventCallback) -> None:
        self.request = request
        self.index = index
        self._engine = engine
        self._on_event = on_event
        self.sampler = Sampler(request.sampling)
        self.stop_ids = request.stop_ids if request.stop_ids is not None else frozenset([engine.config.eos_token])
        self.cancelled = False
        self.done = False
        # Set while the sequence holds a row (engine thread only).
        self.row = -1
        self.position = 0  # the next cache slot to write
        self.last = 0
        self.produced = 0
        self.logits: torch.Tensor | None = None

    def cancel(self) -> None:
        self._engine._cancel(self)

    def emit(self, event: Event) -> None:
        try:
            self._on_event(self.index, event)
        except Exception:  # a consumer that went away must not stop the engine
            log.exception("event callback failed")


@dataclass
class EngineMetrics:
    """A snapshot of the engine's state and counters."""

    max_batch: int
    max_queue: int
    running: int
    waiting: int
    prompt_tokens: int
    generation_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    decode_rows: int  # running rows summed over decode steps (mean batch = decode_rows / decode_steps)
    finished: dict[str, int]
    rejected: int
    tokens_per_second: float
    alive: bool

    @property
    def free_slots(self) -> int:
        return self.max_batch - self.running


class Engine:
    """Owns `model` from its own thread; `submit` sequences from any thread."""

    def __init__(
        self,
        model: Grok1,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        context_len: int | None = None,
        prefill_tokens: int = 8192,
    ) -> None:
        if max_batch < 1:
            raise Grok1Error(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise Grok1Error(f"max_queue must be >= 0, got {max_queue}")
        cfg = model.config
        if context_len is not None and not 1 <= context_len <= cfg.sequence_len:
            raise Grok1Error(f"context length must be in 1..{cfg.sequence_len}, got {context_len}")
        self.model = model
        self.config = cfg
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.context_len = context_len or cfg.sequence_len
        self.prefill_tokens = prefill_tokens  # padded prompt tokens prefilled together at most
        self._cond = threading.Condition()
        self._waiting: collections.deque[Handle] = collections.deque()
        self._rows: list[Handle | None] = [None] * max_batch
        self._running = 0
        self._cache: KVCache | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._started = threading.Event()
        self.error: str | None = None
        # counters
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._prefill_s = 0.0
        self._decode_s = 0.0
        self._decode_steps = 0
        self._decode_rows = 0
        self._finished = dict.fromkeys(FINISH_REASONS, 0)
        self._rejected = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    # ---- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Starts the engine thread and waits until its KV cache is allocated."""
        if self._thread is not None:
            raise Grok1Error("the engine is already started")
        self._thread = threading.Thread(target=self._main, name="grok1-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self.error is not None:
            raise EngineStopped(self.error)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stops after the current step; sequences still queued or running end as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---- requests -----------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Raises Grok1Error for a request the engine cannot run."""
        ids = request.prompt_ids
        if not ids:
            raise Grok1Error("the prompt is empty")
        vocab = self.config.vocab_size
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab:
                raise Grok1Error(f"token id {i!r} is outside the vocabulary 0..{vocab - 1}")
        if request.max_tokens < 1:
            raise Grok1Error(f"max_tokens must be >= 1, got {request.max_tokens}")
        if len(ids) + request.max_tokens > self.context_len:
            raise Grok1Error(
                f"the prompt ({len(ids)} tokens) plus max_tokens ({request.max_tokens}) is more than the "
                f"context of {self.context_len} tokens"
            )
        if request.logprobs is not None and not 0 <= request.logprobs <= vocab:
            raise Grok1Error(f"logprobs must be in 0..{vocab}, got {request.logprobs}")
        request.sampling.validate()

    def submit(self, requests: Sequence[Request], on_event: EventCallback) -> list[Handle]:
        """Queues sequences (all or none). `on_event(index, event)` is called from the engine thread
        with the index of the request in `requests`; every sequence ends with one `Finished`."""
        for request in requests:
            self.check(request)
        handles = [Handle(self, r, i, on_event) for i, r in enumerate(requests)]
        with self._cond:
            if not self.alive:
                raise EngineStopped(self.error or "the engine is not running")
            held = self._running + len(self._waiting)
            if held + len(handles) > self.max_batch + self.max_queue:
                self._rejected += 1
                raise QueueFull(
                    f"the server is at capacity ({self._running} running, {len(self._waiting)} waiting, "
                    f"{len(handles)} more asked for); try again later"
                )
            self._waiting.extend(handles)
            self._cond.notify_all()
        return handles

    def _cancel(self, handle: Handle) -> None:
        with self._cond:
            if not handle.done:
                handle.cancelled = True
                self._cond.notify_all()

    def metrics(self) -> EngineMetrics:
        with self._cond:
            now = time.monotonic()
            self._trim_recent(now)
            return EngineMetrics(
                max_batch=self.max_batch,
                max_queue=self.max_queue,
                running=self._running,
                waiting=len(self._waiting),
                prompt_tokens=self._prompt_tokens,
                generation_tokens=self._generation_tokens,
                prefill_seconds=self._prefill_s,
                decode_seconds=self._decode_s,
                decode_steps=self._decode_steps,
                decode_rows=self._decode_rows,
                finished=dict(self._finished),
                rejected=self._rejected,
                tokens_per_second=sum(n for _, n in self._recent) / RATE_WINDOW_S,
                alive=self.alive,
            )

    def _trim_recent(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
            self._recent.popleft()

    # ---- the engine thread ----------------------------------------------------------------------
    def _main(self) -> None:
        try:
            with torch.inference_mode():
                model = self.model
                self._cache = model.new_cache(self.max_batch, self.context_len)
                self._started.set()
                while True:
                    admitted = self._next_work()
                    if admitted is None:
                        break
                    try:
                        if admitted:
                            self._prefill(admitted)
                        self._sample()
                        if self._running:
                            self._decode()
                    except Exception as exc:
                        log.exception("engine step failed")
                        self._fail_running(f"internal error in the engine: {type(exc).__name__}: {exc}")
        except BaseException as exc:
            self.error = f"the engine failed: {type(exc).__name__}: {exc}"
            log.exception("engine thread failed")
        finally:
            self._started.set()
            with self._cond:
                self._stopping = True
                leftovers = list(self._waiting) + [h for h in self._rows if h is not None]
                self._waiting.clear()
            for handle in leftovers:
                self._finish(handle, "cancelled" if self.error is None else "error", self.error)

    def _next_work(self) -> list[Handle] | None:
        """Frees the rows of cancelled sequences, admits waiting ones into free rows, and blocks while
        idle. Returns the admitted sequences, or None when the engine is stopping."""
        while True:
            with self._cond:
                if self._stopping:
                    return None
                cancelled = [h for h in self._rows if h is not None and h.cancelled]
                cancelled += [h for h in self._waiting if h.cancelled]
                if cancelled:
                    self._waiting = collections.deque(h for h in self._waiting if not h.cancelled)
                events = [(h, self._release(h, "cancelled")) for h in cancelled]
                admitted = self._admit()
                if not events and not admitted and not self._running:
                    self._cond.wait()
                    continue
            for handle, event in events:
                handle.emit(event)
            if admitted or self._running:
                return admitted

    def _admit(self) -> list[Handle]:
        """Moves waiting sequences into the lowest free rows (keeps the running rows compact), up to
        the prefill token budget. Called with the lock held."""
        admitted: list[Handle] = []
        longest = 0
        free = [row for row, h in enumerate(self._rows) if h is None]
        while self._waiting and free:
            handle = self._waiting[0]
            longest_next = max(longest, len(handle.request.prompt_ids))
            if admitted and longest_next * (len(admitted) + 1) > self.prefill_tokens:
                break
            self._waiting.popleft()
            longest = longest_next
            handle.row = free.pop(0)
            self._rows[handle.row] = handle
            self._running += 1
            admitted.append(handle)
        return admitted

    def _prefill(self, admitted: list[Handle]) -> None:
        """Runs the new prompts, contiguous rows together, writing their keys straight into their rows."""
        cache, cfg, device = self._cache, self.config, self.model.device
        admitted = sorted(admitted, key=lambda h: h.row)
        runs: list[list[Handle]] = []
        for handle in admitted:
            if runs and runs[-1][-1].row + 1 == handle.row:
                runs[-1].append(handle)
            else:
                runs.append([handle])
        started = time.perf_counter()
        for run in runs:
            first = run[0].row
            view = cache.view_rows(first, first + len(run))
            view.key_valid.fill_(False)  # the rows may hold an earlier sequence
            lengths = [len(h.request.prompt_ids) for h in run]
            tokens = torch.full((len(run), max(lengths)), cfg.pad_token, dtype=torch.long)
            for i, handle in enumerate(run):
                tokens[i, : lengths[i]] = torch.tensor(handle.request.prompt_ids, dtype=torch.long)
            logits = self.model(
                tokens.to(device),
                cache=view,
                start_pos=torch.zeros(len(run), dtype=torch.long, device=device),
                logits_index=torch.tensor([n - 1 for n in lengths], device=device),
            )[:, 0].cpu()
            for i, handle in enumerate(run):
                handle.logits = logits[i]
                handle.position = lengths[i]
        elapsed = time.perf_counter() - started
        with self._cond:
            self._prefill_s += elapsed
            self._prompt_tokens += sum(len(h.request.prompt_ids) for h in admitted)

    def _sample(self) -> None:
        """One token for every running row; finished rows leave the batch."""
        sampled = 0
        for handle in self._rows:
            if handle is None or handle.logits is None:
                continue
            logits, handle.logits = handle.logits, None
            token = handle.sampler(logits)
            event = Token(token)
            k = handle.request.logprobs
            if k is not None:
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                top = torch.topk(logprobs, k) if k else None
                event = Token(
                    token,
                    float(logprobs[token]),
                    list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else [],
                )
            handle.produced += 1
            handle.last = token
            sampled += 1
            handle.emit(event)
            if token in handle.stop_ids:
                self._finish(handle, "stop")
            elif handle.produced >= handle.request.max_tokens:
                self._finish(handle, "length")
        with self._cond:
            self._generation_tokens += sampled
            now = time.monotonic()
            self._recent.append((now, sampled))
            self._trim_recent(now)

    def _decode(self) -> None:
        """One step over rows 0..highest running row; free rows get a pad token at position 0."""
        running = [h for h in self._rows if h is not None]
        width = max(h.row for h in running) + 1
        tokens = torch.full((width, 1), self.config.pad_token, dtype=torch.long)
        positions = torch.zeros(width, dtype=torch.long)
        for handle in running:
            tokens[handle.row, 0] = handle.last
            positions[handle.row] = handle.position
        cache = self._cache if width == self.max_batch else self._cache.view_rows(0, width)
        device = self.model.device
        started = time.perf_counter()
        logits = self.model(tokens.to(device), cache=cache, start_pos=positions.to(device))[:, -1].cpu()
        elapsed = time.perf_counter() - started
        for handle in running:
            handle.logits = logits[handle.row]
            handle.position += 1
        with self._cond:
            self._decode_s += elapsed
            self._decode_steps += 1
            self._decode_rows += len(running)

    def _finish(self, handle: Handle, reason: str, error: str | None = None) -> None:
        with self._cond:
            event = self._release(handle, reason, error)
        if event is not None:
            handle.emit(event)

    def _release(self, handle: Handle, reason: str, error: str | None = None) -> Finished | None:
        """Frees the sequence's row and counts it; returns its last event (None if already done).
        Called with the lock held."""
        if handle.done:
            return None
        handle.done = True
        handle.logits = None
        if handle.row >= 0 and self._rows[handle.row] is handle:
            self._rows[handle.row] = None
            self._running -= 1
        self._finished[reason] += 1
        return Finished(reason, len(handle.request.prompt_ids), handle.produced, error)

    def _fail_running(self, message: str) -> None:
        for handle in [h for h in self._rows if h is not None]:
            self._finish(handle, "error", message)


__all__ = ["Engine", "EngineMetrics", "EngineStopped", "Finished", "Handle", "QueueFull", "Request", "Token"]
