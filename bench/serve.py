"""Benchmark for `scriven serve`: many clients at once versus the same requests one at a time,
over loopback. Prints one JSON summary.

It starts the server on 127.0.0.1 (a free port) in a subprocess, sends `--requests` generation
requests (`--tokens` new tokens each) all at once, then the same requests one after another;
then the same for translation requests. Reported per phase: requests/s, tokens/s, p50/p99
latency, errors; and the throughput ratio concurrent / one at a time. The server's own counters
(model steps, largest batch) show how much batching happened. Everything is bounded: each phase
stops at its share of `--max-seconds` (the one-at-a-time rate is then taken from the requests
done), and the server is stopped at the end whatever happens.

Targets (issue "See inside and serve"): no errors, p99 under 5 s for 50-token generations,
throughput at least 3x one-at-a-time.

    python bench/serve.py RUN_LM RUN_TRANSLATOR          # trained checkpoints or run folders
    python bench/serve.py --quick                        # trains two tiny models first (~30 s)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ["anna said", "the prince looked at", "levin went to", "she smiled at the",
           "kitty thought of", "he saw the nurse", "the station", "and then"]
SENTENCES = ["the big dog sleeps.", "the old cat eats.", "the small child reads.",
             "the red car runs.", "the old woman sings.", "the big house sleeps.",
             "the small man eats.", "the red book reads."]


# ---------------------------------------------------------------------------------------------
# Tiny models for --quick


def _quick_models(folder: Path, steps: int) -> tuple[Path, Path]:
    import torch

    from scriven.lm import train_lm
    from scriven.translation import train_translate
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the machine is shared
    rng = random.Random(0)
    subjects = ["anna", "the prince", "levin", "she", "he", "the nurse", "kitty"]
    verbs = ["said", "looked at", "went to", "thought of", "smiled at", "saw"]
    objects = ["the house", "the garden", "her son", "the station", "the window", "him"]
    lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
             for _ in range(600)]
    (folder / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    nouns = {"cat": "chat", "dog": "chien", "house": "maison", "man": "homme",
             "woman": "femme", "child": "enfant", "book": "livre", "car": "voiture"}
    adjectives = {"big": "grand", "small": "petit", "red": "rouge", "old": "vieux"}
    verbs_fr = {"sleeps": "dort", "eats": "mange", "runs": "court", "sings": "chante",
                "reads": "lit"}
    pairs = []
    for _ in range(600):
        n, a, v = rng.choice(list(nouns)), rng.choice(list(adjectives)), rng.choice(list(verbs_fr))
        pairs.append(f"the {a} {n} {v}.\tle {nouns[n]} {adjectives[a]} {verbs_fr[v]}.")
    (folder / "pairs.tsv").write_text("\n".join(pairs) + "\n", encoding="utf-8")
    train_lm(str(folder / "text.txt"), folder / "lm", preset="tiny", batch_size=8, seq_len=16,
             max_steps=steps, lr=1e-2, eval_every=steps, progress=False)
    train_translate(str(folder / "pairs.tsv"), folder / "translator", preset="tiny",
                    vocab_size=300, max_steps=steps, max_tokens=1024, lr=3e-3, warmup_steps=20,
                    eval_every=steps, bleu_sentences=10, progress=False)
    return folder / "lm", folder / "translator"


# ---------------------------------------------------------------------------------------------
# The server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(lm: Path, translator: Path, threads: int, max_batch: int,
                 timeout: float, precision: str = "fp32") -> tuple[subprocess.Popen, int]:
    port = _free_port()
    command = [sys.executable, "-m", "scriven", "serve", f"lm={lm}", f"translator={translator}",
               "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads),
               "--max-batch", str(max_batch), "--timeout", "60", "--log-level", "warning",
               "--precision", precision]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited: {server.stderr.read() if server.stderr else ''}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return server, port
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop_server(server)
    raise SystemExit("the server did not start in time")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


# ---------------------------------------------------------------------------------------------
# Load


def _summary(latencies: list[float], errors: list[str], seconds: float, tokens: int) -> dict:
    ok = sorted(latencies)

    def pct(p: float) -> float | None:
        return round(ok[min(len(ok) - 1, int(p * len(ok)))], 4) if ok else None

    return {"requests": len(ok) + len(errors), "errors": len(errors),
            "error_examples": sorted(set(errors))[:3], "seconds": round(seconds, 3),
            "requests_per_second": round(len(ok) / seconds, 2) if seconds else None,
            "tokens_per_second": round(tokens / seconds, 1) if seconds else None,
            "p50_s": pct(0.50), "p99_s": pct(0.99),
            "mean_s": round(statistics.fmean(ok), 4) if ok else None}


class Connection:
    """A minimal HTTP/1.1 client on asyncio streams (keep-alive, JSON bodies, Content-Length
    responses). The load generator must not be the bottleneck: on this 2-core machine httpx's
    AsyncClient spent about 10 ms of CPU per request at 200 connections (measured with
    max_new_tokens 0), more than the server does, and it runs on the same cores."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\n"
                          f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                          "\r\n".encode() + data)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        length = int(headers.get("content-length", headers.get("Content-Length", "0")))
        return status, await self.reader.readexactly(length)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


