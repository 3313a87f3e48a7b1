"""ALFWorld prompts. The example episodes are our own: invented rooms and objects written in the
engine's exact text conventions, one per task type; none is copied from ReAct or Reflexion and none
is a benchmark game.

The actor sees the example of the task's own type (read from the goal in the first observation) after a
companion example of another type. Examples are written in the current ALFWorld wording (``move X to Y``,
"You arrive at desk 2."); when the env shows the ReAct wording (``wording="react"``: one newline before
"Your task is to:", ``put X in/on Y``), they are rewritten into it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from retroformer_cli.agents.prompts.base import PromptSet
from retroformer_cli.envs.alfworld.games import task_type_from_goal
from retroformer_cli.envs.alfworld.wording import command_in, observation_in
from retroformer_cli.llm.base import Message

_COMMANDS = ("go to (receptacle), open (receptacle), close (receptacle), take (object) from (receptacle), "
             "{place}, heat (object) with (receptacle), cool (object) with (receptacle), "
             "clean (object) with (receptacle), use (object), examine (something), inventory, look")

ACTOR_INSTRUCTION = """Interact with a household to solve a task. Each turn, write exactly one Thought line \
(what you know, what you plan next) and one Action line holding exactly one command; the environment answers \
with an Observation. The commands are: {commands}. Names always carry their number, e.g. "mug 1" or \
"countertop 2". You can hold one object at a time. To heat, cool or clean an object, hold it and stand at the \
microwave, the fridge or the sinkbasin. A command that cannot be done right now gives "Nothing happens."; \
then try something else."""

PICK = """You are in the middle of a room. Looking quickly around you, you see a bed 1, a drawer 3, a drawer 2, a drawer 1, a dresser 1, a garbagecan 1, a shelf 2, a shelf 1, and a sidetable 1.

Your task is to: put some keychain on sidetable.
Thought 1: I need a keychain, then I must move it to the sidetable 1. Keychains are usually on a dresser, a shelf or in a drawer. I will start with the dresser 1.
Action 1: go to dresser 1
Observation 1: You arrive at dresser 1. On the dresser 1, you see a alarmclock 1, a book 2, and a laptop 1.
Thought 2: No keychain on the dresser 1. Next I check the shelf 1.
Action 2: go to shelf 1
Observation 2: You arrive at shelf 1. On the shelf 1, you see a cd 1, and a pencil 2.
Thought 3: Still no keychain. A drawer may hold one, so I go to the drawer 1.
Action 3: go to drawer 1
Observation 3: You arrive at drawer 1. The drawer 1 is closed.
Thought 4: The drawer 1 is closed. I open it to look inside.
Action 4: open drawer 1
Observation 4: You open the drawer 1. The drawer 1 is open. In it, you see a keychain 2, and a pen 1.
Thought 5: There is a keychain 2. I take it.
Action 5: take keychain 2 from drawer 1
Observation 5: You pick up the keychain 2 from the drawer 1.
Thought 6: I hold the keychain 2. Now I go to the sidetable 1.
Action 6: go to sidetable 1
Observation 6: You arrive at sidetable 1. On the sidetable 1, you see a desklamp 1.
Thought 7: I am at the sidetable 1, so I move the keychain 2 onto it.
Action 7: move keychain 2 to sidetable 1
Observation 7: You move the keychain 2 to the sidetable 1."""

CLEAN = """You are in the middle of a room. Looking quickly around you, you see a cabinet 3, a cabinet 2, a cabinet 1, a countertop 2, a countertop 1, a diningtable 1, a drawer 2, a drawer 1, a fridge 1, a garbagecan 1, a microwave 1, a sinkbasin 1, a stoveburner 2, a stoveburner 1, and a toaster 1.

