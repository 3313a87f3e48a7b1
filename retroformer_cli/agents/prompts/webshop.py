"""WebShop prompts. The few-shot episodes are our own, about made-up products (not WebShop's catalog and
not copied from ReAct or Reflexion), shown in the environment's ``[SEP]`` text format."""

from retroformer_cli.agents.prompts.base import PromptSet

ACTOR_INSTRUCTION = """You are shopping on a web store for the item the instruction describes. Interleave \
Thought, Action and Observation steps. Action is one of:
(1) search[keywords]: search the store (only on the search page; click[Back to Search] to get there).
(2) click[button]: click a button shown on the page: a product id such as B0XXXXXXX, an option value \
(size, colour, ...), Next > / < Prev, Description / Features / Reviews, Back to Search, or Buy Now.
Pick the product that matches the requested type and attributes, select every requested option, check \
that the price is below the limit, then click[Buy Now]. You have at most 15 actions.
Each reply is exactly one Thought line and one Action line."""

ACTOR_EXAMPLES = """WebShop [SEP] Instruction: [SEP] i want a waterproof picnic blanket that folds small, in green, and price lower than 40.00 dollars [SEP] Search
Thought 1: I need a waterproof, foldable picnic blanket in green under $40. I will search for it.
Action 1: search[waterproof foldable picnic blanket]
Observation 1: Instruction: [SEP] i want a waterproof picnic blanket that folds small, in green, and price lower than 40.00 dollars [SEP] Back to Search [SEP] Page 1 (Total results: 50) [SEP] Next > [SEP] B0PICNIC21 [SEP] Fernway Waterproof Picnic Blanket, Foldable Outdoor Mat with Carry Strap [SEP] $24.99 [SEP] B0PICNIC07 [SEP] Cozyhill Wool Picnic Rug, 60x80 inch [SEP] $52.0 [SEP] B0TENT0033 [SEP] Ridgeline 2 Person Tent [SEP] $89.0
Thought 2: B0PICNIC21 is waterproof and foldable and costs $24.99, under $40. I will open it.
Action 2: click[B0PICNIC21]
Observation 2: Instruction: [SEP] i want a waterproof picnic blanket that folds small, in green, and price lower than 40.00 dollars [SEP] Back to Search [SEP] < Prev [SEP] color [SEP] forest green [SEP] navy [SEP] red plaid [SEP] Fernway Waterproof Picnic Blanket, Foldable Outdoor Mat with Carry Strap [SEP] Price: $24.99 [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now
Thought 3: The instruction asks for green, so I select the colour forest green.
Action 3: click[forest green]
Observation 3: Instruction: [SEP] i want a waterproof picnic blanket that folds small, in green, and price lower than 40.00 dollars [SEP] Back to Search [SEP] < Prev [SEP] color [SEP] forest green [SEP] navy [SEP] red plaid [SEP] Fernway Waterproof Picnic Blanket, Foldable Outdoor Mat with Carry Strap [SEP] Price: $24.99 [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now
Thought 4: The type, attributes, colour and price all match. I will buy it.
Action 4: click[Buy Now]

WebShop [SEP] Instruction: [SEP] find me a stainless steel insulated water bottle, 32 oz, and price lower than 30.00 dollars [SEP] Search
Thought 1: I need a stainless steel insulated bottle of 32 oz under $30.
Action 1: search[stainless steel insulated water bottle 32 oz]
Observation 1: Instruction: [SEP] find me a stainless steel insulated water bottle, 32 oz, and price lower than 30.00 dollars [SEP] Back to Search [SEP] Page 1 (Total results: 50) [SEP] Next > [SEP] B0BOTTLE88 [SEP] Glacierline Insulated Water Bottle, Stainless Steel, Leak Proof Lid [SEP] $34.99 [SEP] B0BOTTLE12 [SEP] Aquaterra Stainless Steel Vacuum Insulated Bottle with Straw Lid [SEP] $19.5 to $26.0 [SEP] B0CUPS0040 [SEP] Plastic Party Cups, 100 Pack [SEP] $9.99
Thought 2: B0BOTTLE88 costs $34.99, over the $30 limit. B0BOTTLE12 is stainless steel, insulated and under $30, so I will check its sizes.
Action 2: click[B0BOTTLE12]
Observation 2: Instruction: [SEP] find me a stainless steel insulated water bottle, 32 oz, and price lower than 30.00 dollars [SEP] Back to Search [SEP] < Prev [SEP] size [SEP] 18 oz [SEP] 32 oz [SEP] 40 oz [SEP] Aquaterra Stainless Steel Vacuum Insulated Bottle with Straw Lid [SEP] Price: $19.5 to $26.0 [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now
Thought 3: It comes in 32 oz. I select that size.
Action 3: click[32 oz]
Observation 3: Instruction: [SEP] find me a stainless steel insulated water bottle, 32 oz, and price lower than 30.00 dollars [SEP] Back to Search [SEP] < Prev [SEP] size [SEP] 18 oz [SEP] 32 oz [SEP] 40 oz [SEP] Aquaterra Stainless Steel Vacuum Insulated Bottle with Straw Lid [SEP] Price: $19.5 to $26.0 [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now
Thought 4: Stainless steel, insulated, 32 oz, and at most $26. I will buy it.
Action 4: click[Buy Now]"""

REFLECT_INSTRUCTION = """You are an agent that improves by reflecting on its own mistakes. Below is a previous \
trial in which you tried to buy the item an instruction describes in a web store, with search and click \
actions, and did not get the full score: you bought a product of the wrong type, missed an attribute or an \
option, went over the price limit, or ran out of actions. In a few sentences, state the root cause of the \
failure and a concrete plan for the next attempt that avoids it (for example which keywords to search, what \
to check on the product page, which options to click)."""

REFLECT_EXAMPLES = """Previous trial:
WebShop [SEP] Instruction: [SEP] i need a large cotton hoodie in grey, and price lower than 40.00 dollars [SEP] Search
Thought 1: I will search for a cotton hoodie.
Action 1: search[cotton hoodie]
Observation 1: Instruction: [SEP] i need a large cotton hoodie in grey, and price lower than 40.00 dollars [SEP] Back to Search [SEP] Page 1 (Total results: 50) [SEP] Next > [SEP] B0HOODIE05 [SEP] Northcrest Cotton Pullover Hoodie [SEP] $28.0 [SEP] B0HOODIE19 [SEP] Emberly Fleece Zip Hoodie [SEP] $31.0
Thought 2: The first one is cotton and under $40.
Action 2: click[B0HOODIE05]
Observation 2: Instruction: [SEP] i need a large cotton hoodie in grey, and price lower than 40.00 dollars [SEP] Back to Search [SEP] < Prev [SEP] size [SEP] small [SEP] medium [SEP] large [SEP] color [SEP] heather grey [SEP] black [SEP] Northcrest Cotton Pullover Hoodie [SEP] Price: $28.0 [SEP] Rating: N.A. [SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now
Thought 3: This is the hoodie I want.
Action 3: click[Buy Now]
Observation 3: Your score (min 0.0, max 1.0): 0.6

Reflection: I bought the right hoodie but clicked Buy Now without selecting the size and colour the \
instruction asked for, so the options did not match. Next time, on the product page I will click[large] and \
click[heather grey] before click[Buy Now], and check every requested option is selected before buying."""


# the instructions and our own few-shot examples, in PromptSet's field order
PROMPTS = PromptSet(ACTOR_INSTRUCTION, ACTOR_EXAMPLES, REFLECT_INSTRUCTION, REFLECT_EXAMPLES, action_format="search[keywords] or click[button]")
