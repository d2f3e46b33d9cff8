"""`grok1 serve` end to end: a real server process on a loopback port, spoken to with the `openai` package
(and raw HTTP where a client library would hide what is being checked)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

import grok1
from grok1.config import PRESETS
from grok1.server import render_chat
from grok1.synth import train_demo_tokenizer, write_release
from grok1.tokenizer import Tokenizer

KEY = "test-key"
CONTEXT = 2048  # long enough that a stream can be cut off while it is still generating
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m grok1 serve` on a free loopback port, ready once /health answers."""

    def __init__(self, model_dir: Path, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")  # a file, not a pipe: a full pipe would block the server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "grok1", "serve", "--model", str(model_dir), "--port", str(self.port),
             "--log-level", "warning", "--threads", "1", *args],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{log_path.read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not come up:\n{log_path.read_text()}")

    def metrics(self) -> dict[str, float]:
        values = {}
        for line in httpx.get(self.url + "/metrics", timeout=5).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    tokenizer = train_demo_tokenizer(str(tmp / "tok"))
    config = PRESETS["tiny"].replace(name="serve-test", vocab_size=Tokenizer(tokenizer).vocab_size,
                                     sequence_len=CONTEXT)
    return Path(write_release(tmp / "tiny", config, tokenizer=tokenizer, progress=False))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = Server(model_dir, tmp_path_factory.mktemp("log") / "server.log", "--dtype", "float32", "--api-key", KEY,
                 "--max-batch", "4", "--max-queue", "4")
    yield srv
    srv.stop()
    assert srv.proc.returncode == 0, srv.log_path.read_text()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=server.url + "/v1", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer(model_dir / "tokenizer.model")


MODEL = "tiny"  # the served name: the model directory's name


def completion(client, **kw):
    kw.setdefault("model", MODEL)
    return client.completions.create(**kw)


def token_ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


# ---- the API ---------------------------------------------------------------------------------------


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).model_extra["max_model_len"] == CONTEXT
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completion(client, tokenizer):
    out = completion(client, prompt="The model reads", max_tokens=12, seed=1, extra_body={"ignore_eos": True,
                                                                                           "return_token_ids": True})
    [choice] = out.choices
    assert out.object == "text_completion" and choice.finish_reason == "length"
    ids = token_ids(choice)
    assert len(ids) == 12
    decoder = tokenizer.stream_decoder(at_start=False)
    assert choice.text == "".join(decoder.push(i) for i in ids) + decoder.flush()
    prompt_tokens = len(tokenizer.encode("The model reads"))
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        prompt_tokens, 12, prompt_tokens + 12)