Your task is to: put a clean ladle in drawer.
Thought 1: I must find a ladle, clean it at the sinkbasin 1, then move it to a drawer. Ladles are kept on countertops, on the diningtable or in drawers. I begin with the countertop 1.
Action 1: go to countertop 1
Observation 1: You arrive at countertop 1. On the countertop 1, you see a bread 1, a knife 2, and a saltshaker 1.
Thought 2: No ladle here. I try the countertop 2.
Action 2: go to countertop 2
Observation 2: You arrive at countertop 2. On the countertop 2, you see a ladle 1, a plate 2, and a spatula 1.
Thought 3: I found a ladle 1. I take it.
Action 3: take ladle 1 from countertop 2
Observation 3: You pick up the ladle 1 from the countertop 2.
Thought 4: Now I need to clean the ladle 1, so I go to the sinkbasin 1.
Action 4: go to sinkbasin 1
Observation 4: You arrive at sinkbasin 1. On the sinkbasin 1, you see a cup 1.
Thought 5: I am at the sinkbasin 1 holding the ladle 1. I clean it.
Action 5: clean ladle 1 with sinkbasin 1
Observation 5: You clean the ladle 1 using the sinkbasin 1.
Thought 6: The ladle 1 is clean. Next I put it in a drawer, starting with the drawer 1.
Action 6: go to drawer 1
Observation 6: You arrive at drawer 1. The drawer 1 is closed.
Thought 7: The drawer 1 is closed, so I open it first.
Action 7: open drawer 1
Observation 7: You open the drawer 1. The drawer 1 is open. In it, you see a fork 1.
Thought 8: The drawer 1 is open. I move the clean ladle 1 into it.
Action 8: move ladle 1 to drawer 1
Observation 8: You move the ladle 1 to the drawer 1."""

HEAT = """You are in the middle of a room. Looking quickly around you, you see a cabinet 2, a cabinet 1, a coffeemachine 1, a countertop 1, a diningtable 1, a drawer 1, a fridge 1, a garbagecan 1, a microwave 1, a sinkbasin 1, a stoveburner 2, a stoveburner 1, and a toaster 1.

Your task is to: heat some potato and put it in diningtable.
Thought 1: I must find a potato, heat it with the microwave 1, then move it to the diningtable 1. Potatoes are often in the fridge, on the countertop or in the garbagecan. I look in the fridge 1 first.
Action 1: go to fridge 1
Observation 1: You arrive at fridge 1. The fridge 1 is closed.
Thought 2: The fridge 1 is closed. I open it.
Action 2: open fridge 1
Observation 2: You open the fridge 1. The fridge 1 is open. In it, you see a egg 1, a lettuce 2, and a winebottle 1.
Thought 3: There is no potato in the fridge 1. I check the countertop 1.
Action 3: go to countertop 1
Observation 3: You arrive at countertop 1. On the countertop 1, you see a bread 2, a potato 3, and a spoon 1.
Thought 4: There is a potato 3. I take it.
Action 4: take potato 3 from countertop 1
Observation 4: You pick up the potato 3 from the countertop 1.
Thought 5: Now I heat it, so I go to the microwave 1.
Action 5: go to microwave 1
Observation 5: You arrive at microwave 1. The microwave 1 is closed.
Thought 6: I am at the microwave 1 holding the potato 3. I heat it.
Action 6: heat potato 3 with microwave 1
Observation 6: You heat the potato 3 using the microwave 1.
Thought 7: The potato 3 is hot. I bring it to the diningtable 1.
Action 7: go to diningtable 1
Observation 7: You arrive at diningtable 1. On the diningtable 1, you see a fork 1, and a plate 1.
Thought 8: I move the hot potato 3 to the diningtable 1.
Action 8: move potato 3 to diningtable 1
Observation 8: You move the potato 3 to the diningtable 1."""

COOL = """You are in the middle of a room. Looking quickly around you, you see a cabinet 4, a cabinet 3, a cabinet 2, a cabinet 1, a countertop 1, a drawer 2, a drawer 1, a fridge 1, a garbagecan 1, a microwave 1, a sinkbasin 1, a stoveburner 3, a stoveburner 2, a stoveburner 1, and a toaster 1.

