"""fastws: a real-time WebSocket server for Python applications, with a Rust core.

Start a server with ``fastws serve`` (or ``fastws.Server(...).run()``), then push from any code in that process::

    import fastws
    fastws.push("chat.room.1", {"event": "new-message", "data": {"text": "hi"}})
    fastws.to_user(123).push({"event": "notification", "data": {...}})
"""

from __future__ import annotations

from typing import Any

from fastws._fastws import __version__
from fastws.app import ChannelTarget, Server, UserTarget, current_server
from fastws.config import Settings
from fastws.errors import AlreadyRunning, ConfigError, FastWSError, NotRunning
from fastws.types import ChannelInfo, Connection, Headers, Member, Request, User

__all__ = [
    "AlreadyRunning",
    "ChannelInfo",
    "ChannelTarget",
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
    """Send ``payload`` to every subscriber of ``channel`` on the server running in this process.

    See ``Server.push``. Raises ``NotRunning`` when no server runs in this process.
    """
    return current_server().push(channel, payload, exclude=exclude)


def to_channel(name: str) -> ChannelTarget:
    """``fastws.to_channel("chat.room.1").push({...})``; the server is looked up when ``push`` is called."""
    return ChannelTarget(None, name)


def to_user(user_id: int | str) -> UserTarget:
    """``fastws.to_user(123).push({...})``: every connection of that user (ids compare as strings)."""
    return UserTarget(None, str(user_id))


def channels() -> list[ChannelInfo]:
    """Every channel with at least one subscriber, sorted by name."""
    return current_server().channels()


def channel_stats(name: str) -> ChannelInfo:
    """``{"name", "subscribers", "type"}`` of one channel, plus ``"members"`` on presence channels."""
    return current_server().channel_stats(name)


def presence(channel: str) -> list[Member]:
    """The members of a presence channel: ``[{"id", "info", "connected_at"}]``, in arrival order."""
    return current_server().presence(channel)


def connection_count() -> int:
    """Open WebSocket connections on the server running in this process."""
    return current_server().connection_count()