async def _one(connection: Connection, path: str, body: dict,
               budget: float) -> tuple[float, int, str | None]:
    start = time.perf_counter()
    try:
        status, raw = await asyncio.wait_for(connection.post(path, body), budget)
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError) as e:
        await connection.close()
        connection.writer = None
        return time.perf_counter() - start, 0, type(e).__name__
    took = time.perf_counter() - start
    if status != 200:
        return took, 0, f"HTTP {status}: {raw[:120].decode(errors='replace')}"
    data = json.loads(raw)
    if "samples" in data:
        tokens = sum(s["generated_tokens"] for s in data["samples"])
    else:
        tokens = sum(len(t["tokens"]) for t in data["translations"])
    return took, tokens, None


async def concurrent(port: int, path: str, bodies: list[dict], budget: float) -> dict:
    """Every request at once, each on its own connection."""
    connections = [Connection("127.0.0.1", port) for _ in bodies]
    start = time.perf_counter()
    results = await asyncio.gather(*(_one(c, path, b, budget)
                                     for c, b in zip(connections, bodies)))
    seconds = time.perf_counter() - start
    await asyncio.gather(*(c.close() for c in connections))
    return _summary([t for t, _, e in results if e is None], [e for _, _, e in results if e],
                    seconds, sum(n for _, n, _ in results))


async def one_at_a_time(port: int, path: str, bodies: list[dict], budget: float) -> dict:
    """The same requests one after another on one kept-alive connection."""
    connection = Connection("127.0.0.1", port)
    results = []
    start = time.perf_counter()
    for body in bodies:
        results.append(await _one(connection, path, body, budget))
        if time.perf_counter() - start > budget:
            break  # the rate comes from the requests done
    seconds = time.perf_counter() - start
    await connection.close()
    out = _summary([t for t, _, e in results if e is None], [e for _, _, e in results if e],
                   seconds, sum(n for _, n, _ in results))
    out["stopped_early"] = len(results) < len(bodies)
    return out


def run(port: int, path: str, bodies: list[dict], budget: float) -> dict:
    together = asyncio.run(concurrent(port, path, bodies, budget / 2))
    alone = asyncio.run(one_at_a_time(port, path, bodies, budget / 2))
    ratio = (together["requests_per_second"] / alone["requests_per_second"]
             if together["requests_per_second"] and alone["requests_per_second"] else None)
    return {"concurrent": together, "one_at_a_time": alone,
            "throughput_ratio": round(ratio, 2) if ratio else None}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("lm", nargs="?", help="language-model checkpoint or run folder")
    p.add_argument("translator", nargs="?", help="translator checkpoint or run folder")
    p.add_argument("--quick", action="store_true", help="train two tiny models and use them")
    p.add_argument("--quick-steps", type=int, default=150, help="training steps for --quick")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--tokens", type=int, default=50, help="new tokens per generation")
    p.add_argument("--beam", type=int, default=1, help="beam size for translations")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the server")
    p.add_argument("--max-batch", type=int, default=64, help="the server's --max-batch")
    p.add_argument("--precision", default="fp32", help="the server's --precision")
    p.add_argument("--max-seconds", type=float, default=600.0, help="bound on the whole run")
    p.add_argument("--out", help="also write the JSON here")
    a = p.parse_args(argv)
    if not a.quick and not (a.lm and a.translator):
        p.error("give LM and TRANSLATOR checkpoints, or --quick")
    if not 1 <= a.requests <= 10_000 or not 1 <= a.tokens <= 512:
        p.error("--requests must be in [1, 10000] and --tokens in [1, 512]")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scriven-bench-serve-") as tmp:
        if a.quick:
            lm, translator = _quick_models(Path(tmp), a.quick_steps)
        else:
            lm, translator = Path(a.lm), Path(a.translator)
        server, port = start_server(lm, translator, a.threads, a.max_batch, timeout=120,
                                     precision=a.precision)
        try:
            budget = max(10.0, (a.max_seconds - (time.monotonic() - started)) / 2)
            generate = [{"prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": a.tokens,
                         "temperature": 0.8, "top_k": 20, "seed": i} for i in range(a.requests)]
            translate = [{"text": SENTENCES[i % len(SENTENCES)], "beam": a.beam}
                         for i in range(a.requests)]
            result_generate = run(port, "/v1/generate", generate, budget)
            result_translate = run(port, "/v1/translate", translate, budget)
            server_stats = httpx.get(f"http://127.0.0.1:{port}/healthz",
                                     timeout=5).json()["models"]
        finally:
            stop_server(server)
    g = result_generate
    summary = {
        "benchmark": "serve",
        "quick": a.quick,
        "machine": {"cpus": os.cpu_count(), "server_torch_threads": a.threads,
                    "max_batch": a.max_batch, "precision": a.precision,
                    "python": sys.version.split()[0]},
        "generate": {"requests": a.requests, "new_tokens": a.tokens, **g},
        "translate": {"requests": a.requests, "beam": a.beam, **result_translate},
        "server": server_stats,
        "targets": {
            "no_errors": g["concurrent"]["errors"] == 0 and
                         result_translate["concurrent"]["errors"] == 0,
            "generate_p99_under_5s": (g["concurrent"]["p99_s"] or 1e9) < 5.0,
            "generate_throughput_at_least_3x": (g["throughput_ratio"] or 0) >= 3.0,
            "translate_throughput_at_least_3x": (result_translate["throughput_ratio"] or 0) >= 3.0,
        },
        "seconds": round(time.monotonic() - started, 1),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n", encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