Your task is to: put a cool pot in stoveburner.
Thought 1: I must find a pot, cool it with the fridge 1, then move it to a stoveburner. Pots usually stand on stoveburners, on the countertop or in cabinets. I check the stoveburner 1 first.
Action 1: go to stoveburner 1
Observation 1: You arrive at stoveburner 1. On the stoveburner 1, you see a kettle 1.
Thought 2: That is a kettle, not a pot. I check the stoveburner 2.
Action 2: go to stoveburner 2
Observation 2: You arrive at stoveburner 2. On the stoveburner 2, you see nothing.
Thought 3: Nothing here. I try the stoveburner 3.
Action 3: go to stoveburner 3
Observation 3: You arrive at stoveburner 3. On the stoveburner 3, you see a pot 2.
Thought 4: I found a pot 2. I take it.
Action 4: take pot 2 from stoveburner 3
Observation 4: You pick up the pot 2 from the stoveburner 3.
Thought 5: Next I cool the pot 2 with the fridge 1.
Action 5: go to fridge 1
Observation 5: You arrive at fridge 1. The fridge 1 is closed.
Thought 6: I am at the fridge 1 holding the pot 2, so I cool it.
Action 6: cool pot 2 with fridge 1
Observation 6: You cool the pot 2 using the fridge 1.
Thought 7: The pot 2 is cool. I put it on a stoveburner; the stoveburner 2 is empty.
Action 7: go to stoveburner 2
Observation 7: You arrive at stoveburner 2. On the stoveburner 2, you see nothing.
Thought 8: I move the cool pot 2 to the stoveburner 2.
Action 8: move pot 2 to stoveburner 2
Observation 8: You move the pot 2 to the stoveburner 2."""

LOOK = """You are in the middle of a room. Looking quickly around you, you see a armchair 1, a bed 1, a desk 1, a drawer 2, a drawer 1, a garbagecan 1, a shelf 1, and a sidetable 1.

Your task is to: look at book under the desklamp.
Thought 1: I must find a book and look at it under the desklamp, which means holding the book and using the desklamp. Books lie on beds, desks, shelves and armchairs. I start with the bed 1.
Action 1: go to bed 1
Observation 1: You arrive at bed 1. On the bed 1, you see a book 1, a laptop 1, and a pillow 1.
Thought 2: There is a book 1. I take it.
Action 2: take book 1 from bed 1
Observation 2: You pick up the book 1 from the bed 1.
Thought 3: Now I need the desklamp. Maybe I can switch it on from here.
Action 3: use desklamp 1
Observation 3: Nothing happens.
Thought 4: I must stand next to the desklamp to use it. Desklamps are usually on a desk or a sidetable. I go to the desk 1.
Action 4: go to desk 1
Observation 4: You arrive at desk 1. On the desk 1, you see a cd 2, a pen 1, and a pencil 1.
Thought 5: No desklamp on the desk 1. I check the sidetable 1.
Action 5: go to sidetable 1
Observation 5: You arrive at sidetable 1. On the sidetable 1, you see a alarmclock 1, and a desklamp 1.
Thought 6: The desklamp 1 is here and I hold the book 1. I turn the desklamp on.
Action 6: use desklamp 1
Observation 6: You turn on the desklamp 1."""

PICK_TWO = """You are in the middle of a room. Looking quickly around you, you see a bathtubbasin 1, a cabinet 2, a cabinet 1, a countertop 1, a garbagecan 1, a handtowelholder 1, a sinkbasin 1, a toilet 1, a toiletpaperhanger 1, and a towelholder 1.

