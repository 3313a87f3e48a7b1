from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tests never read a developer's .env or real endpoints, and never reach a hub.
for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL", "DATA_DIR", "CKPT_DIR", "RETROFORMER_WORKSPACE"):
    os.environ.pop(var, None)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"../shared/data/{name} is absent (CI always has it)")
    return path


@pytest.fixture
def workspace(tmp_path):
    from retroformer_cli.workspace import Workspace

    return Workspace.open(tmp_path / "ws")


@pytest.fixture(scope="session")
def embedded_cache(tmp_path_factory):
    """One cache of the dequantized embedded model for the whole session (a ~13 s conversion)."""
    return tmp_path_factory.mktemp("embedded-cache")
