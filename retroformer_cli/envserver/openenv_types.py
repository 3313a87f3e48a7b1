"""The action, observation and state types of ``retroformer env serve`` for OpenEnv clients: what an OpenEnv env
publishes (its ``models.py``) so that a client can type its ``EnvClient``.

They have the fields and settings of OpenEnv's ``Action``, ``Observation`` and ``State``
(``openenv.core.env_server.types`` in openenv-core 0.3.0) plus ours, but are plain pydantic models: neither the
server nor a client needs OpenEnv to import them (importing OpenEnv loads gradio and fastmcp, seconds).

On the wire an observation travels as OpenEnv's ``serialize_observation`` sends one:
``{"observation": {"text", "info", "terminated", "truncated"}, "reward", "done"}``, where ``metadata`` is left
out (so the env's own info travels in ``info``).
"""

from __future__ import annotations

from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr

# the fields OpenEnv's serialize_observation moves out of the observation (metadata is dropped)
WIRE_TOP_LEVEL = frozenset({"reward", "done", "metadata"})


class TextAction(BaseModel):
    """One text command, as the env's agents write it: ``search[red shoes]``, ``go to shelf 1``, ``Finish[yes]``.
    An action the env does not understand is an observation saying so, never an error."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    text: StrictStr = Field(description="The command, e.g. 'search[red shoes]' or 'go to shelf 1'")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Additional metadata for the action")


class TextObservation(BaseModel):
    """What the env says after a reset or a step, with OpenEnv's ``done``, ``reward`` and ``metadata``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    text: str = Field(description="The observation text the agent reads")
    info: dict[str, Any] = Field(default_factory=dict, description="The env's info: WebShop's instruction and "
                                 "available actions, ALFWorld's admissible commands and success, ...")
    terminated: bool = Field(default=False, description="The episode ended in the env (won, bought, answered)")
    truncated: bool = Field(default=False, description="The episode hit the step limit")
    done: bool = Field(default=False, description="Whether the episode has terminated")
    reward: Union[bool, int, float, None] = Field(default=None, description="Reward signal from the last action")
    metadata: dict[str, Any] = Field(default_factory=dict, description="Additional metadata for the observation")


class SessionState(BaseModel):
    """OpenEnv's ``State`` (``episode_id``, ``step_count``) and the session's own fields."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    episode_id: Optional[str] = Field(default=None, description="Unique identifier for the current episode")
    step_count: int = Field(default=0, ge=0, description="Number of steps taken in the current episode")
    session_id: Optional[str] = Field(default=None, description="This connection's session")
    task_id: Optional[str] = Field(default=None, description="The task of the current episode")
    episodes: int = Field(default=0, ge=0, description="Episodes started in this session")
    done: bool = Field(default=True, description="No episode is running (none started, or it ended)")
    total_reward: float = Field(default=0.0, description="Reward summed over the current episode")
