"""``fastws.Client``: push to a fastws deployment, and read its channels and presence, from a process that runs
no server (a web app's workers, a cron job, a queue consumer).

Two routes, the same methods:

- ``Client(redis_url="redis://...")`` publishes straight into the cluster's Redis with the native publisher, which
  builds exactly the messages the nodes exchange (no HTTP hop). A push returns the number of **nodes** that
  received it (Redis' answer to PUBLISH): the nodes with a subscriber on that channel; for ``to_user``, every node.
- ``Client(url="http://host:9501", api_key=...)`` calls one node's HTTP API (``POST /api/publish``,
  ``GET /api/presence``, ``GET /stats``). A push returns the number of subscribers **on the node that answered**
  it queued the frame for; the other nodes of a cluster deliver it too, uncounted.

The module-level functions (``fastws.push``, ``fastws.to_user(...).push`` ...) act on the server running in this
process, else on a client built from the environment: ``FASTWS_REDIS_URL`` (with ``FASTWS_REDIS_PREFIX``), else
``FASTWS_URL`` (with ``FASTWS_API_KEY``). See docs/scaling.md.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
from typing import TYPE_CHECKING, Any, cast

from fastws._encode import encode_payload
from fastws._http import OpsError, normalize_url, request_json
from fastws.errors import NotRunning
from fastws.types import ChannelInfo, ChannelType, Member

if TYPE_CHECKING:
    from fastws._fastws import RedisPublisher
    from fastws.app import ChannelTarget, Server, UserTarget

__all__ = ["Client", "current_target"]

_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _channel_type(name: str) -> ChannelType:
    if name.startswith("private-"):
        return "private"
    if name.startswith("presence-"):
        return "presence"
    return "public"


def _empty_channel(name: str) -> ChannelInfo:
    info: ChannelInfo = {"name": name, "subscribers": 0, "type": _channel_type(name)}
    if info["type"] == "presence":
        info["members"] = 0
    return info


class Client:
    """Push to, and read, fastws nodes from any process: through their Redis, or one node's HTTP API.

    Give exactly one of ``redis_url`` and ``url``.

    Args:
        redis_url: The cluster's Redis (``redis://``, ``rediss://`` or ``unix://``), as the nodes' ``redis_url``.
        redis_prefix: The nodes' ``redis_prefix`` (default ``FASTWS_REDIS_PREFIX``, else ``"fastws"``).
        url: A node's address (``http://host:9501``; ``ws://`` works too), for its HTTP API.
        api_key: The node's ``api_key``, when it has one (needed from another machine).

    Raises:
        ValueError: neither or both of ``redis_url`` and ``url``, or a malformed one.

    Example:
        >>> client = fastws.Client(redis_url="redis://localhost:6379/0")
        >>> client.push("chat.room.1", {"event": "new-message", "data": {"text": "hi"}})
        2
    """

    def __init__(
        self,
        *,
        redis_url: str | None = None,
        redis_prefix: str | None = None,
        url: str | None = None,
        api_key: str | None = None,
    ) -> None:
        if (redis_url is None) == (url is None):
            raise ValueError("give exactly one of redis_url= (the cluster's Redis) and url= (a node's HTTP API)")
        self._publisher: RedisPublisher | None = None
        self._base_url = ""
        self._api_key = api_key or None
        if redis_url is not None:
            if not redis_url.startswith(_REDIS_SCHEMES):
                raise ValueError(f"redis_url must start with redis://, rediss:// or unix://, not {redis_url[:20]!r}")
            from fastws._fastws import RedisPublisher

            prefix = redis_prefix or os.environ.get("FASTWS_REDIS_PREFIX") or "fastws"
            self._publisher = RedisPublisher(redis_url, prefix)
        else:
            self._base_url = normalize_url(cast(str, url))

    @property
    def route(self) -> str:
        """``"redis"`` or ``"http"``: how this client reaches the nodes."""
        return "redis" if self._publisher is not None else "http"

    def __repr__(self) -> str:
        return f"<fastws.Client via {self.route}>"

    # -- pushing ---------------------------------------------------------------------------------------------

    def push(self, channel: str, payload: Any, *, exclude: str | None = None) -> int:
        """Send ``payload`` to every subscriber of ``channel``, on every node.

        The payload rules are those of ``Server.push``. ``exclude`` is a ``socket_id`` (of any node) not to
        deliver to.

        Returns:
            Through Redis: the number of nodes that received it (those with a subscriber on the channel).
            Through HTTP: the number of subscribers on the node that answered.

        Raises:
            ValueError: invalid channel name, or bytes that are not JSON.
            TypeError: the payload is not JSON-serialisable.
            ConnectionError: Redis or the node could not be reached, or refused the request.
        """
        if self._publisher is not None:
            return self._publisher.push(channel, payload, exclude)
        data = encode_payload(payload)
        fields: dict[str, str] = {"channel": channel}
        if exclude is not None:
            fields["exclude"] = exclude
        return self._http_publish(fields, data)

    def push_to_user(self, user_id: int | str, payload: Any) -> int:
        """Send ``payload`` to every connection of a user, on every node.

        Returns:
            Through Redis: the number of nodes that received it (every live node). Through HTTP: the number of
            that user's connections on the node that answered.
        """
        if self._publisher is not None:
            return self._publisher.push_to_user(str(user_id), payload)
        return self._http_publish({"user": str(user_id)}, encode_payload(payload))

    def to_channel(self, name: str) -> ChannelTarget:
        """``client.to_channel("chat.room.1").push({...})``."""
        from fastws.app import ChannelTarget

        return ChannelTarget(self, name)

    def to_user(self, user_id: int | str) -> UserTarget:
        """``client.to_user(123).push({...})``: every connection of that user (ids compare as strings)."""
        from fastws.app import UserTarget

        return UserTarget(self, str(user_id))

    # -- reading ---------------------------------------------------------------------------------------------

    def presence(self, channel: str) -> list[Member]:
        """The members of a presence channel across the cluster, in arrival order."""
        if self._publisher is not None:
            return self._publisher.presence(channel)
        query = urllib.parse.urlencode({"channel": channel})
        answer = self._http_get(f"/api/presence?{query}")
        return cast("list[Member]", answer.get("members", []))

    def channels(self) -> list[ChannelInfo]:
        """Every channel with a subscriber on some node, sorted by name."""
        if self._publisher is not None:
            return self._publisher.channels()
        return cast("list[ChannelInfo]", self._http_get("/stats").get("channels", []))

    def channel_stats(self, name: str) -> ChannelInfo:
        """One channel's cluster-wide counts (0 subscribers when nobody is subscribed)."""
        if self._publisher is not None:
            return self._publisher.channel_stats(name)
        for info in self.channels():
            if info.get("name") == name:
                return info
        return _empty_channel(name)

    def connection_count(self) -> int:
        """Open WebSocket connections on every node (each node's figure is refreshed every second)."""
        if self._publisher is not None:
            return int(self._publisher.nodes()["connections"])
        return int(self._http_get("/stats").get("connections", 0))

    # -- HTTP route ------------------------------------------------------------------------------------------

    def _http_get(self, path: str) -> dict[str, Any]:
        try:
            answer = request_json(self._base_url, path, api_key=self._api_key)
        except OpsError as exc:
            raise self._http_error(exc) from None
        if not isinstance(answer, dict):
            raise ConnectionError(f"{self._base_url}{path} did not answer a JSON object; is it a fastws server?")
        return answer

    def _http_publish(self, fields: dict[str, str], payload: bytes) -> int:
        # The payload goes through as encoded, not decoded and re-encoded.
        body = json.dumps(fields)[:-1].encode() + b', "payload": ' + payload + b"}"
        try:
            answer = request_json(self._base_url, "/api/publish", api_key=self._api_key, body=body)
        except OpsError as exc:
            raise self._http_error(exc) from None
        delivered = answer.get("delivered") if isinstance(answer, dict) else None
        if not isinstance(delivered, int):
            raise ConnectionError(f"{self._base_url}/api/publish answered {str(answer)[:200]}, not a delivery count")
        return delivered

    @staticmethod
    def _http_error(exc: OpsError) -> Exception:
        if exc.status == 400:
            return ValueError(str(exc))
        return ConnectionError(str(exc))


