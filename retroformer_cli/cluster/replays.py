"""``ppo --mode online --ray``: the candidate reflections' replays run on the cluster's nodes.

The reward stays the driver's (``stages/ppo_rewards.OnlineReward``: its cache, its in-flight deduplication, its
metric); only the episode moves: the same ``agents.actor.run_episode`` with the same memory, seed and actor, on
an env the node builds from the run's config, so a replay there gives the reward a local one gives. A replay whose
worker is lost goes again on another node, up to the run's ``env_retries`` times.
"""

from __future__ import annotations

import logging
from typing import Any

from retroformer_cli.cluster.dispatch import Runners, lost_worker
from retroformer_cli.cluster.runner import ReplayOrder, RunSetup
from retroformer_cli.errors import BackendError

log = logging.getLogger("retroformer.cluster")


class ClusterReplays:
    """The cluster side of online rewards: one :class:`RunSetup` per replayed run, runners started at first use."""

    def __init__(self, address: str, workspace: Any, concurrency: int):
        from retroformer_cli.cluster.connect import connect

        self.session = connect(address)
        self.workspace, self.concurrency = workspace, max(1, concurrency)
        self.setups: dict[str, RunSetup] = {}
        self.local_models = False
        self.runners: Runners | None = None

    def add_run(self, run: str, cfg: Any, actor: Any, model_id: str, gen: Any) -> None:
        """What the nodes need to replay ``run``: its config (actor override applied) and, in tests, a ready actor."""
        import copy
        from pathlib import Path

        from retroformer_cli.llm.registry import find

        shipped = copy.deepcopy(cfg)
        if shipped.data and Path(shipped.data).expanduser().exists():
            shipped.data = str(Path(shipped.data).expanduser().resolve())
        if actor is None:
            self.local_models |= find(cfg.actor.model.strip(), cfg.actor, self.workspace, "--actor")[0].in_process
        self.setups[run] = RunSetup(key=f"replay:{run}", cfg=shipped, workspace_root=str(Path(self.workspace.root).resolve()),
                                    model_ids=(model_id, None), actor_gen=gen, reflector_gen=gen, actor=actor,
                                    reflector=None)

    async def replay(self, run: str, task_id: str, memory: list[str]) -> tuple[float, bool, dict[str, Any]] | None:
        """(score, success, end info) of one episode of ``task_id`` with ``memory``, played on a node; None when its
        env failed every attempt there (``env_retries``)."""
        if self.runners is None:
            self.runners = Runners(self.session, self.concurrency, self.local_models, str(self.workspace.root))
        setup, losses, avoid = self.setups[run], 0, set()
        while True:
            if not self.runners.handles:  # every runner lost: ask for the nodes again
                self.runners.ensure(include_suspect=True)
                if not self.runners.handles:
                    raise BackendError("The Ray cluster has no alive node left to replay on (--ray).")
            node = self.runners.pick(avoid) or min(self.runners.handles, key=lambda n: self.runners.load[n])
            self.runners.load[node] += 1
            try:
                return await self.runners.handles[node].replay.remote(ReplayOrder(setup, task_id, list(memory)))
            except Exception as exc:
                if not lost_worker(exc):
                    raise getattr(exc, "cause", None) or exc from None
                self.runners.lost(node)
                losses += 1
                avoid.add(node)
                log.warning("replay of %s: worker lost (%s), attempt %d", task_id, type(exc).__name__, losses)
                if losses > max(0, setup.cfg.env_retries):
                    raise BackendError(f"Replays of task '{task_id}' lost their worker {losses} times (--ray).") from None
            finally:
                if node in self.runners.load:
                    self.runners.load[node] -= 1

    def close(self) -> None:
        if self.runners is not None:
            self.runners.close()
        self.session.close()
