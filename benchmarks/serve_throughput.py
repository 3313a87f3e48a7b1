"""`retroformer serve` throughput: 8 concurrent clients vs the same 8 requests sent one after another.

    python benchmarks/serve_throughput.py [--model embedded] [--threads N] [--max-tokens 64] [--workspace DIR]
                                          [--stagger-ms 250] [--no-prefix-reuse]

Starts the real server (`python -m retroformer_cli serve`) as a subprocess on a free 127.0.0.1 port, a fresh one
for each leg (so no leg reuses the prompt blocks an earlier leg left in the prefix cache; each server gets one
warm-up request first), sends greedy chat requests with the official `openai` client and reports completion
tokens/s for three legs:
the 8 requests one after another (the baseline), all 8 at once (one burst), and 8 clients starting
``--stagger-ms`` apart (continuous batching: each joins the running batch at the next step). Also the per-request
latency (p50/p95), whether every leg's answers equal the baseline's, and the servers' peak RSS (VmHWM, Linux).
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


class Server:
    """A fresh `retroformer serve` subprocess on a free port: each leg gets its own, so no leg reuses the prompt
    blocks another leg left in the prefix cache (prefix reuse still works within a leg)."""

    def __init__(self, args: argparse.Namespace):
        self.port = free_port()
        cmd = [sys.executable, "-m", "retroformer_cli", "-w", args.workspace, "serve", "--model", args.model,
               "--port", str(self.port), "--max-batch-size", str(len(QUESTIONS)), "--engine", args.engine]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        if args.no_prefix_reuse:
            cmd += ["--no-prefix-reuse"]
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        for line in self.proc.stderr:
            lines.append(line)
            if "ready" in line:
                break
        else:
            sys.exit("the server did not start:\n" + "".join(lines))
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # keep draining
        self.start_s = time.perf_counter() - t0
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.client = openai.OpenAI(base_url=self.base_url, api_key="EMPTY", max_retries=0, timeout=600)
        self.model, self.max_tokens = args.model, args.max_tokens

    def one(self, question: str) -> tuple[str, int, float]:
        started = time.perf_counter()
        r = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": question}],
                                                max_tokens=self.max_tokens, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens, time.perf_counter() - started

    def stop(self) -> tuple[dict, float | None]:
        """The server's /health counters and peak RSS, then SIGINT."""
        try:
            health = httpx.get(f"http://127.0.0.1:{self.port}/health").json()
            rss = peak_rss_mb(self.proc.pid)
        finally:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return health, rss


def run_leg(args: argparse.Namespace, name: str, start_delays: list[float] | None) -> dict:
    """One leg on a fresh server after one warm-up request: the questions in turn (``start_delays`` None) or from
    one client each, starting after the given delays. Answers, tokens, seconds, latencies, /health and RSS."""
    server = Server(args)
    try:
        server.one("warm up")

        def delayed(pair: tuple[float, str]):
            time.sleep(pair[0])
            return server.one(pair[1])

        t0 = time.perf_counter()
        if start_delays is None:
            out = [server.one(q) for q in QUESTIONS]
        else:
            with ThreadPoolExecutor(len(QUESTIONS)) as pool:
                out = list(pool.map(delayed, zip(start_delays, QUESTIONS)))
        seconds = time.perf_counter() - t0
    finally:
        health, rss = server.stop()
    tokens = sum(r[1] for r in out)
    log(f"{name}: {tokens} tokens in {seconds:.1f} s (fresh server, ready in {server.start_s:.1f} s)")
    return {"answers": [r[0] for r in out], "tokens": tokens, "s": seconds, "lat": [r[2] for r in out],
            "health": health, "rss": rss, "start_s": server.start_s}


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

    seq = run_leg(args, "sequential", None)
    con = run_leg(args, "one burst", [0.0] * len(QUESTIONS))
    stag = run_leg(args, f"staggered {args.stagger_ms:g} ms", [i * args.stagger_ms / 1000 for i in range(len(QUESTIONS))])
    seq_rate = seq["tokens"] / seq["s"]
    result = {
        "benchmark": "serve_throughput",
        "model": args.model,
        "engine": args.engine,
        "prefix_reuse": not args.no_prefix_reuse,
        "fresh_server_per_leg": True,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "clients": len(QUESTIONS),
        "max_tokens": args.max_tokens,
        "server_start_s": round(seq["start_s"], 2),
    }
    for key, leg in (("sequential", seq), ("concurrent", con), ("staggered", stag)):
        result.update({f"{key}_tokens": leg["tokens"], f"{key}_s": round(leg["s"], 2),
                       f"{key}_tok_per_s": round(leg["tokens"] / leg["s"], 1)})
        if key != "sequential":
            result[f"{key}_speedup" if key == "staggered" else "speedup"] = round((leg["tokens"] / leg["s"]) / seq_rate, 2)
    result["stagger_ms"] = args.stagger_ms
    for key, leg in (("sequential", seq), ("concurrent", con), ("staggered", stag)):
        result.update({f"{key}_latency_p50_s": pct(leg["lat"], 0.5), f"{key}_latency_p95_s": pct(leg["lat"], 0.95)})
    result.update({
        "forward_passes": {key: leg["health"].get("forward_passes") for key, leg in
                           (("sequential", seq), ("concurrent", con), ("staggered", stag))},
        "identical_answers": f"{sum(a == b for a, b in zip(seq['answers'], con['answers']))}/{len(QUESTIONS)}",
        "identical_answers_staggered": f"{sum(a == b for a, b in zip(seq['answers'], stag['answers']))}/{len(QUESTIONS)}",
        "server_peak_rss_mb": max((leg["rss"] for leg in (seq, con, stag) if leg["rss"] is not None), default=None),
    })
    print(json.dumps(result))


if __name__ == "__main__":
    main()
