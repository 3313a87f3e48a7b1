"""The llama.cpp side of ``benchmarks/engine_vs_llamacpp.py`` (issue #19), against a stand-in ``llama_cpp``
package whose ``Llama`` reads its model parameters the way llama-cpp-python 0.3.36 does and "segfaults" (SIGSEGV)
on every eval while extra buffer types are on, as the real one did on this AMX CPU: the crash is one line, the
retry with extra buffer types off is measured and labelled, and a missing module is one line."""

from __future__ import annotations

import importlib.util
import stat
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BINDINGS = '''
import ctypes
class llama_model_params(ctypes.Structure):
    _fields_ = [("n_gpu_layers", ctypes.c_int32), ("use_extra_bufts", ctypes.c_bool)]
def llama_model_default_params():
    params = llama_model_params()
    params.use_extra_bufts = True
    return params
'''

LLAMA = '''
import os, signal, time
{extra_import}
import llama_cpp.llama_cpp as llama_cpp  # as llama-cpp-python's llama.py: the defaults are looked up per call
class Llama:
    def __init__(self, model_path, **kwargs):
        self.model_params = llama_cpp.llama_model_default_params()
    def tokenize(self, text, add_bos=False):
        return list(range(len(text.split())))
    def eval(self, ids):
        if self.model_params.use_extra_bufts:
            os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(0.001)
    def reset(self):
        pass
    def __call__(self, prompt, max_tokens, temperature):
        time.sleep(0.001)
        return {{"usage": {{"completion_tokens": max_tokens}}}}
'''

INIT = '''
__version__ = "0.0.0-standin"
def llama_print_system_info():
    return b"CPU : AVX512 = 1 | AMX_INT8 = 1 | "
from llama_cpp.llama import Llama
'''


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("engine_vs_llamacpp", REPO / "benchmarks" / "engine_vs_llamacpp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def standin_python(root: Path, extra_import: str = "") -> str:
    """An interpreter that sees only the stand-in ``llama_cpp`` and the standard library (``-S``: no
    site-packages, where the real llama-cpp-python may be installed)."""
    pkg = root / "site" / "llama_cpp"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(INIT)
    (pkg / "llama_cpp.py").write_text(BINDINGS)
    (pkg / "llama.py").write_text(LLAMA.format(extra_import=extra_import))
    script = root / "python"
    script.write_text(f'#!/bin/sh\nPYTHONPATH="{root / "site"}" exec "{sys.executable}" -S "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


@pytest.fixture
def text(tmp_path) -> str:
    path = tmp_path / "prompt.txt"
    path.write_text("word " * 50)
    return str(path)


def test_auto_records_the_crash_in_one_line_then_measures_without_extra_buffer_types(bench, tmp_path, text, capsys):
    row = bench.llama_side(standin_python(tmp_path), "model.gguf", 1, text, "auto")
    assert list(row) == ["llamacpp_q4_1", "llamacpp_q4_1_no_extra_bufts"]
    crashed, retried = row["llamacpp_q4_1"], row["llamacpp_q4_1_no_extra_bufts"]
    assert crashed["extra_bufts"] == "on" and crashed["use_extra_bufts"] is True
    assert crashed["error"] == "killed by SIGSEGV during warm-up, llm.eval of 32 tokens", crashed
    assert "prefill_tok_per_s" not in crashed
    assert retried["extra_bufts"] == "off" and retried["use_extra_bufts"] is False and "error" not in retried
    assert retried["prefill_tok_per_s"] > 0 and retried["decode_1_tok_per_s"] > 0
    for record in (crashed, retried):  # each configuration says what it ran on
        assert record["version"] == "0.0.0-standin" and "AMX_INT8 = 1" in record["system_info"]
        assert "stage" not in record
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and "extra buffer types on (the defaults)" in err[0] and "SIGSEGV" in err[0]
    assert "extra buffer types off (use_extra_bufts=false)" in err[1] and "prefill_tok_per_s" in err[1]


def test_on_measures_the_defaults_only_and_off_skips_them(bench, tmp_path, text):
    python = standin_python(tmp_path)
    on = bench.llama_side(python, "model.gguf", 2, text, "on")
    assert list(on) == ["llamacpp_q4_1"] and "SIGSEGV" in on["llamacpp_q4_1"]["error"]
    off = bench.llama_side(python, "model.gguf", 2, text, "off")
    assert list(off) == ["llamacpp_q4_1_no_extra_bufts"] and "error" not in off["llamacpp_q4_1_no_extra_bufts"]


def test_a_missing_module_is_one_line_naming_it(bench, tmp_path, text):
    python = standin_python(tmp_path, extra_import="import diskcache")
    row = bench.llama_side(python, "model.gguf", 1, text, "on")
    error = row["llamacpp_q4_1"]["error"]
    assert "\n" not in error and "No module named 'diskcache'" in error and "pip install diskcache" in error, error
    assert error.startswith("exit code 1: ")


def test_an_interpreter_that_cannot_run_is_one_line(bench, tmp_path, text):
    row = bench.llama_side(str(tmp_path / "no-such-python"), "model.gguf", 1, text, "off")
    assert row["llamacpp_q4_1_no_extra_bufts"]["error"].startswith(f"cannot run {tmp_path / 'no-such-python'}")

