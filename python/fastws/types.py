"""The public value types: what auth hooks receive and return, and what the stats and presence API return."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

__all__ = ["ChannelInfo", "ChannelType", "Connection", "Headers", "Member", "Request", "User"]

ChannelType = Literal["public", "private", "presence"]


class _ChannelInfoBase(TypedDict):
    name: str
    subscribers: int
    type: ChannelType


class ChannelInfo(_ChannelInfoBase, total=False):
    """One channel as ``channels()`` and ``channel_stats()`` describe it; ``members`` on presence channels."""

    members: int


class Member(TypedDict):
    """One member of a presence channel."""

    id: str
    info: dict[str, Any]
    connected_at: int


class Headers(Mapping[str, str]):
    """Request headers, looked up case-insensitively; repeated headers are joined with ", "."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: dict[str, str] = {}
        for name, value in items:
            key = name.lower()
            self._items[key] = f"{self._items[key]}, {value}" if key in self._items else value

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({self._items!r})"


@dataclass(frozen=True)
class Request:
    """The HTTP upgrade request of a connection, as an ``authenticate`` hook sees it."""

    path: str
    #: Query parameters (the last value wins when a name repeats).
    query: dict[str, str]
    headers: Headers
    #: The client's IP address (the proxy's, behind a reverse proxy).
    remote_addr: str
    remote_port: int = 0


@dataclass(frozen=True, init=False)
class User:
    """An authenticated user. The id is always a string, so ``to_user(123)`` reaches user ``"123"``.

    Args:
        id: The user id (an int is converted to str).
        info: Public info shown to other presence members (name, avatar...).
    """

    id: str
    info: dict[str, Any] = field(default_factory=dict)

    def __init__(self, id: str | int, info: Mapping[str, Any] | None = None) -> None:
        if isinstance(id, bool) or not isinstance(id, (str, int)) or str(id) == "":
            raise ValueError(f"a user id must be a non-empty str or an int, not {id!r}")
        object.__setattr__(self, "id", str(id))
        object.__setattr__(self, "info", dict(info or {}))


@dataclass(frozen=True)
class Connection:
    """A WebSocket connection, as ``on_connect`` and ``on_disconnect`` hooks see it."""

    socket_id: str
    #: The authenticated user; None in open mode.
    user: User | None
    #: The HTTP upgrade request that opened it.
    request: Request
