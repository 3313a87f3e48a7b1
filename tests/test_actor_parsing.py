import pytest

from retroformer_cli.agents.actor import parse_reply

NAMES = ("search", "lookup", "finish")


@pytest.mark.parametrize("reply,thought,action", [
    ("Thought 2: I should search.\nAction 2: Search[Ed Wood]", "I should search.", "Search[Ed Wood]"),
    (" I should search.\nAction 2: Search[Ed Wood]\nObservation 2: made up", "I should search.", "Search[Ed Wood]"),
    ("I know it. Finish[yes]", "I know it.", "Finish[yes]"),
    ("thought: x\naction: lookup[born]", "x", "lookup[born]"),
    ("Let me think\n\nAction 1: Finish[1990]\nThought 2: more", "Let me think", "Finish[1990]"),
    ("Search[Paris", "", "Search[Paris"),
])
def test_parse_reply(reply, thought, action):
    p = parse_reply(reply, NAMES)
    assert p.thought == thought and p.action == action


def test_no_action():
    p = parse_reply("I am not sure what to do.", NAMES)
    assert p.action is None and p.thought == "I am not sure what to do."


def test_unknown_bare_action_ignored():
    assert parse_reply("maybe list[1] first", NAMES).action is None