Your task is to: find two candle and put them in cabinet.
Thought 1: I need two candles, moved to a cabinet one at a time, because I can hold only one object. Candles stand on countertops, toilets and in cabinets. I look at the countertop 1 first.
Action 1: go to countertop 1
Observation 1: You arrive at countertop 1. On the countertop 1, you see a candle 1, a soapbottle 2, and a spraybottle 1.
Thought 2: There is a candle 1. I take it.
Action 2: take candle 1 from countertop 1
Observation 2: You pick up the candle 1 from the countertop 1.
Thought 3: I bring the first candle to the cabinet 1.
Action 3: go to cabinet 1
Observation 3: You arrive at cabinet 1. The cabinet 1 is closed.
Thought 4: The cabinet 1 is closed. I open it.
Action 4: open cabinet 1
Observation 4: You open the cabinet 1. The cabinet 1 is open. In it, you see a toiletpaper 1.
Thought 5: I move the candle 1 into the cabinet 1.
Action 5: move candle 1 to cabinet 1
Observation 5: You move the candle 1 to the cabinet 1.
Thought 6: One candle is done. I need a second one; the toilet 1 is a likely place.
Action 6: go to toilet 1
Observation 6: You arrive at toilet 1. On the toilet 1, you see a candle 3, and a soapbar 1.
Thought 7: There is a candle 3. I take it.
Action 7: take candle 3 from toilet 1
Observation 7: You pick up the candle 3 from the toilet 1.
Thought 8: I go back to the cabinet 1 with the second candle.
Action 8: go to cabinet 1
Observation 8: You arrive at cabinet 1. The cabinet 1 is open. In it, you see a candle 1, and a toiletpaper 1.
Thought 9: I move the candle 3 into the cabinet 1 as well.
Action 9: move candle 3 to cabinet 1
Observation 9: You move the candle 3 to the cabinet 1."""

EXAMPLES = {"pick": PICK, "clean": CLEAN, "heat": HEAT, "cool": COOL, "look": LOOK, "pick_two": PICK_TWO}
COMPANION = {"pick": "clean", "clean": "pick", "heat": "pick", "cool": "pick", "look": "pick", "pick_two": "pick"}

REFLECT_INSTRUCTION = """You are an agent that improves by reflecting on its own mistakes. Below is a previous \
trial in which you tried to solve a household task by giving text commands, and failed: you ran out of steps \
or the task was not completed. In a few sentences, state the root cause of the failure (a wrong object, a \
place you never checked, a step you skipped, a command the environment did not accept) and a concrete plan \
for the next attempt that avoids it, naming the places to visit and the commands to use."""

REFLECT_EXAMPLE = """Previous trial:
You are in the middle of a room. Looking quickly around you, you see a cabinet 2, a cabinet 1, a countertop 1, a diningtable 1, a fridge 1, a garbagecan 1, a microwave 1, a sinkbasin 1, and a stoveburner 1.

Your task is to: heat some egg and put it in garbagecan.
Thought 1: I need an egg. I check the countertop 1.
Action 1: go to countertop 1
Observation 1: You arrive at countertop 1. On the countertop 1, you see a egg 2, and a knife 1.
Thought 2: I take the egg 2.
Action 2: take egg 2 from countertop 1
Observation 2: You pick up the egg 2 from the countertop 1.
Thought 3: I heat it on the stoveburner.
Action 3: go to stoveburner 1
Observation 3: You arrive at stoveburner 1. On the stoveburner 1, you see a pan 1.
Thought 4: I heat the egg 2 here.
Action 4: heat egg 2 with stoveburner 1
Observation 4: Nothing happens.
Thought 5: I try again.
Action 5: heat egg 2 with stoveburner 1
Observation 5: Nothing happens.
Thought 6: I move the egg to the garbagecan.
Action 6: go to garbagecan 1
Observation 6: You arrive at garbagecan 1. On the garbagecan 1, you see nothing.
Thought 7: I put the egg here.
Action 7: move egg 2 to garbagecan 1
Observation 7: You move the egg 2 to the garbagecan 1.
Thought 8: The egg is in the garbagecan but the task is not done. I look around.
Action 8: look
Observation 8: You are facing the garbagecan 1. Next to it, you see nothing.
[steps 9 to 50 looked around and checked the inventory without progress]
Observation: Ran out of steps before finishing.

