"""`retroformer serve` throughput: 8 concurrent clients vs the same 8 requests sent one after another.

    python benchmarks/serve_throughput.py [--model embedded] [--threads 2] [--max-tokens 64] [--workspace DIR]

Starts the real server (`python -m retroformer_cli serve`) as a subprocess on a free 127.0.0.1 port, sends
greedy chat requests with the official `openai` client, and reports completion tokens/s for both runs, the
per-request latency (p50/p95), whether the answers are identical, the batch sizes the server ran and the
server's peak RSS (VmHWM, Linux). The embedded model is cached in the workspace (first start ~20 s).
Progress goes to stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "Explain in two sentences why the sky is blue.",
    "Give one tip for writing clear code.",
    "What does a thermometer measure?",
    "Write a haiku about autumn.",
    "How many legs does a spider have?",
    "Suggest a name for a pet turtle and say why.",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return round(ordered[k], 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--workspace", default="retroformer-workspace", help="where the embedded model is cached")
    ap.add_argument("--engine", default="transformers")
    args = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "retroformer_cli", "-w", args.workspace, "serve", "--model", args.model,
           "--port", str(port), "--max-batch-size", str(len(QUESTIONS)), "--engine", args.engine]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    for line in proc.stderr:
        lines.append(line)
        if "ready" in line:
            break
    else:
        sys.exit("the server did not start:\n" + "".join(lines))
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep draining stderr
    start_s = time.perf_counter() - t0
    base_url = f"http://127.0.0.1:{port}/v1"
    log(f"server ready in {start_s:.1f} s at {base_url}")
    client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=600)

    def one(question: str) -> tuple[str, int, float]:
        started = time.perf_counter()
        r = client.chat.completions.create(model=args.model, messages=[{"role": "user", "content": question}],
                                           max_tokens=args.max_tokens, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens, time.perf_counter() - started

    try:
        one("warm up")
        t0 = time.perf_counter()
        sequential = [one(q) for q in QUESTIONS]
        seq_s = time.perf_counter() - t0
        seq_tokens = sum(r[1] for r in sequential)
        log(f"sequential: {seq_tokens} tokens in {seq_s:.1f} s")
        batches_before = httpx.get(f"http://127.0.0.1:{port}/health").json()["batches"]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            concurrent = list(pool.map(one, QUESTIONS))
        con_s = time.perf_counter() - t0
        con_tokens = sum(r[1] for r in concurrent)
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        log(f"concurrent: {con_tokens} tokens in {con_s:.1f} s ({health['batches'] - batches_before} batch(es))")
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    same = sum(a[0] == b[0] for a, b in zip(sequential, concurrent))
    seq_lat = [r[2] for r in sequential]
    con_lat = [r[2] for r in concurrent]
    result = {
        "benchmark": "serve_throughput",
        "model": args.model,
        "engine": args.engine,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "clients": len(QUESTIONS),
        "max_tokens": args.max_tokens,
        "server_start_s": round(start_s, 2),
        "sequential_tokens": seq_tokens,
        "sequential_s": round(seq_s, 2),
        "sequential_tok_per_s": round(seq_tokens / seq_s, 1),
        "concurrent_tokens": con_tokens,
        "concurrent_s": round(con_s, 2),
        "concurrent_tok_per_s": round(con_tokens / con_s, 1),
        "speedup": round((con_tokens / con_s) / (seq_tokens / seq_s), 2),
        "sequential_latency_p50_s": pct(seq_lat, 0.5),
        "sequential_latency_p95_s": pct(seq_lat, 0.95),
        "concurrent_latency_p50_s": pct(con_lat, 0.5),
        "concurrent_latency_p95_s": pct(con_lat, 0.95),
        "concurrent_batches": health["batches"] - batches_before,
        "identical_answers": f"{same}/{len(QUESTIONS)}",
        "server_peak_rss_mb": rss,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
