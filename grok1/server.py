"""`grok1 serve`: an OpenAI-compatible HTTP API over the batching engine (`grok1.engine`).

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions,
GET /health, GET /metrics (Prometheus text). Requests are validated here, token by token output is
turned into text here (incremental UTF-8 decoding, stop strings); the engine thread only sees token
ids. Every error a client can cause is answered with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}` and a 4xx status. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .engine import Engine, EngineStopped, Finished, Handle, QueueFull, Token
from .engine import Request as EngineRequest
from .errors import Grok1Error
from .generate import SamplingParams, StopStringFilter
from .tokenizer import Tokenizer

log = logging.getLogger("grok1.server")

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_STOP_STRINGS = 16
MAX_N = 16
MAX_LOGPROBS = 20
DEFAULT_COMPLETION_TOKENS = 16  # as the OpenAI completions API; chat defaults to the rest of the context

# Grok-1 is a base model: chat turns are laid out as a plain transcript and the reply is what the
# model writes after the final "Assistant:". It stops where it would start the user's next turn.
CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
CHAT_TURN_SEPARATOR = "\n\n"
CHAT_STOP_STRINGS = ["\n\nUser:", "\nUser:", "\n\nSystem:", "\nSystem:"]


def render_chat(messages: list[tuple[str, str]]) -> str:
    """The prompt for a list of (role, text) turns: `Role: text` blocks, then `Assistant:`."""
    turns = [f"{CHAT_ROLES[role]}: {text}" for role, text in messages]
    return CHAT_TURN_SEPARATOR.join([*turns, "Assistant:"])


# ---- errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": "1"} if self.status in (429, 503) else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- request fields -------------------------------------------------------------------------------


def _integer(body: dict, name: str, default: int | None, lo: int | None = None, hi: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"'{name}' must be an integer, got {_shown(value)}", param=name, code="invalid_type")
    if lo is not None and value < lo:
        raise ApiError(f"'{name}' must be at least {lo}, got {value}", param=name, code="invalid_value")
    if hi is not None and value > hi:
        raise ApiError(f"'{name}' must be at most {hi}, got {value}", param=name, code="invalid_value")
    return value


def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ApiError(f"'{name}' must be a number, got {_shown(value)}", param=name, code="invalid_type")
    if value < lo or (lo_open and value == lo) or value > hi:
        bounds = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ApiError(f"'{name}' must be in {bounds}, got {value}", param=name, code="invalid_value")
    return float(value)


def _boolean(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"'{name}' must be a boolean, got {_shown(value)}", param=name, code="invalid_type")
    return value


def _stop_strings(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ApiError(f"'stop' must be a string or a list of strings, got {_shown(value)}", param="stop",
                       code="invalid_type")
    if len(value) > MAX_STOP_STRINGS:
        raise ApiError(f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(value)}", param="stop",
                       code="invalid_value")
    return [s for s in value if s]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# OpenAI options this server does not implement, accepted only at their no-op values.
UNSUPPORTED: list[tuple[str, Callable[[Any], bool]]] = [
    ("presence_penalty", lambda v: v == 0),
    ("frequency_penalty", lambda v: v == 0),
    ("logit_bias", lambda v: v == {}),
    ("best_of", lambda v: v == 1),
    ("echo", lambda v: v is False),
    ("suffix", lambda v: v == ""),
    ("tools", lambda v: v == []),
    ("functions", lambda v: v == []),
    ("response_format", lambda v: isinstance(v, dict) and v.get("type") == "text"),
]


@dataclass
class Generation:
    """A validated generation request: one or more prompts, each answered `n` times."""

    prompts: list[list[int]]
    prompt_chars: list[int]  # length of each prompt's text (0 for token-id prompts), for text_offset
    n: int
    stop: list[str]
    stream: bool
    include_usage: bool
    logprobs: int | None
    return_token_ids: bool
    chat: bool = False
    sequences: list[EngineRequest] = field(default_factory=list)


# ---- output assembly ------------------------------------------------------------------------------


class TextStream:
    """Token ids in, text out: incremental decoding, stop strings, optional leading-space trim."""

    def __init__(self, tokenizer: Tokenizer, stops: list[str], strip_leading: bool) -> None:
        self.decoder = tokenizer.stream_decoder(at_start=False)
        self.filter = StopStringFilter(stops)
        self.strip_leading = strip_leading

    def push(self, token: int) -> str:
        return self._out(self.filter.push(self.decoder.push(token)))

    def finish(self) -> str:
        return self._out(self.filter.push(self.decoder.flush()) + self.filter.flush())

    @property
    def stopped(self) -> bool:
        return self.filter.stopped

    def _out(self, text: str) -> str:
        if self.strip_leading:
            text = text.lstrip()
            self.strip_leading = not text
        return text


@dataclass
class Choice:
    index: int
    text: TextStream
    offset: int  # characters of prompt and output so far, for text_offset
    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Token] = field(default_factory=list)
    finish_reason: str | None = None


class GenerationFailed(Exception):
    pass


class TokenText:
    """How tokens are shown in logprobs: their text, or `bytes:\\xNN` for a partial UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        found = self._cache.get(token)
        if found is None:
            data = self.tokenizer.piece_bytes(token)
            if not data and 0 <= token < self.tokenizer.vocab_size:
                text = self.tokenizer.sp.id_to_piece(token)  # a control token such as EOS
            else:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError:
                    text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
            found = self._cache[token] = (text, list(data))
        return found