# -- the module-level functions' target ------------------------------------------------------------------------

_default_lock = threading.Lock()
_default: tuple[tuple[str | None, ...], Client] | None = None


def _environment_client() -> Client | None:
    """A client built from ``FASTWS_REDIS_URL`` (preferred) or ``FASTWS_URL``, reused while they don't change."""
    global _default
    redis_url = os.environ.get("FASTWS_REDIS_URL") or None
    url = os.environ.get("FASTWS_URL") or None
    if redis_url is None and url is None:
        return None
    prefix = os.environ.get("FASTWS_REDIS_PREFIX") or None
    api_key = os.environ.get("FASTWS_API_KEY") or None
    key = (redis_url, prefix, url, api_key)
    with _default_lock:
        if _default is None or _default[0] != key:
            if redis_url is not None:
                client = Client(redis_url=redis_url, redis_prefix=prefix)
            else:
                client = Client(url=url, api_key=api_key)
            _default = (key, client)
        return _default[1]


def current_target() -> Server | Client:
    """What the module-level functions act on: the server running in this process, else a client built from the
    environment (``FASTWS_REDIS_URL``, else ``FASTWS_URL``).

    Raises:
        NotRunning: no server runs in this process and neither variable is set.
    """
    from fastws.app import _current

    server = _current
    if server is not None:
        return server
    client = _environment_client()
    if client is None:
        raise NotRunning(
            "no fastws server is running in this process (start one with fastws.Server(...).start(), or run this "
            "code inside `fastws serve module:server`); to push from another process set FASTWS_REDIS_URL to the "
            "cluster's Redis, or FASTWS_URL (and FASTWS_API_KEY) to a node's address, or use fastws.Client(...)"
        )
    return client
