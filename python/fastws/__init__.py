"""fastws: a real-time WebSocket server for Python applications, with a Rust core.

Start a server with ``fastws serve`` (or ``fastws.Server(...).run()``), then push from any code in that process::

    import fastws
    fastws.push("chat.room.1", {"event": "new-message", "data": {"text": "hi"}})
    fastws.to_user(123).push({"event": "notification", "data": {...}})

In a process without a server the same functions use ``FASTWS_REDIS_URL`` (the cluster's Redis) or ``FASTWS_URL``
(a node's HTTP API); ``fastws.Client(...)`` is the explicit form.
"""

from __future__ import annotations

from typing import Any

from fastws import app as _app
from fastws._fastws import __version__
from fastws.app import ChannelTarget, Server, UserTarget
from fastws.client import Client, current_target
from fastws.config import Settings
from fastws.errors import AlreadyRunning, ConfigError, FastWSError, NotRunning
from fastws.types import ChannelInfo, Connection, Headers, Member, Request, User

__all__ = [
    "AlreadyRunning",
    "ChannelInfo",
    "ChannelTarget",
    "Client",
    "ConfigError",
    "Connection",
    "FastWSError",
    "Headers",
    "Member",
    "NotRunning",
    "Request",
    "Server",
    "Settings",
    "User",
    "UserTarget",
    "__version__",
    "channel_stats",
    "channels",
    "connection_count",
    "presence",
    "push",
    "to_channel",
    "to_user",
]


def push(channel: str, payload: Any, *, exclude: str | None = None) -> int:
    """Send ``payload`` to every subscriber of ``channel``.

    Through the server running in this process (see ``Server.push``), else through ``FASTWS_REDIS_URL`` or
    ``FASTWS_URL`` (see ``Client.push``, which says what the number returned counts on each route). Raises
    ``NotRunning`` when there is none of the three.
    """
    # The common case first, straight to the native call: a module lookup, not current_target()'s import and
    # checks, nor Server.push's frame (this is the API's hot path).
    server = _app._current
    if server is not None:
        native = server._native
        if native is not None:
            return native.push(channel, payload, exclude)
        return server.push(channel, payload, exclude=exclude)  # raises NotRunning
    return current_target().push(channel, payload, exclude=exclude)


def to_channel(name: str) -> ChannelTarget:
    """``fastws.to_channel("chat.room.1").push({...})``; the target is looked up when ``push`` is called."""
    return ChannelTarget(None, name)


def to_user(user_id: int | str) -> UserTarget:
    """``fastws.to_user(123).push({...})``: every connection of that user (ids compare as strings)."""
    return UserTarget(None, str(user_id))


def channels() -> list[ChannelInfo]:
    """Every channel with at least one subscriber, sorted by name (cluster-wide with Redis)."""
    return current_target().channels()


def channel_stats(name: str) -> ChannelInfo:
    """``{"name", "subscribers", "type"}`` of one channel, plus ``"members"`` on presence channels."""
    return current_target().channel_stats(name)


def presence(channel: str) -> list[Member]:
    """The members of a presence channel: ``[{"id", "info", "connected_at"}]``, in arrival order."""
    return current_target().presence(channel)


def connection_count() -> int:
    """Open WebSocket connections: on the server running in this process, else on every node (``Client``)."""
    return current_target().connection_count()