# ---- the app --------------------------------------------------------------------------------------


class _EventStream(StreamingResponse):
    """Server-sent events that run `on_close` however the stream ends (finished, failed, client gone)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[override]
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class HttpCounter:
    """Pure ASGI middleware counting answered requests by endpoint and status (for /metrics)."""

    def __init__(self, app, known_paths: set[str], counts: dict[tuple[str, int], int]) -> None:
        self.app = app
        self.known_paths = known_paths
        self.counts = counts

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in self.known_paths else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")

        started = False

        def count(status: int) -> None:
            key = (endpoint, status)
            self.counts[key] = self.counts.get(key, 0) + 1

        async def counting_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                count(int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                count(500)  # answered by Starlette's outermost error middleware, outside this one
            raise


class OpenAIApi:
    """Request parsing, generation and response formatting for one served model."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_name: str, api_key: str | None = None) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.context = engine.context_len
        self.created = int(time.time())
        self.token_text = TokenText(tokenizer)
        self.fingerprint = f"grok1-{__version__}-{str(engine.model.activation_dtype).removeprefix('torch.')}"

    # ---- requests ---------------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if not header:
            raise ApiError("missing API key: send it as 'Authorization: Bearer KEY'", status=401,
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise ApiError("incorrect API key provided", status=401, code="invalid_api_key")

    async def read_body(self, request: Request) -> dict[str, Any]:
        """The authorized request's JSON object, for the served model."""
        self.authorize(request)
        too_large = ApiError(f"the request body is larger than {MAX_BODY_BYTES} bytes", status=413,
                             code="request_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            raise too_large
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise too_large
        if not raw.strip():
            raise ApiError("the request body is empty; send a JSON object", code="invalid_json")

        def no_constants(name: str) -> Any:
            raise ValueError(f"{name} is not valid JSON")

        try:
            body = json.loads(raw, parse_constant=no_constants)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(f"could not parse the JSON body of the request: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
        model = body.get("model")
        if model is None:
            raise ApiError("'model' is required", param="model", code="missing_required_parameter")
        if not isinstance(model, str):
            raise ApiError(f"'model' must be a string, got {_shown(model)}", param="model", code="invalid_type")
        self.check_model(model)
        return body

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise ApiError(f"the model '{model}' does not exist; this server serves '{self.model_name}'", status=404,
                           param="model", code="model_not_found")

    def _encode(self, text: str, param: str) -> list[int]:
        ids = self.tokenizer.encode(text)
        if not ids:
            raise ApiError(f"'{param}' encodes to no tokens", param=param, code="invalid_value")
        return ids

    def _completion_prompts(self, body: dict) -> tuple[list[list[int]], list[int]]:
        value = body.get("prompt")
        if value is None:
            raise ApiError("'prompt' is required", param="prompt", code="missing_required_parameter")
        kinds = "a string, a list of strings, a list of token ids or a list of lists of token ids"
        if isinstance(value, str):
            return [self._encode(value, "prompt")], [len(value)]
        if not isinstance(value, list) or not value:
            raise ApiError(f"'prompt' must be {kinds}, got {_shown(value)}", param="prompt", code="invalid_type")
        if all(isinstance(v, str) for v in value):
            return [self._encode(v, "prompt") for v in value], [len(v) for v in value]
        if all(_is_int(v) for v in value):
            value = [value]
        elif not all(isinstance(v, list) and v and all(_is_int(i) for i in v) for v in value):
            raise ApiError(f"'prompt' must be {kinds}, got {_shown(value)}", param="prompt", code="invalid_type")
        vocab = self.engine.config.vocab_size
        for ids in value:
            bad = [i for i in ids if not 0 <= i < vocab]
            if bad:
                raise ApiError(f"'prompt' holds token id {bad[0]}, outside the vocabulary 0..{vocab - 1}",
                               param="prompt", code="invalid_value")
        return value, [0] * len(value)

    def _chat_prompt(self, body: dict) -> tuple[list[list[int]], list[int]]:
        messages = body.get("messages")
        if messages is None:
            raise ApiError("'messages' is required", param="messages", code="missing_required_parameter")
        if not isinstance(messages, list) or not messages:
            raise ApiError(f"'messages' must be a non-empty list, got {_shown(messages)}", param="messages",
                           code="invalid_type")
        turns = []
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                raise ApiError(f"'{where}' must be an object, got {_shown(message)}", param=where, code="invalid_type")
            role = message.get("role")
            if role not in CHAT_ROLES:
                raise ApiError(f"'{where}.role' must be one of {', '.join(CHAT_ROLES)}, got {_shown(role)}",
                               param=f"{where}.role", code="invalid_value")
            content = message.get("content")
            if isinstance(content, list):
                parts = []
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise ApiError(f"'{where}.content[{j}]' must be a text part "
                                       "({\"type\": \"text\", \"text\": ...}); only text is supported",
                                       param=f"{where}.content", code="invalid_value")
                    parts.append(part["text"])
                content = "".join(parts)
            if not isinstance(content, str):
                raise ApiError(f"'{where}.content' must be a string or a list of text parts, got {_shown(content)}",
                               param=f"{where}.content", code="invalid_type")
            turns.append((role, content))
        prompt = render_chat(turns)
        return [self._encode(prompt, "messages")], [len(prompt)]

    def parse(self, body: dict, chat: bool) -> Generation:
        """Validates a completions (or chat completions) body into engine requests."""
        prompts, chars = self._chat_prompt(body) if chat else self._completion_prompts(body)
        for name, neutral in UNSUPPORTED:
            value = body.get(name)
            if value is not None and not neutral(value):
                raise ApiError(f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
        n = _integer(body, "n", 1, 1, MAX_N)
        capacity = self.engine.max_batch + self.engine.max_queue
        if len(prompts) * n > capacity:
            raise ApiError(f"{len(prompts)} prompt(s) x n={n} is more sequences than this server holds ({capacity})",
                           param="n", code="invalid_value")
        max_tokens = _integer(body, "max_tokens", None, 1)
        if chat and max_tokens is None:
            max_tokens = _integer(body, "max_completion_tokens", None, 1)
        context = self.context
        budgets = []
        for ids in prompts:
            if len(ids) >= context:
                raise ApiError(f"the prompt has {len(ids)} tokens; this model's context is {context} tokens, and at "
                               "least one must be left for the completion",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
            if max_tokens is None:
                budgets.append(context - len(ids) if chat else min(DEFAULT_COMPLETION_TOKENS, context - len(ids)))
            elif len(ids) + max_tokens > context:
                raise ApiError(f"this model's maximum context length is {context} tokens; you asked for "
                               f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} for the completion); "
                               "reduce the prompt or max_tokens", param="max_tokens", code="context_length_exceeded")
            else:
                budgets.append(max_tokens)
        temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
        top_k = _integer(body, "top_k", 0, -1)
        seed = _integer(body, "seed", None, -(2**63), 2**63 - 1)
        stream = _boolean(body, "stream", False)
        options = body.get("stream_options")
        include_usage = False
        if options is not None:
            if not stream:
                raise ApiError("'stream_options' is only allowed when 'stream' is true", param="stream_options",
                               code="invalid_value")
            if not isinstance(options, dict):
                raise ApiError(f"'stream_options' must be an object, got {_shown(options)}", param="stream_options",
                               code="invalid_type")
            include_usage = _boolean(options, "include_usage", False)
        if chat:
            want = _boolean(body, "logprobs", False)
            top = _integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
            if top is not None and not want:
                raise ApiError("'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
            logprobs = (top or 0) if want else None
        else:
            logprobs = _integer(body, "logprobs", None, 0, MAX_LOGPROBS)
        ignore_eos = _boolean(body, "ignore_eos", False)
        gen = Generation(
            prompts=prompts,
            prompt_chars=chars,
            n=n,
            stop=_stop_strings(body) + (CHAT_STOP_STRINGS if chat else []),
            stream=stream,
            include_usage=include_usage,
            logprobs=logprobs,
            return_token_ids=_boolean(body, "return_token_ids", False),
            chat=chat,
        )
        for ids, budget in zip(prompts, budgets, strict=True):
            for j in range(n):
                params = SamplingParams(temperature=temperature, top_p=top_p, top_k=max(top_k, 0),
                                        seed=None if seed is None else seed + j)
                gen.sequences.append(EngineRequest(ids, budget, params, frozenset() if ignore_eos else None, logprobs))
        return gen

    # ---- generation -------------------------------------------------------------------------------
    async def generate(self, request: Request, gen: Generation) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_event(index: int, event: Token | Finished) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (index, event))
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass

        try:
            handles = self.engine.submit(gen.sequences, on_event)
        except QueueFull as exc:
            raise ApiError(str(exc), status=429, type="rate_limit_error", code="queue_full") from None
        except EngineStopped as exc:
            raise ApiError(f"the engine is not running: {exc}", status=503, type="server_error",
                           code="engine_unavailable") from None
        except Grok1Error as exc:
            raise ApiError(str(exc), code="invalid_value") from None
        run = _Run(self, gen, queue, handles)
        if gen.stream:
            return _EventStream(run.stream(), on_close=run.cancel)
        return await run.collect(request)

    # ---- formatting -------------------------------------------------------------------------------
    def head(self, gen: Generation) -> dict[str, Any]:
        return {"id": ("chatcmpl-" if gen.chat else "cmpl-") + uuid.uuid4().hex,
                "object": "chat.completion.chunk" if gen.chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "system_fingerprint": self.fingerprint}

    def completion_logprobs(self, choice: Choice, tokens: list[Token]) -> dict[str, Any]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t in tokens:
            text, data = self.token_text(t.id)
            out["tokens"].append(text)
            out["token_logprobs"].append(t.logprob)
            out["top_logprobs"].append({self.token_text(i)[0]: lp for i, lp in t.top_logprobs or []})
            out["text_offset"].append(choice.offset)
            # characters this token starts: every UTF-8 byte that is not a continuation byte
            choice.offset += sum(1 for b in data if b & 0xC0 != 0x80)
        return out

    def chat_logprobs(self, tokens: list[Token]) -> dict[str, Any]:
        content = []
        for t in tokens:
            text, data = self.token_text(t.id)
            top = []
            for i, lp in t.top_logprobs or []:
                alt_text, alt_data = self.token_text(i)
                top.append({"token": alt_text, "logprob": lp, "bytes": alt_data})
            content.append({"token": text, "logprob": t.logprob, "bytes": data, "top_logprobs": top})
        return {"content": content}

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "grok1",
                "max_model_len": self.context}


class _Run:
    """One request's sequences in flight: their events in, text and chunks out."""

    def __init__(self, api: OpenAIApi, gen: Generation, queue: asyncio.Queue, handles: list[Handle]) -> None:
        self.api, self.gen, self.queue, self.handles = api, gen, queue, handles
        self.head = api.head(gen)
        self.choices = [
            Choice(index=i, text=TextStream(api.tokenizer, gen.stop, strip_leading=gen.chat),
                   offset=gen.prompt_chars[i // gen.n])
            for i in range(len(gen.sequences))
        ]

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.gen.prompts)
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def updates(self) -> AsyncIterator[tuple[Choice, str, Token | None]]:
        """(choice, new text, token event) as tokens arrive; ends when every choice has finished."""
        pending = len(self.choices)
        while pending:
            index, event = await self.queue.get()
            choice = self.choices[index]
            if choice.finish_reason is not None:
                continue  # ended by a stop string; the engine may have sampled a token more
            if isinstance(event, Token):
                choice.token_ids.append(event.id)
                if event.logprob is not None:
                    choice.logprobs.append(event)
                text = choice.text.push(event.id)
                if choice.text.stopped:
                    self.handles[index].cancel()
                    choice.finish_reason = "stop"
                    pending -= 1
                yield choice, text, event
            elif isinstance(event, Finished):
                if event.reason not in ("stop", "length"):
                    raise GenerationFailed(event.error or "the server cancelled the request (shutting down)")
                choice.finish_reason = event.reason
                pending -= 1
                yield choice, choice.text.finish(), None

    async def stream(self) -> AsyncIterator[str]:
        """Server-sent events as OpenAI's streaming API sends them, ending with `data: [DONE]`."""
        api, gen = self.api, self.gen

        def chunk(payload: dict[str, Any]) -> str:
            body = dict(self.head, choices=[payload])
            if gen.include_usage:
                body["usage"] = None
            return _sse(body)

        if gen.chat:
            for choice in self.choices:
                yield chunk({"index": choice.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None})
        try:
            async for choice, text, token in self.updates():
                scored = [token] if token is not None and token.logprob is not None else []
                quiet = not text and not scored and not (gen.return_token_ids and token is not None)
                if quiet and choice.finish_reason is None:
                    continue  # nothing to say yet (a partial character, or text held back by a stop string)
                if gen.chat:
                    payload = {"index": choice.index, "delta": {"content": text} if text else {},
                               "logprobs": api.chat_logprobs(scored) if scored else None,
                               "finish_reason": choice.finish_reason}
                else:
                    payload = {"index": choice.index, "text": text,
                               "logprobs": api.completion_logprobs(choice, scored) if scored else None,
                               "finish_reason": choice.finish_reason}
                if gen.return_token_ids:
                    payload["token_ids"] = [token.id] if token is not None else []
                yield chunk(payload)
        except GenerationFailed as exc:
            yield _sse(ApiError(str(exc), status=500, type="server_error").body())
            yield "data: [DONE]\n\n"
            return
        if gen.include_usage:
            yield _sse(dict(self.head, choices=[], usage=self.usage()))
        yield "data: [DONE]\n\n"

    async def collect(self, request: Request) -> Response:
        """The whole answer as one JSON object; a client that goes away cancels its sequences."""
        api, gen = self.api, self.gen

        async def watch_disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.cancel()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            async for choice, text, _ in self.updates():
                choice.pieces.append(text)
        except GenerationFailed as exc:
            if watcher.done():
                return Response(status_code=499)  # nobody is listening
            raise ApiError(str(exc), status=500, type="server_error") from None
        finally:
            watcher.cancel()
            self.cancel()
        out = []
        for c in self.choices:
            text = "".join(c.pieces)
            scored = gen.logprobs is not None
            if gen.chat:
                item: dict[str, Any] = {"index": c.index, "message": {"role": "assistant", "content": text},
                                        "logprobs": api.chat_logprobs(c.logprobs) if scored else None,
                                        "finish_reason": c.finish_reason}
            else:
                item = {"index": c.index, "text": text,
                        "logprobs": api.completion_logprobs(c, c.logprobs) if scored else None,
                        "finish_reason": c.finish_reason}
            if gen.return_token_ids:
                item["token_ids"] = c.token_ids
            out.append(item)
        body = dict(self.head, object="chat.completion" if gen.chat else "text_completion", choices=out,
                    usage=self.usage())
        return JSONResponse(body)


def create_app(engine: Engine, tokenizer: Tokenizer, model_name: str, *, api_key: str | None = None) -> FastAPI:
    """The HTTP API over a started engine."""
    api = OpenAIApi(engine, tokenizer, model_name, api_key)
    app = FastAPI(title="grok1", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    http_counts: dict[tuple[str, int], int] = {}

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: ("not_found", f"no such endpoint: {request.method} {request.url.path}"),
                    405: ("method_not_allowed", f"{request.method} is not allowed on {request.url.path}")}
        code, message = messages.get(exc.status_code, (None, str(exc.detail)))
        return ApiError(message, status=exc.status_code, code=code).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return ApiError(f"internal server error: {type(exc).__name__}", status=500, type="server_error").response()

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        api.authorize(request)
        return {"object": "list", "data": [api.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request) -> dict[str, Any]:
        api.authorize(request)
        api.check_model(model_id)
        return api.model_card()

    async def generation(request: Request, chat: bool) -> Response:
        body = await api.read_body(request)
        gen = await run_in_threadpool(api.parse, body, chat)  # tokenizing a long prompt would stall the loop
        return await api.generate(request, gen)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generation(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await generation(request, chat=True)

    @app.get("/health")
    async def health() -> JSONResponse:
        m = engine.metrics()
        body = {"status": "ok" if m.alive else "unavailable", "model": model_name, "running": m.running,
                "waiting": m.waiting}
        if not m.alive:
            body["error"] = engine.error
        return JSONResponse(body, status_code=200 if m.alive else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(render_metrics(engine, http_counts, model_name),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    known = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics"}
    app.add_middleware(HttpCounter, known_paths=known, counts=http_counts)
    return app


def render_metrics(engine: Engine, http_counts: dict[tuple[str, int], int], model_name: str) -> str:
    """Prometheus text exposition of the engine's state and the HTTP counters."""
    m = engine.metrics()
    lines: list[str] = []

    def metric(name: str, kind: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            number = repr(float(value)) if isinstance(value, float) else str(value)
            lines.append(f"{name}{labels} {number}")

    metric("grok1_http_requests_total", "counter", "HTTP requests answered, by endpoint and status code.",
           [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(http_counts.items())])
    metric("grok1_sequences_finished_total", "counter",
           "Generated sequences that ended, by reason (stop, length, cancelled, error).",
           [(f'{{reason="{r}"}}', n) for r, n in m.finished.items()])
    metric("grok1_queue_rejections_total", "counter", "Requests refused because the queue was full (429).",
           [("", m.rejected)])
    metric("grok1_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", m.prompt_tokens)])
    metric("grok1_generation_tokens_total", "counter", "Tokens generated.", [("", m.generation_tokens)])
    metric("grok1_decode_steps_total", "counter", "Batched decode steps run.", [("", m.decode_steps)])
    metric("grok1_decode_rows_total", "counter",
           "Running sequences summed over decode steps (mean batch size = this / decode steps).",
           [("", m.decode_rows)])
    metric("grok1_prefill_seconds_total", "counter", "Time spent in prefill.", [("", m.prefill_seconds)])
    metric("grok1_decode_seconds_total", "counter", "Time spent in decode steps.", [("", m.decode_seconds)])
    metric("grok1_queue_depth", "gauge", "Sequences waiting for a free batch slot.", [("", m.waiting)])
    metric("grok1_batch_size", "gauge", "Sequences in the running batch.", [("", m.running)])
    metric("grok1_slots_free", "gauge", "Free rows in the batch (KV-cache slots).", [("", m.free_slots)])
    metric("grok1_max_batch", "gauge", "Rows in the batch (--max-batch).", [("", m.max_batch)])
    metric("grok1_max_queue", "gauge", "Waiting sequences accepted (--max-queue).", [("", m.max_queue)])
    metric("grok1_generation_tokens_per_second", "gauge",
           "Tokens generated per second, averaged over the last 10 seconds.", [("", round(m.tokens_per_second, 3))])
    metric("grok1_engine_up", "gauge", "1 while the engine thread is running.", [("", int(m.alive))])
    metric("grok1_model_info", "gauge", "The served model.", [(f'{{model="{model_name}"}}', 1)])
    return "\n".join(lines) + "\n"


# ---- running it -----------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    model_path: str,
    *,
    tokenizer_path: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch: int = 8,
    max_queue: int = 64,
    context_len: int | None = None,
    dtype: str | None = None,
    device: str | None = None,
    model_name: str | None = None,
    log_level: str = "info",
    threads: int | None = None,
) -> int:
    """Loads the model, starts the engine and serves until interrupted."""
    import torch
    import uvicorn

    from .loader import load
    from .tokenizer import find_tokenizer

    if not 0 <= port <= 65535:
        raise Grok1Error(f"--port must be in 0..65535, got {port}")
    tokenizer_path = tokenizer_path or find_tokenizer(model_path)
    if tokenizer_path is None:
        raise Grok1Error(f"grok1 serve needs a tokenizer: none found in or beside {model_path}; pass --tokenizer PATH")
    tokenizer = Tokenizer(tokenizer_path)
    if threads is not None:
        if threads < 1:
            raise Grok1Error(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    started = time.perf_counter()
    model = load(model_path, dtype=dtype, device=device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise Grok1Error(
            f"{tokenizer.path}: tokenizer has {tokenizer.vocab_size} ids, the model only {model.config.vocab_size}"
        )
    engine = Engine(model, max_batch=max_batch, max_queue=max_queue, context_len=context_len)
    engine.start()
    name = model_name or os.path.basename(os.path.normpath(model_path))
    app = create_app(engine, tokenizer, name, api_key=api_key)
    if not _is_loopback(host) and api_key is None:
        print(f"grok1 serve: warning: listening on {host} without an API key (--api-key)", file=sys.stderr)
    print(
        f"grok1 serve: model '{name}' loaded in {time.perf_counter() - started:.1f} s "
        f"({str(model.activation_dtype).removeprefix('torch.')} on {model.device}, context {engine.context_len}, "
        f"max batch {max_batch}, max queue {max_queue}); listening on http://{host}:{port}",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=5)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            engine.stop(timeout=0)  # ends the running sequences, so their streams close at once
            super().handle_exit(sig, frame)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # uvicorn re-raises the signal that stopped it once it is done; either one ends here quietly.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)
    try:
        Server(config).run()
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
    print("grok1 serve: stopped", file=sys.stderr)
    return 0
