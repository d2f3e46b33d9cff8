"""Load and batching benchmark for `grok1 serve`, against servers this script starts on loopback.

1. load: CLIENTS concurrent clients (the official `openai` package) each send REQUESTS requests to a
   tiny model, cycling through completion, streamed completion, chat and streamed chat. Every
   response is checked (status, shape, token counts, finish reason); reports lost requests, 4xx/5xx,
   p50/p99 latency and aggregate generated tokens per second. A few seeded requests are then
   replayed one at a time and compared with their batched answers.
2. batching: on the `mid` preset (written with `grok1 synth` if --mid-dir does not hold it), decode
   tokens per second of one stream alone vs STREAMS concurrent streams (their sum), and the ratio.

Everything is bounded in count and time and talks only to 127.0.0.1. Prints a table and writes JSON.

    python bench/serve_load.py                     # both parts (the mid model takes a while to write)
    python bench/serve_load.py --skip-batching     # load only, ~1 min
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "serve_load.json"


class ServerProcess:
    """`python -m grok1 serve` on a free loopback port; a context manager that stops it on exit."""

    def __init__(self, model_dir: str, log_path: str, *args: str, startup_s: float = 300) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "grok1", "serve", "--model", model_dir, "--port", str(self.port),
             "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited with {self.proc.returncode}:\n{Path(log_path).read_text()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.close()
        raise SystemExit(f"server did not come up in {startup_s:.0f} s:\n{Path(log_path).read_text()}")

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


PROMPTS = [
    "The model reads a sequence of tokens and",
    "A mixture of experts routes each token to",
    "Numbers: 1 2 3 4 5",
    "Once upon a time",
]


async def one_request(client: openai.AsyncOpenAI, model: str, kind: str, seed: int, max_tokens: int) -> dict:
    """Sends one request of `kind`; returns what was checked and measured."""
    prompt = PROMPTS[seed % len(PROMPTS)]
    extra = {"ignore_eos": True}
    common = dict(model=model, max_tokens=max_tokens, seed=seed, temperature=0.9, extra_body=extra)
    started = time.perf_counter()
    first = None
    text = ""
    usage = None
    finish = None
    if kind == "completion":
        out = await client.completions.create(prompt=prompt, **common)
        text, usage, finish = out.choices[0].text, out.usage, out.choices[0].finish_reason
        assert out.object == "text_completion"
    elif kind == "chat":
        out = await client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
        text, usage, finish = out.choices[0].message.content, out.usage, out.choices[0].finish_reason
        assert out.object == "chat.completion" and out.choices[0].message.role == "assistant"
    else:
        chat = kind == "chat-stream"
        options = {"include_usage": True}
        if chat:
            stream = await client.chat.completions.create(
                messages=[{"role": "user", "content": prompt}], stream=True, stream_options=options, **common)
        else:
            stream = await client.completions.create(prompt=prompt, stream=True, stream_options=options, **common)
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if not chunk.choices:
                continue
            piece = chunk.choices[0].delta.content if chat else chunk.choices[0].text
            if piece and first is None:
                first = time.perf_counter() - started
            text += piece or ""
            finish = chunk.choices[0].finish_reason or finish
    latency = time.perf_counter() - started
    assert isinstance(text, str), "no text"
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, "bad usage"
    if kind.startswith("chat"):  # the chat template's stop strings may end a reply early
        assert finish in ("stop", "length") and 1 <= usage.completion_tokens <= max_tokens, (finish, usage)
    else:
        assert finish == "length" and usage.completion_tokens == max_tokens, (finish, usage)
    return {"kind": kind, "seed": seed, "latency_s": latency, "ttft_s": first, "tokens": usage.completion_tokens,
            "text": text}


async def load_phase(url: str, model: str, clients: int, requests: int, max_tokens: int, deadline_s: float) -> dict:
    kinds = ["completion", "completion-stream", "chat", "chat-stream"]
    results: list[dict] = []
    failures: list[str] = []
    statuses: dict[str, int] = {}

    async def client_loop(index: int) -> None:
        client = openai.AsyncOpenAI(api_key="none", base_url=url + "/v1", max_retries=0, timeout=deadline_s)
        try:
            for r in range(requests):
                seed = index * requests + r
                kind = kinds[seed % len(kinds)]
                try:
                    results.append(await one_request(client, model, kind, seed, max_tokens))
                    statuses["200"] = statuses.get("200", 0) + 1
                except openai.APIStatusError as exc:
                    statuses[str(exc.status_code)] = statuses.get(str(exc.status_code), 0) + 1
                    failures.append(f"{kind} seed {seed}: HTTP {exc.status_code} {exc.body}")
                except (openai.APIError, AssertionError) as exc:
                    failures.append(f"{kind} seed {seed}: {type(exc).__name__}: {exc}")
        finally:
            await client.close()

    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(client_loop(i) for i in range(clients))), deadline_s)
    wall = time.perf_counter() - started
    latencies = [r["latency_s"] for r in results]
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    tokens = sum(r["tokens"] for r in results)
    sent = clients * requests
    return {
        "clients": clients,
        "requests_per_client": requests,
        "max_tokens": max_tokens,
        "requests": sent,
        "completed_ok": len(results),
        "lost": sent - len(results),  # anything but a correct answer
        "status_counts": statuses,
        "http_5xx": sum(n for s, n in statuses.items() if s.startswith("5")),
        "failures": failures[:20],
        "wall_s": round(wall, 3),
        "latency_p50_s": round(percentile(latencies, 0.5), 4),
        "latency_p99_s": round(percentile(latencies, 0.99), 4),
        "ttft_p50_s": round(percentile(ttfts, 0.5), 4) if ttfts else None,
        "ttft_p99_s": round(percentile(ttfts, 0.99), 4) if ttfts else None,
        "generated_tokens": tokens,
        "aggregate_tokens_per_s": round(tokens / wall, 1),
        "_results": results,
    }


async def replay(url: str, model: str, results: list[dict], count: int, max_tokens: int) -> dict:
    """Replays some seeded completions one at a time: the text should equal the batched answer."""
    picked = [r for r in results if r["kind"] == "completion"][:count]
    client = openai.AsyncOpenAI(api_key="none", base_url=url + "/v1", max_retries=0, timeout=120)
    same = 0
    try:
        for r in picked:
            again = await one_request(client, model, "completion", r["seed"], max_tokens)
            same += again["text"] == r["text"]
    finally:
        await client.close()
    return {"replayed": len(picked), "identical": same}


async def stream_tokens(client: openai.AsyncOpenAI, model: str, seed: int, max_tokens: int) -> list[float]:
    """Arrival times of every token of one streamed completion (one chunk per token)."""
    times = []
    stream = await client.completions.create(
        model=model, prompt=PROMPTS[seed % len(PROMPTS)], max_tokens=max_tokens, seed=seed, temperature=0.9,
        stream=True, extra_body={"ignore_eos": True, "return_token_ids": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].model_extra.get("token_ids"):
            times.extend([time.perf_counter()] * len(chunk.choices[0].model_extra["token_ids"]))
    return times


async def batching_phase(url: str, model: str, streams: int, max_tokens: int, repeats: int) -> dict:
    """Decode tokens/s of one stream, then of `streams` at once (tokens after each stream's first one,
    over the span from the first first-token to the last token)."""
    client = openai.AsyncOpenAI(api_key="none", base_url=url + "/v1", max_retries=0, timeout=600)
    try:
        await stream_tokens(client, model, 0, 4)  # warm-up
        single, multi, multi_e2e = [], [], []
        for rep in range(repeats):
            times = await stream_tokens(client, model, rep, max_tokens)
            assert len(times) == max_tokens
            single.append((len(times) - 1) / (times[-1] - times[0]))
            started = time.perf_counter()
            runs = await asyncio.gather(*(stream_tokens(client, model, 100 + rep * streams + i, max_tokens)
                                          for i in range(streams)))
            assert all(len(t) == max_tokens for t in runs)
            span = max(t[-1] for t in runs) - min(t[0] for t in runs)
            multi.append(sum(len(t) - 1 for t in runs) / span)
            multi_e2e.append(sum(len(t) for t in runs) / (max(t[-1] for t in runs) - started))
    finally:
        await client.close()
    single_s, multi_s = statistics.median(single), statistics.median(multi)
    return {
        "streams": streams,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "single_decode_tokens_per_s": round(single_s, 2),
        "multi_decode_tokens_per_s": round(multi_s, 2),
        "multi_end_to_end_tokens_per_s": round(statistics.median(multi_e2e), 2),
        "ratio": round(multi_s / single_s, 2),
        "single_runs": [round(x, 2) for x in single],
        "multi_runs": [round(x, 2) for x in multi],
    }


def tiny_model(tmp: str) -> str:
    from grok1.config import PRESETS
    from grok1.synth import train_demo_tokenizer, write_release
    from grok1.tokenizer import Tokenizer

    tokenizer = train_demo_tokenizer(os.path.join(tmp, "tok"))
    config = PRESETS["tiny"].replace(name="load-tiny", vocab_size=Tokenizer(tokenizer).vocab_size)
    return write_release(os.path.join(tmp, "tiny"), config, tokenizer=tokenizer, progress=False)


def mid_model(path: str, tmp: str) -> str:
    if not os.path.isdir(os.path.join(path, "ckpt-0")):
        from grok1.synth import train_demo_tokenizer

        tokenizer = train_demo_tokenizer(os.path.join(tmp, "tok-mid"))
        print(f"writing the mid preset to {path} (~0.9 GB) ...", flush=True)
        subprocess.run([sys.executable, "-m", "grok1", "synth", path, "--preset", "mid", "--tokenizer", tokenizer],
                       check=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=16, help="server --max-batch for the load phase")
    parser.add_argument("--dtype", default="float32", help="server --dtype for the load phase")
    parser.add_argument("--threads", type=int, default=1,
                        help="server --threads for the load phase (the clients need the other core)")
    parser.add_argument("--mid-threads", type=int, default=1,
                        help="server --threads for the batching phase (0: PyTorch's choice)")
    parser.add_argument("--mid-dir", default="/tmp/grok1-serve-mid", help="the mid preset (written if missing)")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--mid-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-batching", action="store_true")
    parser.add_argument("--deadline", type=float, default=600, help="seconds allowed for each phase")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    # Other work on the machine moves these figures a lot: the load average is recorded with them.
    report: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "python": platform.python_version(), "loadavg_start": os.getloadavg()}}
    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="grok1-serve-load-") as tmp:
        if not args.skip_load:
            model = tiny_model(tmp)
            with ServerProcess(model, os.path.join(tmp, "load.log"), "--dtype", args.dtype,
                               "--max-batch", str(args.max_batch), "--threads", str(args.threads)) as server:
                load = asyncio.run(load_phase(server.url, "tiny", args.clients, args.requests, args.max_tokens,
                                              args.deadline))
                load["replay"] = asyncio.run(replay(server.url, "tiny", load.pop("_results"), 8, args.max_tokens))
                m = server.metrics()
                load["server_mean_batch"] = round(m["grok1_decode_rows_total"] / max(1, m["grok1_decode_steps_total"]), 2)
                load["server_decode_s"] = round(m["grok1_decode_seconds_total"], 3)
                load["server_prefill_s"] = round(m["grok1_prefill_seconds_total"], 3)
                load["server_decode_steps"] = int(m["grok1_decode_steps_total"])
                load["server_5xx"] = sum(v for k, v in m.items() if k.startswith("grok1_http_requests_total")
                                         and 'status="5' in k)
            report["load"] = dict(load, model="tiny", dtype=args.dtype, server_max_batch=args.max_batch,
                                  server_threads=args.threads)
            rows += [
                ("load: requests (clients x each)", f"{load['requests']} ({args.clients} x {args.requests}), "
                                                    f"{args.max_tokens} tokens each"),
                ("load: completed ok / lost / 5xx", f"{load['completed_ok']} / {load['lost']} / {load['http_5xx']}"),
                ("load: latency p50 / p99", f"{load['latency_p50_s']:.3f} s / {load['latency_p99_s']:.3f} s"),
                ("load: time to first token p50 / p99", f"{load['ttft_p50_s']:.3f} s / {load['ttft_p99_s']:.3f} s"),
                ("load: aggregate generated tok/s", f"{load['aggregate_tokens_per_s']:.1f} "
                                                    f"(mean server batch {load['server_mean_batch']})"),
                ("load: replayed alone = batched", f"{load['replay']['identical']} / {load['replay']['replayed']}"),
            ]
        if not args.skip_batching:
            path = mid_model(args.mid_dir, tmp)
            threads = ["--threads", str(args.mid_threads)] if args.mid_threads else []
            with ServerProcess(path, os.path.join(tmp, "mid.log"), "--max-batch", str(args.streams), *threads) as server:
                batching = asyncio.run(batching_phase(server.url, os.path.basename(os.path.normpath(path)),
                                                      args.streams, args.mid_tokens, args.repeats))
            report["batching"] = dict(batching, model="mid", dtype="bfloat16", server_threads=args.mid_threads or None)
            rows += [
                ("mid: 1 stream decode tok/s", f"{batching['single_decode_tokens_per_s']:.1f}"),
                (f"mid: {args.streams} streams decode tok/s (sum)", f"{batching['multi_decode_tokens_per_s']:.1f}"),
                (f"mid: ratio {args.streams} streams / 1", f"{batching['ratio']:.2f}x"),
            ]
    report["machine"]["loadavg_end"] = os.getloadavg()
    width = max(len(k) for k, _ in rows) if rows else 0
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    print(f"wrote {args.out}")
    load = report.get("load")
    ok = load is None or (load["lost"] == 0 and load["http_5xx"] == 0 and load["completed_ok"] == load["requests"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
