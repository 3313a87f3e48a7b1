"""HotPotQA prompts. The few-shot examples are our own, about made-up entities, so they cannot leak
answers from the benchmark and are not copied from ReAct or Reflexion."""

from retroformer_cli.agents.prompts.base import PromptSet

ACTOR_INSTRUCTION = """Solve a question answering task with interleaving Thought, Action, Observation steps. \
Thought reasons about the current situation. Action is one of three types:
(1) Search[entity]: searches the exact entity in the encyclopedia and returns its first paragraph; \
if it does not exist, returns some similar entities to search.
(2) Lookup[keyword]: returns the next sentence containing keyword in the last page searched.
(3) Finish[answer]: returns the answer and finishes the task. The answer is a short span (a name, \
a date, a number) or yes/no.
Each reply is exactly one Thought line and one Action line."""

ACTOR_EXAMPLES = """Question: Which river flows through the city where the painter Ilsa Varnholt was born?
Thought 1: I need to find where Ilsa Varnholt was born, then which river flows through that city.
Action 1: Search[Ilsa Varnholt]
Observation 1: Ilsa Varnholt (1861-1932) was a landscape painter born in Brelsk, a trading town in the northern lowlands. She is best known for her winter harbour scenes.
Thought 2: She was born in Brelsk. Now I need the river of Brelsk.
Action 2: Search[Brelsk]
Observation 2: Brelsk is a town on the lower Ostra river, known for its grain market and its stone bridge of 1714.
Thought 3: The Ostra river flows through Brelsk, so the answer is the Ostra.
Action 3: Finish[Ostra]

Question: Are the board games Kettlewick and Harbor Lanterns designed by the same person?
Thought 1: I need the designer of each game and then compare them.
Action 1: Search[Kettlewick]
Observation 1: Could not find [Kettlewick]. Similar: ['Kettlewick (board game)', 'Kettlewick Abbey'].
Thought 2: I should search the board game page.
Action 2: Search[Kettlewick (board game)]
Observation 2: Kettlewick is a 2009 tile-laying board game designed by Moritz Ahlgren and published by Spindle Games.
Thought 3: Kettlewick was designed by Moritz Ahlgren. Now Harbor Lanterns.
Action 3: Search[Harbor Lanterns]
Observation 3: Harbor Lanterns is a cooperative card game released in 2015. It was designed by Paula Oyelaran.
Thought 4: Kettlewick is by Moritz Ahlgren and Harbor Lanterns by Paula Oyelaran, so not the same person.
Action 4: Finish[no]

Question: How many seats did the stadium that hosted the 1998 Veldor Cup final have?
Thought 1: I need the stadium that hosted the 1998 Veldor Cup final, then its capacity.
Action 1: Search[1998 Veldor Cup]
Observation 1: The 1998 Veldor Cup was the ninth edition of the tournament. The final was played at Marrow Park in Tessing.
Thought 2: The final was at Marrow Park. I need its capacity.
Action 2: Search[Marrow Park]
Observation 2: Marrow Park is a football ground in Tessing. It opened in 1952 and was rebuilt in 1990.
Thought 3: The first paragraph does not give the capacity. I can look it up.
Action 3: Lookup[seats]
Observation 3: (Result 1 / 1) After the rebuild the ground seats 21,400 spectators.
Thought 4: Marrow Park seats 21,400, so the answer is 21,400.
Action 4: Finish[21,400]"""

REFLECT_INSTRUCTION = """You are an agent that improves by reflecting on its own mistakes. Below is a \
previous trial in which you tried to answer a question with Search, Lookup and Finish actions and failed, \
either because your Finish answer was wrong or because you ran out of steps. In a few sentences, state \
the root cause of the failure and a concrete plan for the next attempt that avoids it. Do not answer \
the question itself."""

REFLECT_EXAMPLES = """Previous trial:
Question: In which year did the author of the novel The Salt Orchard win the Crane Prize?
Thought 1: I will search the novel.
Action 1: Search[The Salt Orchard]
Observation 1: The Salt Orchard is a 1994 novel by Doreen Matsuka about a family of fruit growers.
Thought 2: The novel is from 1994, so the prize was probably won that year.
Action 2: Finish[1994]
Observation 2: Answer is INCORRECT

Reflection: I answered with the novel's publication year and assumed the prize came the same year, without \
checking. The question asks about the author's prize, which needs a second search. Next time I will search \
the author (Doreen Matsuka) and look up "Crane Prize" on her page before answering."""


# the instructions and our own few-shot examples, in PromptSet's field order
PROMPTS = PromptSet(ACTOR_INSTRUCTION, ACTOR_EXAMPLES, REFLECT_INSTRUCTION, REFLECT_EXAMPLES, action_format="Search[entity], Lookup[keyword] or Finish[answer]")
