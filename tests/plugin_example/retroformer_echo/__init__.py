"""A tiny third-party plugin for retroformer: one env (``echo``) and one backend (``parrot:NAME``).

Only specs live here (strings and flags); the env, prompts and client load when used.
"""

from retroformer_cli.envs.spec import EnvSpec
from retroformer_cli.llm.registry import BackendSpec

ENV_SPEC = EnvSpec(
    name="echo", id="Echo-v0", entry_point="retroformer_echo.env:EchoEnv", prompts="retroformer_echo.prompts:PROMPTS",
    max_steps=3, action_names=("say",), options=("words",), spawn=True, description="say the word you are shown",
)

BACKEND_SPEC = BackendSpec(
    name="parrot", backend="parrot", scheme="parrot", resolve="retroformer_echo.backend:resolve",
    client="retroformer_echo.backend:make_client", usage="parrot:NAME",
)