Reflection: I found and took the egg 2, but heating it with the stoveburner 1 gave "Nothing happens." twice and I \
moved on with a cold egg, so the task could never be completed. In this household objects are heated with the \
microwave. Next time I will take the egg 2 from the countertop 1, go to the microwave 1, run "heat egg 2 with \
microwave 1", check that the observation says the egg was heated, and only then move it to the garbagecan 1. \
When a command gives "Nothing happens.", I will change the command instead of repeating it."""

_LINE = re.compile(r"^(Action|Observation) (\d+): (.*)$")


def rewrite_example(text: str, wording: str) -> str:
    """An example episode (written in the ``alfworld`` wording) in ``wording``."""
    if wording == "alfworld":
        return text
    intro, _, rest = text.partition("\n\nYour task is to:")
    out = []
    for line in (intro + "\nYour task is to:" + rest).split("\n"):
        m = _LINE.match(line)
        if m and m.group(1) == "Action":
            line = f"Action {m.group(2)}: {command_in(m.group(3), wording)}"
        elif m:
            line = f"Observation {m.group(2)}: {observation_in(m.group(3), wording)}"
        out.append(line)
    return "\n".join(out)


def wording_of(first_observation: str) -> str:
    """Our env shows the goal after a blank line in the ``alfworld`` wording, after one newline in ``react``."""
    return "alfworld" if "\n\nYour task is to:" in first_observation else "react"


@dataclass(frozen=True)
class ALFWorldPromptSet(PromptSet):
    """Picks the few-shot examples by the task type in the first observation's goal, in its wording.

    The message layout is the base class's; only the instruction and the examples are filled in per
    episode (they stay the same for every step of an episode, so the system prompt remains a stable prefix)."""

    examples: Mapping[str, str] = field(default_factory=lambda: dict(EXAMPLES))
    companion: Mapping[str, str] = field(default_factory=lambda: dict(COMPANION))

    def instruction_for(self, wording: str) -> str:
        place = "put (object) in/on (receptacle)" if wording == "react" else "move (object) to (receptacle)"
        return self.actor_instruction.format(commands=_COMMANDS.format(place=place))

    def examples_for(self, first_observation: str) -> str:
        wording = wording_of(first_observation)
        kind = task_type_from_goal(first_observation)
        kinds = [self.companion.get(kind, "clean"), kind if kind in self.examples else "pick"]
        return "\n\n".join(rewrite_example(self.examples[k], wording) for k in kinds)

    def for_episode(self, first_observation: str) -> PromptSet:
        """A plain PromptSet with this episode's instruction, examples and reflection example."""
        wording = wording_of(first_observation)
        return PromptSet(actor_instruction=self.instruction_for(wording),
                         actor_examples=self.examples_for(first_observation),
                         reflect_instruction=self.reflect_instruction,
                         reflect_examples=rewrite_example(self.reflect_examples, wording),
                         action_format=self.action_format, few_shot=self.few_shot)

    def actor_messages(self, first_observation: str, memory: Sequence[str], scratchpad: str, step: int,
                       thought: str | None = None) -> list[Message]:
        return self.for_episode(first_observation).actor_messages(first_observation, memory, scratchpad, step, thought)

    def reflection_messages(self, first_observation: str, scratchpad: str, outcome: str) -> list[Message]:
        return self.for_episode(first_observation).reflection_messages(first_observation, scratchpad, outcome)


PROMPTS = ALFWorldPromptSet(
    actor_instruction=ACTOR_INSTRUCTION,
    actor_examples=PICK + "\n\n" + CLEAN,  # the generic pair; actor_prompt picks by task type
    reflect_instruction=REFLECT_INSTRUCTION,
    reflect_examples=REFLECT_EXAMPLE,
    action_format="one command, e.g. go to countertop 1",
)
