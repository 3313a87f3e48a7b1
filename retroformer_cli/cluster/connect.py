"""Joining a Ray cluster (or starting a local one) for one run, and what the run's manifest records of it.

``--ray local`` starts a cluster in this process's machine (what ``ray.init()`` does with no address); ``auto``
joins the cluster ``ray start --head`` made on this machine (or the one ``RAY_ADDRESS`` names); anything else is
an address (``HOST:PORT`` or ``ray://HOST:PORT``). Secrets the workers need (``OPENAI_API_KEY``, ...) travel in
the job's runtime env, never in a log line.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from retroformer_cli.config import ENV_VARS
from retroformer_cli.errors import BackendError, MissingExtra, UsageError, missing_extra

log = logging.getLogger("retroformer.cluster")

LOCAL = "local"
# Variables the workers read as the driver does: the config's .env names, and the offline switches of the hubs.
PASSED_ENV = (*ENV_VARS, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "RETROFORMER_DEBUG")


def import_ray() -> Any:
    """``ray``, or the one-line error naming the ``ray`` extra."""
    try:
        import ray
    except ModuleNotFoundError as exc:
        raise (missing_extra(exc, "--ray") or MissingExtra("ray", "--ray")) from None
    return ray


PROBE_S = 5.0  # an address that does not answer this fast is reported at once (Ray itself retries for minutes)


def check_address(address: str) -> str:
    """``local``, ``auto``, or a HOST:PORT (``ray://`` allowed) that answers on TCP now."""
    address = (address or "").strip()
    if not address:
        raise UsageError("--ray needs a value: local (start a cluster here), auto (join this machine's) or HOST:PORT.")
    if address in (LOCAL, "auto"):
        return address
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise UsageError(f"--ray '{address}' is not local, auto or HOST:PORT.")
    import socket

    try:
        socket.create_connection((host, int(port)), timeout=PROBE_S).close()
    except OSError as exc:
        raise BackendError(f"Cannot reach the Ray cluster at '{address}' (--ray): {exc}.",
                           hint="start one with `ray start --head`, or use --ray local") from None
    return address


@dataclass
class ClusterSession:
    """One run's connection: ``address`` as given; ``owned`` when this run joined (it leaves at the end), not a
    caller that had joined already."""

    address: str
    owned: bool
    ray_version: str
    engine_stats: dict[str, Any] = field(default_factory=dict)  # node id -> its model server's engine counters

    def alive_nodes(self) -> list[str]:
        """The ids of the nodes alive now."""
        import ray

        return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]

    def describe(self) -> dict[str, Any]:
        """What the manifest keeps: the address asked for, the node count at the start, Ray's version."""
        return {"address": self.address, "nodes": len(self.alive_nodes()), "ray_version": self.ray_version}

    def close(self) -> None:
        """Leave the cluster (a local one stops with it); the run's actors end with the job."""
        import ray

        if self.owned and ray.is_initialized():
            ray.shutdown()


def join_cluster(address: str | None) -> ClusterSession | None:
    """:func:`connect` for ``--ray ADDRESS``; None (and no Ray) without it."""
    return None if address is None else connect(address)


def connect(address: str) -> ClusterSession:
    """Join (or start) the cluster ``address`` names, with the run's env variables in the job's runtime env."""
    address = check_address(address)
    ray = import_ray()
    env_vars = {k: os.environ[k] for k in PASSED_ENV if os.environ.get(k)}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env_vars}, "log_to_driver": False,
                              "logging_level": logging.WARNING, "configure_logging": False}
    if ray.is_initialized():  # a caller (a test, a notebook) already joined: use that connection
        return ClusterSession(address, owned=False, ray_version=ray.__version__)
    try:
        if address == LOCAL:
            # Ray announces, as a warning, that the cluster it starts for this run has token auth on: the secure
            # default, and nothing for the user to do, so it is not shown.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            ray.init(include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise BackendError(f"Cannot join the Ray cluster at '{address}' (--ray): {str(exc).splitlines()[0]}",
                           hint="start one with `ray start --head`, or use --ray local") from None
    return ClusterSession(address, owned=True, ray_version=ray.__version__)