def test_completion_matches_grok1_generate(client, model_dir):
    model = grok1.load(model_dir, dtype="float32", device="cpu")
    prompt = [5, 6, 7, 8, 9]
    expected = grok1.generate(model, prompt, max_new_tokens=10, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    out = completion(client, prompt=prompt, max_tokens=10, temperature=0.8, top_p=0.9, seed=11,
                     extra_body={"ignore_eos": True, "return_token_ids": True})
    assert token_ids(out.choices[0]) == expected


def test_several_prompts_and_n(client):
    out = completion(client, prompt=["The model", "It reads"], n=2, max_tokens=6, seed=3,
                     extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 24
    # choice j of a prompt uses seed + j: its first choice equals a single request with the same seed
    alone = completion(client, prompt="It reads", max_tokens=6, seed=3, extra_body={"ignore_eos": True})
    assert out.choices[2].text == alone.choices[0].text
    assert out.choices[2].text != out.choices[3].text


def test_chat(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a token?"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, seed=2)
    [choice] = out.choices
    assert out.object == "chat.completion" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and not choice.message.content[:1].isspace()
    assert choice.finish_reason in ("stop", "length")
    prompt = render_chat([("system", "Be brief."), ("user", "What is a token?")])
    assert prompt == "System: Be brief.\n\nUser: What is a token?\n\nAssistant:"
    assert out.usage.prompt_tokens == len(tokenizer.encode(prompt))


def test_streamed_completion_equals_the_whole_one(client):
    kw = dict(prompt="The model reads a sequence", max_tokens=20, seed=4, temperature=0.9,
              extra_body={"ignore_eos": True})
    whole = completion(client, **kw)
    chunks = list(completion(client, stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(c.usage is None for c in chunks[:-1])
    # with token ids asked for, every token gets its chunk, even one whose text is still incomplete
    kw["extra_body"] = dict(kw["extra_body"], return_token_ids=True)
    ids = [i for c in completion(client, stream=True, **kw) for i in token_ids(c.choices[0])]
    assert ids == token_ids(completion(client, **kw).choices[0]) and len(ids) == 20


def test_streamed_chat_equals_the_whole_one(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=10, seed=5)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_raw_event_stream_format(server):
    body = {"model": MODEL, "prompt": "The model", "max_tokens": 3, "stream": True, "seed": 1}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=AUTH) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    for event in events[:-1]:
        assert json.loads(event[len("data: "):])["object"] == "text_completion"


def test_stop_string(client):
    kw = dict(prompt="The model reads", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    full = completion(client, **kw).choices[0].text
    stop = full[8:10]
    cut = completion(client, stop=[stop, "never appears"], **kw).choices[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = list(completion(client, stop=stop, stream=True, **kw))
    assert "".join(c.choices[0].text for c in streamed) == cut.text
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs(client):
    out = completion(client, prompt="The model", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert chosen == pytest.approx(max(top.values()))  # greedy picks the most likely token
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          logprobs=True, top_logprobs=2, seed=1)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.logprob <= 0 and isinstance(c.bytes, list) for c in content)


# ---- batching ----------------------------------------------------------------------------------------


def first_near_tie(top_logprobs: list[dict[str, float]]) -> int:
    """Index of the first step whose two best logits are within 0.01 (logprob gaps are logit gaps)."""
    for i, top in enumerate(top_logprobs):
        best = sorted(top.values(), reverse=True)
        if len(best) > 1 and best[0] - best[1] < 0.01:
            return i
    return len(top_logprobs)


def test_seeded_output_is_the_same_alone_and_in_a_batch(client):
    """Eight requests at once through four rows (so rows are reused and requests join mid-batch) give
    the tokens each gives alone: sampled ones exactly, greedy ones up to the first near-tie."""
    prompts = ["The model", "It reads a sequence of tokens and", "A", "Numbers 1 2 3", "The cache", "Each row",
               "Sampling is reproducible", "Grok"]
    requests = []
    for i, prompt in enumerate(prompts):
        greedy = i % 2 == 0
        requests.append(dict(prompt=prompt, max_tokens=24 + 4 * i, seed=100 + i,
                             temperature=0 if greedy else 1.0, top_p=1.0 if greedy else 0.9,
                             logprobs=2 if greedy else None,
                             extra_body={"ignore_eos": True, "return_token_ids": True}))

    def run(kw):
        return completion(client, **kw).choices[0]

    alone = [run(kw) for kw in requests]
    with ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(run, requests))
    for kw, a, b in zip(requests, alone, together, strict=True):
        if kw["temperature"] == 0:
            upto = first_near_tie(a.logprobs.top_logprobs)
            assert token_ids(a)[:upto] == token_ids(b)[:upto], kw["prompt"]
        else:
            assert token_ids(a) == token_ids(b), kw["prompt"]


def stream_lines(client: httpx.Client, body: dict):
    """Opens a streaming completion; returns the response and an iterator over its data payloads."""
    request = client.build_request("POST", "/v1/completions", json=dict(body, stream=True), headers=AUTH)
    response = client.send(request, stream=True)
    assert response.status_code == 200
    return response, (line[6:] for line in response.iter_lines() if line.startswith("data: "))


def wait_for(server: Server, condition, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if condition(m):
            return m
        assert time.monotonic() < deadline, m
        time.sleep(0.02)


CANCELLED = 'grok1_sequences_finished_total{reason="cancelled"}'


def test_a_client_that_disconnects_frees_its_slot(server):
    long_run = {"model": MODEL, "prompt": "The model", "max_tokens": CONTEXT - 100, "ignore_eos": True}
    cancelled_before = server.metrics()[CANCELLED]
    with httpx.Client(base_url=server.url, timeout=30) as a, httpx.Client(base_url=server.url, timeout=30) as b:
        response_a, lines_a = stream_lines(a, long_run)
        response_b, lines_b = stream_lines(b, long_run)
        for _ in range(3):
            next(lines_a), next(lines_b)
        full = wait_for(server, lambda m: m["grok1_batch_size"] == 2)
        assert full["grok1_slots_free"] == 2
        response_a.close()  # hang up mid-generation
        shrunk = wait_for(server, lambda m: m["grok1_batch_size"] == 1, timeout=5)
        assert shrunk["grok1_slots_free"] == 3 and shrunk[CANCELLED] == cancelled_before + 1
        for _ in range(5):
            json.loads(next(lines_b))  # the other stream goes on
        response_b.close()
    m = wait_for(server, lambda m: m["grok1_batch_size"] == 0, timeout=5)
    assert m[CANCELLED] == cancelled_before + 2 and m["grok1_slots_free"] == 4
    # a non-streaming client that gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=long_run, headers=AUTH, timeout=0.5)
    m = wait_for(server, lambda m: m[CANCELLED] == cancelled_before + 3, timeout=5)
    assert m["grok1_batch_size"] == 0


def test_a_full_queue_answers_429(server, client):
    long_run = {"model": MODEL, "prompt": "The model", "max_tokens": CONTEXT - 100, "ignore_eos": True, "n": 4}
    with httpx.Client(base_url=server.url, timeout=30) as a, httpx.Client(base_url=server.url, timeout=30) as b:
        held = [stream_lines(a, long_run)[0], stream_lines(b, long_run)[0]]  # 4 running + 4 waiting
        m = server.metrics()
        assert m["grok1_batch_size"] + m["grok1_queue_depth"] == 8
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as caught:
            completion(client, prompt="one more", max_tokens=4)
        assert time.monotonic() - started < 5
        assert caught.value.status_code == 429 and caught.value.body["code"] == "queue_full"
        for response in held:
            response.close()
    wait_for(server, lambda m: m["grok1_batch_size"] == 0 and m["grok1_queue_depth"] == 0, timeout=5)
    assert completion(client, prompt="The model", max_tokens=3).choices[0].finish_reason in ("stop", "length")


# ---- bad requests ------------------------------------------------------------------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": MODEL, "prompt": "The model", "max_tokens": 4}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}

# (name, method, path, body: dict (merged into a valid one; None drops a field) or raw bytes, headers, status, param, code)
BAD = [
    ("invalid JSON", "POST", C, b'{"model": "tiny", ', AUTH, 400, None, "invalid_json"),
    ("empty body", "POST", C, b"", AUTH, 400, None, "invalid_json"),
    ("JSON array", "POST", C, b"[1, 2]", AUTH, 400, None, "invalid_json"),
    ("NaN", "POST", C, b'{"model": "tiny", "prompt": "x", "temperature": NaN}', AUTH, 400, None, "invalid_json"),
    ("not UTF-8", "POST", C, b'{"model": "\xff"}', AUTH, 400, None, "invalid_json"),
    ("no model", "POST", C, {"model": None}, AUTH, 400, "model", "missing_required_parameter"),
    ("model not a string", "POST", C, {"model": 5}, AUTH, 400, "model", "invalid_type"),
    ("unknown model", "POST", C, {"model": "gpt-4"}, AUTH, 404, "model", "model_not_found"),
    ("no prompt", "POST", C, {"prompt": None}, AUTH, 400, "prompt", "missing_required_parameter"),
    ("prompt a number", "POST", C, {"prompt": 42}, AUTH, 400, "prompt", "invalid_type"),
    ("prompt empty list", "POST", C, {"prompt": []}, AUTH, 400, "prompt", "invalid_type"),
    ("prompt mixed list", "POST", C, {"prompt": ["a", 1]}, AUTH, 400, "prompt", "invalid_type"),
    ("prompt empty string", "POST", C, {"prompt": ""}, AUTH, 400, "prompt", "invalid_value"),
    ("token id outside vocab", "POST", C, {"prompt": [5, 10**6]}, AUTH, 400, "prompt", "invalid_value"),
    ("negative token id", "POST", C, {"prompt": [5, -1]}, AUTH, 400, "prompt", "invalid_value"),
    ("prompt longer than context", "POST", C, {"prompt": [5] * CONTEXT}, AUTH, 400, "prompt", "context_length_exceeded"),
    ("max_tokens 0", "POST", C, {"max_tokens": 0}, AUTH, 400, "max_tokens", "invalid_value"),
    ("max_tokens negative", "POST", C, {"max_tokens": -5}, AUTH, 400, "max_tokens", "invalid_value"),
    ("max_tokens a string", "POST", C, {"max_tokens": "10"}, AUTH, 400, "max_tokens", "invalid_type"),
    ("max_tokens a float", "POST", C, {"max_tokens": 1.5}, AUTH, 400, "max_tokens", "invalid_type"),
    ("max_tokens a bool", "POST", C, {"max_tokens": True}, AUTH, 400, "max_tokens", "invalid_type"),
    ("max_tokens beyond context", "POST", C, {"max_tokens": CONTEXT}, AUTH, 400, "max_tokens", "context_length_exceeded"),
    ("temperature negative", "POST", C, {"temperature": -0.5}, AUTH, 400, "temperature", "invalid_value"),
    ("temperature a string", "POST", C, {"temperature": "hot"}, AUTH, 400, "temperature", "invalid_type"),
    ("top_p 0", "POST", C, {"top_p": 0}, AUTH, 400, "top_p", "invalid_value"),
    ("top_p above 1", "POST", C, {"top_p": 1.5}, AUTH, 400, "top_p", "invalid_value"),
    ("top_k below -1", "POST", C, {"top_k": -2}, AUTH, 400, "top_k", "invalid_value"),
    ("n 0", "POST", C, {"n": 0}, AUTH, 400, "n", "invalid_value"),
    ("n above the limit", "POST", C, {"n": 17}, AUTH, 400, "n", "invalid_value"),
    ("stop a number", "POST", C, {"stop": 5}, AUTH, 400, "stop", "invalid_type"),
    ("stream a string", "POST", C, {"stream": "yes"}, AUTH, 400, "stream", "invalid_type"),
    ("stream_options without stream", "POST", C, {"stream_options": {"include_usage": True}}, AUTH, 400,
     "stream_options", "invalid_value"),
    ("logprobs too many", "POST", C, {"logprobs": 50}, AUTH, 400, "logprobs", "invalid_value"),
    ("seed a string", "POST", C, {"seed": "abc"}, AUTH, 400, "seed", "invalid_type"),
    ("penalty unsupported", "POST", C, {"presence_penalty": 1.0}, AUTH, 400, "presence_penalty",
     "unsupported_parameter"),
    ("chat without messages", "POST", CHAT, {"messages": None}, AUTH, 400, "messages", "missing_required_parameter"),
    ("chat empty messages", "POST", CHAT, {"messages": []}, AUTH, 400, "messages", "invalid_type"),
    ("chat message a string", "POST", CHAT, {"messages": ["hi"]}, AUTH, 400, "messages[0]", "invalid_type"),
    ("chat unknown role", "POST", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, AUTH, 400,
     "messages[0].role", "invalid_value"),
    ("chat content a number", "POST", CHAT, {"messages": [{"role": "user", "content": 5}]}, AUTH, 400,
     "messages[0].content", "invalid_type"),
    ("chat image content", "POST", CHAT,
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, AUTH, 400,
     "messages[0].content", "invalid_value"),
    ("chat top_logprobs without logprobs", "POST", CHAT, {"top_logprobs": 2}, AUTH, 400, "top_logprobs",
     "invalid_value"),
    ("chat max_tokens beyond context", "POST", CHAT, {"max_tokens": CONTEXT}, AUTH, 400, "max_tokens",
     "context_length_exceeded"),
    ("body too large", "POST", C, b"x" * (9 * 1024 * 1024), AUTH, 413, None, "request_too_large"),
    ("no API key", "POST", C, {}, {}, 401, None, "invalid_api_key"),
    ("wrong API key", "POST", C, {}, {"Authorization": "Bearer nope"}, 401, None, "invalid_api_key"),
    ("no API key on models", "GET", "/v1/models", None, {}, 401, None, "invalid_api_key"),
    ("wrong method", "GET", C, None, AUTH, 405, None, "method_not_allowed"),
    ("unknown endpoint", "POST", "/v1/embeddings", {}, AUTH, 404, None, "not_found"),
]


@pytest.mark.parametrize("name,method,path,body,headers,status,param,code", BAD, ids=[case[0] for case in BAD])
def test_bad_request(server, name, method, path, body, headers, status, param, code):
    if isinstance(body, dict):
        merged = dict(OK_CHAT if path == CHAT else OK, **body)
        content = json.dumps({k: v for k, v in merged.items() if v is not None}).encode()
    else:
        content = body
    response = httpx.request(method, server.url + path, content=content, headers=headers, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10 and isinstance(error["type"], str)
    assert (error["param"], error["code"]) == (param, code), error


def test_still_serving_after_bad_requests(server, client):
    assert len(BAD) >= 20
    out = completion(client, prompt="The model", max_tokens=4)
    assert out.choices[0].finish_reason in ("stop", "length")
    assert server.proc.poll() is None
    m = server.metrics()
    assert m['grok1_http_requests_total{endpoint="/v1/completions",status="400"}'] >= 20
    assert not any(k.startswith("grok1_http_requests_total") and 'status="5' in k for k in m)
    assert m["grok1_engine_up"] == 1


# ---- the command -------------------------------------------------------------------------------------


def test_serve_refuses_a_model_without_tokenizer(tmp_path):
    write_release(tmp_path / "bare", PRESETS["tiny"].replace(num_layers=1), progress=False)
    proc = subprocess.run([sys.executable, "-m", "grok1", "serve", "--model", str(tmp_path / "bare")],
                          capture_output=True, text=True, env=dict(os.environ, GROK1_API_KEY=""), timeout=120)
    assert proc.returncode == 1 and "needs a tokenizer" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_refuses_a_bad_batch_size(model_dir):
    proc = subprocess.run([sys.executable, "-m", "grok1", "serve", "--model", str(model_dir), "--max-batch", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "max_batch must be >= 1" in proc.stderr and "Traceback" not in proc.stderr


def test_sigint_stops_the_server_while_it_streams(model_dir, tmp_path):
    srv = Server(model_dir, tmp_path / "log", "--max-batch", "2")
    body = {"model": MODEL, "prompt": "The model", "max_tokens": CONTEXT - 100, "ignore_eos": True}
    errors = []

    def reader():
        try:
            with httpx.Client(base_url=srv.url, timeout=30) as c:
                request = c.build_request("POST", "/v1/completions", json=dict(body, stream=True))
                response = c.send(request, stream=True)
                for _ in response.iter_lines():
                    pass
        except httpx.HTTPError as exc:
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    wait_for(srv, lambda m: m["grok1_batch_size"] == 1)
    srv.stop()
    thread.join(30)
    assert not thread.is_alive() and srv.proc.returncode == 0, srv.log_path.read_text()
