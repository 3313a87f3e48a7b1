"""Whether a server is reachable from other machines, and the warning both servers print when it is open."""

from __future__ import annotations

import ipaddress

LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_server_warning(host: str, api_key: str | None, grants: str) -> str | None:
    """The warning for a server bound beyond loopback without a key (None when there is nothing to warn about);
    ``grants``: what anyone who reaches the port may then do."""
    if is_loopback(host) or api_key:
        return None
    return f"serving on {host} without --api-key: anyone who can reach this port can {grants}."
