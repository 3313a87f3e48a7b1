"""WebShop (Yao et al., 2022) in-process: catalog, goals, Lucene-parity search, pages and the official reward."""

from retroformer_cli.envs.spec import EnvSpec

SPEC = EnvSpec(
    name="webshop", id="WebShop-v0", entry_point="retroformer_cli.envs.webshop.env:WebShopEnv",
    prompts="retroformer_cli.agents.prompts.webshop:PROMPTS", max_steps=15, action_names=("search", "click"),
    options=("goals", "split", "observation_mode", "goal_file", "num_products", "seed", "search_anywhere"),
    cache_dir=True, spawn=True, oracle="retroformer_cli.envs.webshop.oracle:oracle_hints",
    description="WebShop product search and purchase, with the official reward",
)
