"""The native core of fastws (Rust, built with PyO3). Use it through ``fastws.Server``; this stub documents it."""

from collections.abc import Callable
from typing import Any, final

from typing_extensions import Self

from fastws.types import ChannelInfo, Member

__all__ = ["NativeServer", "RedisPublisher", "__version__", "next_log_record"]
__version__: str

@final
class NativeServer:
    """A WebSocket server whose sockets, channels and fan-out live in Rust threads.

    Args:
        settings: The resolved settings (``fastws.config.Settings.as_dict()``); unknown keys are ignored.
        authenticate: ``(path, query, headers, remote_addr) -> (user_id, info_json) | None``, called off the
            frame-moving threads for every handshake (``fastws._hooks`` builds it from the app's hook).
        authorize: ``(user_id, info_json, channel) -> bool | member_info_json`` for private/presence channels.
        on_connect: ``(socket_id, user_id, user_info_json, path, query, headers, remote_addr)``, fire and forget.
        on_disconnect: ``(socket_id, close_code)``, after that connection's on_connect returned.

    Raises:
        ValueError: a setting the core cannot use (a public key that is not PEM, no algorithm matching the key).
    """

    def __new__(
        cls,
        settings: dict[str, Any],
        authenticate: Callable[[str, str, list[tuple[str, str]], str], tuple[str, str] | None] | None = None,
        authorize: Callable[[str, str, str], bool | str] | None = None,
        on_connect: Callable[..., None] | None = None,
        on_disconnect: Callable[[str, int], None] | None = None,
    ) -> Self: ...
    def start(self) -> None:
        """Bind and serve in background threads; with ``redis_url``, join the cluster first.

        Raises:
            ConnectionError: ``redis_url`` is set and Redis can't be reached (one-line message, password hidden).
            OSError: the address cannot be bound (for example, the port is in use).
            RuntimeError: this server is already running.
        """

    def stop(self) -> None:
        """Close every connection with 1001 "going away" and wait until the server threads end. Idempotent."""

    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``."""

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); the real port when port 0 was asked for."""

    @property
    def broker(self) -> str:
        """How this node reaches the others: ``"memory"`` (alone) or ``"redis (<url>, prefix <p>, node <id>)"``."""

    def push(self, channel: str, payload: object, exclude: str | None = None) -> int:
        """Queue ``payload`` for the channel's subscribers on every node, except socket ``exclude``.

        ``bytes``, ``bytearray`` and ``memoryview`` are JSON text; anything else is serialised with orjson.

        The fan-out runs on the server's threads; the call waits only when 65,536 pushes are already queued.

        Returns:
            How many subscribers this node has for it now (other nodes get it through Redis, uncounted).

        Raises:
            ValueError: invalid channel name, or the payload is not JSON.
            TypeError: the payload is not JSON-serialisable.
            RuntimeError: the server is not running.
        """

    @property
    def jwt_algorithms(self) -> list[str]:
        """The JWT algorithms the core accepts: the configured ones whose key family is configured."""

    def push_to_user(self, user_id: str, payload: object) -> int:
        """Queue ``payload`` (as for ``push``) for a user's connections on every node; returns how many on this node.

        Raises:
            ValueError: the payload is not JSON.
            TypeError: the payload is not JSON-serialisable.
            RuntimeError: the server is not running.
        """

    def presence(self, channel: str) -> list[Member]:
        """The members of a presence channel in arrival order (empty when nobody is there), cluster-wide.

        Raises:
            ConnectionError: the node's Redis is unreachable.
        """

    def connection_count(self) -> int:
        """Open WebSocket connections on this node."""

    def channels(self) -> list[ChannelInfo]:
        """Every channel with a subscriber on some node, sorted by name (``members`` on presence channels).

        Raises:
            ConnectionError: the node's Redis is unreachable.
        """

    def channel_stats(self, name: str) -> ChannelInfo:
        """One channel, cluster-wide; a channel nobody is subscribed to reports 0 subscribers.

        Raises:
            ConnectionError: the node's Redis is unreachable.
        """

@final
class RedisPublisher:
    """Publishes into a fastws cluster's Redis exactly what its nodes publish, from a process with no server.

    Blocking calls on one connection, opened on first use and reopened once when it fails. ``fastws.Client``
    wraps it.

    Args:
        url: The cluster's Redis, as the nodes' ``redis_url``.
        prefix: The nodes' ``redis_prefix``.

    Raises:
        ValueError: the URL or the prefix is malformed.
    """

    def __new__(cls, url: str, prefix: str = "fastws") -> Self: ...
    def push(self, channel: str, payload: object, exclude: str | None = None) -> int:
        """Publish ``payload`` (JSON bytes, or an object serialised with orjson) to a channel.

        Returns:
            The number of nodes that received it (those with a subscriber on the channel).

        Raises:
            ValueError: invalid channel name, or the payload is not JSON.
            ConnectionError: Redis can't be reached or refused the request.
        """

    def push_to_user(self, user_id: str, payload: object) -> int:
        """Publish ``payload`` (as for ``push``) to a user's connections; returns how many nodes received it."""

    def presence(self, channel: str) -> list[Member]:
        """The members of a presence channel across the cluster, in arrival order."""

    def channel_stats(self, name: str) -> ChannelInfo:
        """One channel's cluster-wide counts."""

    def channels(self) -> list[ChannelInfo]:
        """Every channel with a subscriber on some node, sorted by name."""

    def nodes(self) -> dict[str, Any]:
        """``{"connections": total, "nodes": [{"id", "address", "connections"}]}`` of the live nodes."""

def next_log_record(timeout: float) -> tuple[int, str] | None:
    """The core's next log record as ``(logging level, message)``, or None after ``timeout`` seconds.

    ``fastws.app`` forwards them to the ``fastws`` logger from a daemon thread.
    """
