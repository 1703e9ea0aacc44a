"""`lmzoo serve` under load (issue 23): batching, latency and a mixed load, in one run.

    python bench/serve.py [--quick] [--json FILE] [--llama-cpp PYTHON]

Starts `lmzoo serve` on the embedded model with a LoRA and a P-tuning v2 adapter (random, made
here), as a subprocess on a free port, then, side by side in one run:
1. Batching: one streaming client alone, then 8 at once (the same 100-token prompt, 64 new
   tokens each, greedy): aggregate decode tokens/s (tokens after each stream's first, over the
   span from the first first-token to the last token), and their ratio.
2. Latency under load: time to first token of each of the 8 (p50, max).
3. A mixed load: 200 requests from 16 concurrent clients, models base/lora/prefix in turn,
   every other one streamed, a random tenth cancelled mid-stream (closed after 3 chunks).
   Counts failures (none expected), checks the batch is empty afterwards (/metrics), and the
   server's RSS before and after.
4. With --llama-cpp PYTHON (an interpreter with llama-cpp-python[server]): the same batching
   and latency load (1 and then 8 streaming clients) against llama.cpp's server on the same GGUF,
   run right after lmzoo's, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# A count: every model continues it past 64 tokens without an end-of-text (a story prompt made
# llama.cpp's server stop at 12 tokens, which is no decode measurement). About 100 tokens.
PROMPT = ", ".join(str(i) for i in range(1, 29)) + ","


def make_adapters(root: Path) -> dict:
    import torch

    import lmzoo
    from lmzoo.peft import LoraConfig, PrefixConfig, add_lora, add_virtual

    torch.manual_seed(0)
    model, _ = lmzoo.load()
    add_lora(model, LoraConfig(r=8, targets=("q", "v")))
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.05)
    lmzoo.save_adapter(model, str(root / "lora"))
    model, _ = lmzoo.load()
    add_virtual(model, PrefixConfig(n_virtual=16))
    torch.nn.init.normal_(model.virtual.embedding.weight, std=0.1)
    lmzoo.save_adapter(model, str(root / "prefix"))
    return {"lora": str(root / "lora"), "prefix": str(root / "prefix")}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


async def stream_one(client, url, model, prompt, max_tokens, cancel_after=None, stream=True):
    """(time to first token, [arrival time of each chunk with text], finished normally?)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    start = time.perf_counter()
    if not stream:
        r = await client.post(url + "/v1/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - start, [time.perf_counter()], True
    times = []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                times.append(time.perf_counter())
                if cancel_after is not None and len(times) >= cancel_after:
                    return times[0] - start, times, False  # leaving the block closes the connection
    return (times[0] - start if times else None), times, True


def decode_rate(results) -> float:
    """Tokens after each stream's first, per second, over the span they were produced in."""
    tokens = sum(len(t) - 1 for _, t, _ in results)
    span = max(t[-1] for _, t, _ in results) - min(t[0] for _, t, _ in results)
    return tokens / span


def wait_ready(url, path="/health", tries=600):
    for _ in range(tries):
        try:
            if httpx.get(url + path).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become ready")


def llama_cpp_batching(python, n_tokens, gguf):
    """llama-cpp-python's OpenAI server on the same GGUF (2 threads), the same load."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # interrupt_requests off: by default a new request cuts the running one short (no queueing)
    proc = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--n_ctx", "4096",
                             "--n_threads", "2", "--n_threads_batch", "2", "--interrupt_requests", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(f"http://127.0.0.1:{port}", "/v1/models")
        return asyncio.run(batching(f"http://127.0.0.1:{port}", n_tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


async def batching(url, n_tokens):
    async with httpx.AsyncClient(timeout=300) as client:
        await stream_one(client, url, "base", PROMPT, 4)  # warm-up
        alone = [await stream_one(client, url, "base", PROMPT, n_tokens) for _ in range(2)]
        together = await asyncio.gather(*(stream_one(client, url, "base", PROMPT, n_tokens) for _ in range(8)))
    one = statistics.median(decode_rate([r]) for r in alone)
    eight = decode_rate(together)
    ttft = sorted(r[0] for r in together)
    return {"one_client_tok_s": one, "eight_clients_tok_s": eight, "ratio": eight / one,
            "tokens_per_stream": statistics.mean(len(r[1]) for r in (*alone, *together)),
            "ttft_p50_s": statistics.median(ttft), "ttft_max_s": ttft[-1],
            "ttft_alone_s": statistics.median(r[0] for r in alone)}


async def mixed(url, n_requests, clients, seed=0):
    rng = random.Random(seed)
    plan = [(["base", "lora", "prefix"][i % 3], i % 2 == 0, rng.random() < 0.1, rng.randint(8, 48))
            for i in range(n_requests)]
    work = asyncio.Queue()
    for item in plan:
        work.put_nowait(item)
    failures, cancelled, done = [], 0, 0

    async def client_loop():
        nonlocal cancelled, done
        async with httpx.AsyncClient(timeout=300) as client:
            while not work.empty():
                model, stream, cancel, n = work.get_nowait()
                try:
                    _, _, finished = await stream_one(client, url, model, PROMPT[:rng.randint(40, len(PROMPT))], n,
                                                      cancel_after=3 if cancel and stream else None, stream=stream)
                    cancelled += not finished
                    done += finished
                except Exception as e:  # a failure is a finding, not a crash of the bench
                    failures.append(f"{model}: {type(e).__name__}: {e}")

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    return {"requests": n_requests, "clients": clients, "completed": done, "cancelled": cancelled,
            "failures": failures, "seconds": time.perf_counter() - start}


def batch_rows(url) -> float:
    m = re.search(r"^lmzoo_batch_rows ([0-9.e+]+)$", httpx.get(url + "/metrics").text, re.M)
    return float(m.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer tokens and requests: a smoke run")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--llama-cpp", default=None, metavar="PYTHON",
                    help="a Python with llama-cpp-python[server]: measure llama.cpp's server the same way")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lmzoo-bench-serve-"))
    adapters = make_adapters(tmp)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "lmzoo", "serve", "--port", str(port), "--name", "base",
                             "--adapter", f"lora={adapters['lora']}", "--adapter", f"prefix={adapters['prefix']}",
                             "--max-batch", "8", "--max-context", "1024"])
    try:
        wait_ready(url)
        n_tokens = 16 if args.quick else 64
        result = {"batching": asyncio.run(batching(url, n_tokens))}
        b = result["batching"]
        print(f"{b['tokens_per_stream']:.0f} tokens a stream; one client: {b['one_client_tok_s']:.1f} tok/s decode; "
              f"8 clients: {b['eight_clients_tok_s']:.1f} tok/s "
              f"aggregate ({b['ratio']:.2f}x); time to first token, 100-token prompt: alone "
              f"{b['ttft_alone_s']:.3f} s, under 8 clients p50 {b['ttft_p50_s']:.3f} s, max {b['ttft_max_s']:.3f} s")
        rss_before = rss_mb(proc.pid)
        result["mixed"] = asyncio.run(mixed(url, 30 if args.quick else 200, 16))
        time.sleep(1.0)
        result["mixed"].update(rss_before_mb=rss_before, rss_after_mb=rss_mb(proc.pid), rows_after=batch_rows(url))
        m = result["mixed"]
        print(f"mixed load: {m['requests']} requests from {m['clients']} clients in {m['seconds']:.1f} s: "
              f"{m['completed']} completed, {m['cancelled']} cancelled, {len(m['failures'])} failed; rows in the "
              f"batch afterwards: {m['rows_after']:.0f}; server RSS {m['rss_before_mb']:.0f} -> "
              f"{m['rss_after_mb']:.0f} MB ({m['rss_after_mb'] / m['rss_before_mb'] - 1:+.1%})")
        for f in m["failures"][:5]:
            print("  failure:", f)
        if args.llama_cpp:
            from lmzoo import default_model_path

            proc.terminate()  # one server at a time on the 2 cores
            proc.wait(timeout=20)
            result["llama_cpp"] = ll = llama_cpp_batching(args.llama_cpp, n_tokens, default_model_path())
            print(f"llama.cpp server ({ll['tokens_per_stream']:.0f} tokens a stream): one client "
                  f"{ll['one_client_tok_s']:.1f} tok/s, 8 clients "
                  f"{ll['eight_clients_tok_s']:.1f} tok/s ({ll['ratio']:.2f}x); time to first token alone "
                  f"{ll['ttft_alone_s']:.3f} s, p50 of 8 {ll['ttft_p50_s']:.3f} s")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()
