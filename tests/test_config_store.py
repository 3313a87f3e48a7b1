import json
import os

import pytest

from retroformer_cli.config import CollectConfig, apply_overrides, build_config, fill_from_env, to_dict
from retroformer_cli.errors import ConfigError, DataError
from retroformer_cli.records import Reflection, Step, Trial
from retroformer_cli.store import JsonlWriter, read_jsonl, write_json_atomic


def test_precedence_defaults_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("trials: 5\nconcurrency: 2\nactor:\n  model: openai:gpt-x\n  max_tokens: 50\n")
    cfg = build_config(CollectConfig, y, {"trials": 2, "actor.temperature": 0.7})
    assert cfg.trials == 2  # flag beats YAML
    assert cfg.concurrency == 2  # YAML beats default
    assert cfg.actor.model == "openai:gpt-x" and cfg.actor.max_tokens == 50 and cfg.actor.temperature == 0.7
    assert cfg.memory_size == 3  # default


def test_shipped_config_loads():
    from pathlib import Path

    cfg = build_config(CollectConfig, Path(__file__).resolve().parents[1] / "configs" / "hotpotqa.yaml")
    assert cfg.env == "hotpotqa" and cfg.max_steps == 6


@pytest.mark.parametrize("text,needle", [
    ("trials: [1, 2\n", "not valid YAML"),
    ("- a\n- b\n", "must hold a mapping"),
    ("trails: 3\n", "did you mean 'trials'"),
    ("trials: many\n", "expects int"),
    ("actor: 3\n", "must be a mapping"),
])
def test_malformed_config(tmp_path, text, needle):
    y = tmp_path / "bad.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        build_config(CollectConfig, y)


def test_env_fills_only_unset():
    cfg = CollectConfig()
    cfg.actor.model = "openai"
    cfg.reflector.base_url = "http://explicit/v1"
    fill_from_env(cfg, {"OPENAI_BASE_URL": "http://env/v1", "OPENAI_API_KEY": "k", "OPENAI_MODEL": "m1",
                        "DATA_DIR": "/nonexistent-root"})
    assert cfg.actor.model == "openai:m1" and cfg.actor.base_url == "http://env/v1" and cfg.actor.api_key == "k"
    assert cfg.reflector.base_url == "http://explicit/v1"
    assert cfg.data == "/nonexistent-root"
    assert to_dict(cfg)["actor"]["api_key"] == "***"


def test_unknown_key_and_bad_value():
    with pytest.raises(ConfigError):
        apply_overrides(CollectConfig(), {"actor.colour": "red"})


def _trial(task="t1", k=1, refl=True):
    return Trial(run_id="r", env_id="hotpotqa", task_id=task, trial=k, instruction="Q?",
                 steps=[Step("think", "Finish[x]", "Answer is wrong", 0.0)], success=False, score=0.0,
                 terminated=True, truncated=False, memory=["m"],
                 reflection=Reflection("do better", [{"role": "user", "content": "p"}], "fake") if refl else None,
                 actor_model_id="fake", reflector_model_id="fake", actor_prompt=[{"role": "user", "content": "p"}])


def test_trial_round_trip_and_torn_tail(tmp_path):
    p = tmp_path / "trials.jsonl"
    with JsonlWriter(p) as w:
        w.append(_trial(k=1).to_json())
        w.append(_trial(k=2, refl=False).to_json())
    with p.open("ab") as f:  # a process killed mid-write leaves half a line
        f.write(b'{"run_id": "r", "tas')
    rows = list(read_jsonl(p))  # readers skip the torn tail
    assert [Trial.from_json(r).trial for r in rows] == [1, 2]
    assert Trial.from_json(rows[0]) == _trial(k=1)
    with JsonlWriter(p) as w:  # the next writer moves it aside and appends cleanly
        w.append(_trial(k=3).to_json())
    assert [r["trial"] for r in read_jsonl(p)] == [1, 2, 3]
    assert b'"tas' in (tmp_path / "trials.jsonl.torn").read_bytes()


def test_bad_line_in_middle_is_an_error(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\nnot json\n{"a": 2}\n')
    with pytest.raises(DataError, match="line 2"):
        list(read_jsonl(p))


def test_newer_schema_is_refused():
    d = _trial().to_json()
    d["schema_version"] = 99
    with pytest.raises(DataError, match="newer"):
        Trial.from_json(d)


def test_atomic_json(tmp_path):
    p = tmp_path / "m.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"a": 2})
    assert json.loads(p.read_text()) == {"a": 2}
    assert [x.name for x in tmp_path.iterdir()] == ["m.json"]
