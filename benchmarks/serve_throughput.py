"""`retroformer serve` throughput: 8 concurrent clients vs the same 8 requests sent one after another.

    python benchmarks/serve_throughput.py [--model embedded] [--threads N] [--max-tokens 64] [--workspace DIR]
                                          [--stagger-ms 250] [--no-prefix-reuse]

Starts the real server (`python -m retroformer_cli serve`) as a subprocess on a free 127.0.0.1 port, sends
greedy chat requests with the official `openai` client and reports completion tokens/s for three legs:
the 8 requests one after another (the baseline), all 8 at once (one burst), and 8 clients starting
``--stagger-ms`` apart (continuous batching: each joins the running batch at the next step). Also the per-request
latency (p50/p95), whether every leg's answers equal the baseline's, and the server's peak RSS (VmHWM, Linux).
The embedded model is cached in the workspace (first start ~20 s). Progress goes to stderr; the last stdout
line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
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
    ap.add_argument("--stagger-ms", type=float, default=250.0)
    ap.add_argument("--no-prefix-reuse", action="store_true")
    args = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "retroformer_cli", "-w", args.workspace, "serve", "--model", args.model,
           "--port", str(port), "--max-batch-size", str(len(QUESTIONS)), "--engine", args.engine]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.no_prefix_reuse:
        cmd += ["--no-prefix-reuse"]
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

    def leg(start_delays: list[float]) -> tuple[list, float]:
        def delayed(pair: tuple[float, str]):
            time.sleep(pair[0])
            return one(pair[1])

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            out = list(pool.map(delayed, zip(start_delays, QUESTIONS)))
        return out, time.perf_counter() - t0

    try:
        one("warm up")
        t0 = time.perf_counter()
        sequential = [one(q) for q in QUESTIONS]
        seq_s = time.perf_counter() - t0
        seq_tokens = sum(r[1] for r in sequential)
        log(f"sequential: {seq_tokens} tokens in {seq_s:.1f} s")
        concurrent, con_s = leg([0.0] * len(QUESTIONS))
        con_tokens = sum(r[1] for r in concurrent)
        log(f"one burst: {con_tokens} tokens in {con_s:.1f} s")
        staggered, stag_s = leg([i * args.stagger_ms / 1000 for i in range(len(QUESTIONS))])
        stag_tokens = sum(r[1] for r in staggered)
        log(f"staggered {args.stagger_ms:g} ms: {stag_tokens} tokens in {stag_s:.1f} s")
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        rss = peak_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    same = sum(a[0] == b[0] for a, b in zip(sequential, concurrent))
    same_stag = sum(a[0] == b[0] for a, b in zip(sequential, staggered))
    seq_lat = [r[2] for r in sequential]
    con_lat = [r[2] for r in concurrent]
    stag_lat = [r[2] for r in staggered]
    seq_rate = seq_tokens / seq_s
    result = {
        "benchmark": "serve_throughput",
        "model": args.model,
        "engine": args.engine,
        "prefix_reuse": not args.no_prefix_reuse,
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
        "speedup": round((con_tokens / con_s) / seq_rate, 2),
        "stagger_ms": args.stagger_ms,
        "staggered_tokens": stag_tokens,
        "staggered_s": round(stag_s, 2),
        "staggered_tok_per_s": round(stag_tokens / stag_s, 1),
        "staggered_speedup": round((stag_tokens / stag_s) / seq_rate, 2),
        "sequential_latency_p50_s": pct(seq_lat, 0.5),
        "sequential_latency_p95_s": pct(seq_lat, 0.95),
        "concurrent_latency_p50_s": pct(con_lat, 0.5),
        "concurrent_latency_p95_s": pct(con_lat, 0.95),
        "staggered_latency_p50_s": pct(stag_lat, 0.5),
        "staggered_latency_p95_s": pct(stag_lat, 0.95),
        "forward_passes": health.get("forward_passes"),
        "identical_answers": f"{same}/{len(QUESTIONS)}",
        "identical_answers_staggered": f"{same_stag}/{len(QUESTIONS)}",
        "server_peak_rss_mb": rss,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
