"""A long collect: memory, open files and manifest size stay bounded; eval on the result stays fast.

    python benchmarks/long_run.py [--tasks 2000] [--trials 3] [--concurrency 64] [--max-steps 2] [--delay 0.02]

Runs the whole CLI (`python -m retroformer_cli collect`) over ``--tasks`` made-up HotPotQA questions for
``--trials`` trials against the fake OpenAI-compatible server in another process (its answers never solve a
task, so every task plays every trial), sampling the collect process's RSS (VmRSS) and open file descriptors
every 0.25 s. Then times `retroformer eval --run` on the result (whole process). Reports RSS at the first
request (start), peak and end, the growth (peak - start; target < 200 MB), file descriptors (start/peak/end),
the manifest's size, wall times and requests. Progress on stderr; the last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from collect_scaling import start_server, write_questions  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sample(pid: int) -> tuple[float, int] | None:
    """(RSS in MB, open file descriptors) of ``pid``, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            rss = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024
        fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
        return rss, fds
    except (OSError, StopIteration):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=2000)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=2)
    ap.add_argument("--delay", type=float, default=0.02, help="server delay per request (s)")
    args = ap.parse_args()
    server, url = start_server(args.delay)
    try:
        with tempfile.TemporaryDirectory(prefix="retroformer-long-") as tmp:
            data = Path(tmp) / "questions.jsonl"
            write_questions(data, args.tasks)
            ws = Path(tmp) / "ws"
            cmd = [sys.executable, "-m", "retroformer_cli", "-w", str(ws), "collect", "--env", "hotpotqa", "--data",
                   str(data), "--split", "all", "--trials", str(args.trials), "--max-steps", str(args.max_steps),
                   "--concurrency", str(args.concurrency), "--run", "long", "--actor", "openai:fake",
                   "--actor-base-url", url, "--reflector", "openai:fake", "--reflector-base-url", url]
            started = time.time()
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            samples: list[tuple[float, float, int]] = []

            def watch() -> None:
                while proc.poll() is None:
                    s = sample(proc.pid)
                    if s is not None:
                        samples.append((time.time(), *s))
                    time.sleep(0.25)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            _, err = proc.communicate()
            wall = time.perf_counter() - t0
            watcher.join(5)
            if proc.returncode != 0:
                raise SystemExit(f"collect failed:\n{err[-3000:]}")
            with urllib.request.urlopen(f"{url.removesuffix('/v1')}/stats?since={started}") as resp:
                stats = json.loads(resp.read())
            first = stats["first_at"] or started
            steady = [s for s in samples if s[0] >= first] or samples
            rss_start, fds_start = steady[0][1], steady[0][2]
            rss_peak = max(s[1] for s in samples)
            fds_peak = max(s[2] for s in samples)
            rss_end, fds_end = samples[-1][1], samples[-1][2]
            lines = sum(1 for _ in (ws / "runs" / "long" / "trials.jsonl").open())
            manifest_kb = (ws / "runs" / "long" / "manifest.json").stat().st_size / 1024
            log(f"collect: {wall:.1f} s, {stats['requests']} requests, {lines} trial lines; RSS start {rss_start:.0f} MB "
                f"peak {rss_peak:.0f} MB end {rss_end:.0f} MB; fds {fds_start}/{fds_peak}/{fds_end}")
            t1 = time.perf_counter()
            ev = subprocess.run([sys.executable, "-m", "retroformer_cli", "-w", str(ws), "--json", "eval", "--run",
                                 "long"], cwd=ROOT, capture_output=True, text=True)
            eval_s = time.perf_counter() - t1
            if ev.returncode != 0:
                raise SystemExit(f"eval failed:\n{ev.stderr[-2000:]}")
            # the premise of the figures: the server's answer never solves a task, so every task plays every trial
            solved = json.loads(ev.stdout)["runs"][0]["success_per_trial"]
            if lines != args.tasks * args.trials or any(solved):
                raise SystemExit(f"expected {args.tasks} x {args.trials} unsolved trials, got {lines} trial lines and "
                                 f"success per trial {solved}")
            log(f"eval: {eval_s:.2f} s")
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps({
        "benchmark": "long_run", "tasks": args.tasks, "trials": args.trials, "concurrency": args.concurrency,
        "requests": stats["requests"], "trial_lines": lines, "collect_wall_s": round(wall, 1),
        "rss_start_mb": round(rss_start, 1), "rss_peak_mb": round(rss_peak, 1), "rss_end_mb": round(rss_end, 1),
        "rss_growth_mb": round(rss_peak - rss_start, 1), "fds_start": fds_start, "fds_peak": fds_peak,
        "fds_end": fds_end, "manifest_kb": round(manifest_kb, 1), "eval_wall_s": round(eval_s, 2),
    }))


if __name__ == "__main__":
    main()
