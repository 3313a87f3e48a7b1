"""The model-free rule reflector: plans searches the failed trial did not make, from the trial alone."""

from __future__ import annotations

import asyncio

import pytest

from retroformer_cli.agents.rule_reflector import RuleReflector, candidates, rule_reflection
from retroformer_cli.llm.base import GenerationConfig, Message

TRIAL = ("Previous trial:\nQuestion: Which label released the debut album of the Ostra Quartet?\n"
         "Thought 1: search it\nAction 1: Search[Ostra Quartet]\n"
         "Observation 1: Could not find [Ostra Quartet]. Similar: ['Ostra Quartet (band)', 'Ostra'].\n"
         "Thought 2: answer\nAction 2: Finish[Spindle]\nObservation 2: Answer is INCORRECT\n"
         "Observation: Answer is INCORRECT")


def test_suggested_pages_first_then_names_never_searched():
    found = candidates(TRIAL)
    assert found[:2] == ["Ostra Quartet (band)", "Ostra"]
    assert "Ostra Quartet" not in found  # already searched
    assert "Which" not in " ".join(found)


def test_reflection_names_at_most_two_pages_and_falls_back():
    text = rule_reflection(TRIAL)
    assert "Search[Ostra Quartet (band)] first, then Search[Ostra]" in text
    assert "Search[" not in rule_reflection("Previous trial:\nQuestion: what is it?\nObservation: Answer is INCORRECT")


def test_as_a_client_it_reads_the_reflection_prompt():
    msgs = [Message("system", "Reflect."), Message("user", TRIAL), Message("assistant", "Reflection:")]
    out = asyncio.run(RuleReflector().agenerate(msgs, GenerationConfig()))
    assert out.text == rule_reflection(TRIAL) and out.model_id == "rule"


def test_registered_for_the_reflector_only(workspace):
    from retroformer_cli.config import ModelConfig
    from retroformer_cli.errors import UsageError
    from retroformer_cli.llm import make_client

    assert make_client(ModelConfig(model="rule"), workspace, "--reflector").model_id == "rule"
    with pytest.raises(UsageError, match="only be the reflector"):
        make_client(ModelConfig(model="rule"), workspace, "--actor")
