"""A small httpx client for `retroformer env serve`; a remote session is Gymnasium-shaped.

>>> from retroformer_cli.envserver.client import EnvClient  # doctest: +SKIP
>>> with EnvClient("http://127.0.0.1:8001", api_key="secret") as client, client.session() as env:
...     obs, info = env.reset(options={"task_id": "fixed_0"})
...     obs, reward, terminated, truncated, info = env.step("search[red shoes]")
"""

from __future__ import annotations

from typing import Any

from retroformer_cli.errors import RetroformerError


class EnvServerClientError(RetroformerError):
    """The server answered an error (``status``, ``code``) or could not be reached (``status`` 0)."""

    def __init__(self, message: str, status: int = 0, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


class EnvClient:
    """One connection pool to a server; :meth:`session` opens a :class:`RemoteEnv`."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 130.0, **httpx_kwargs: Any):
        import httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s, **httpx_kwargs)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        import httpx

        try:
            resp = self._http.request(method, path, json=body if method in ("POST", "PUT", "PATCH") else None)
        except httpx.HTTPError as exc:
            raise EnvServerClientError(f"Cannot reach the environment server at {self.base_url} "
                                       f"({type(exc).__name__}: {exc}).") from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code >= 400:
            err = (data or {}).get("error", {}) if isinstance(data, dict) else {}
            message = err.get("message") or resp.text[:200] or resp.reason_phrase
            raise EnvServerClientError(f"The environment server answered {resp.status_code}: {message}",
                                       resp.status_code, err.get("code"))
        return data

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")

    def metadata(self) -> dict[str, Any]:
        return self.request("GET", "/metadata")

    def task_ids(self, offset: int = 0, limit: int = 10000) -> list[str]:
        return self.request("GET", f"/tasks?offset={offset}&limit={limit}")["task_ids"]

    def session(self) -> "RemoteEnv":
        return RemoteEnv(self, self.request("POST", "/sessions", {})["session_id"])

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "EnvClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RemoteEnv:
    """A server session: ``reset(seed, options) -> (obs, info)``, ``step(action) -> (obs, reward, terminated,
    truncated, info)``, ``state()``, ``close()``; ``options["task_id"]`` picks the task."""

    def __init__(self, client: EnvClient, session_id: str):
        self.client, self.session_id = client, session_id
        self._path = f"/sessions/{session_id}"

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        opts = dict(options or {})
        body: dict[str, Any] = {"seed": seed}
        if "task_id" in opts:
            body["task_id"] = str(opts.pop("task_id"))
        if opts:
            body["options"] = opts
        data = self.client.request("POST", self._path + "/reset", body)
        return data["observation"]["text"], data["info"]

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        data = self.client.request("POST", self._path + "/step", {"action": {"text": action}})
        return data["observation"]["text"], data["reward"], data["terminated"], data["truncated"], data["info"]

    def state(self) -> dict[str, Any]:
        return self.client.request("GET", self._path + "/state")

    def close(self) -> None:
        try:
            self.client.request("DELETE", self._path)
        except EnvServerClientError as exc:
            if exc.status != 404:  # already closed or expired
                raise

    def __enter__(self) -> "RemoteEnv":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
