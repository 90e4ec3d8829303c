"""Adapters between the native core and the application's auth hooks.

The core calls these from its blocking-pool threads (never from the threads that move frames) with plain values,
and gets plain values back. They build the public ``Request``/``User`` objects, run sync hooks directly and
``async def`` hooks on the server's event loop with ``hook_timeout``, and log a hook's traceback before the core
refuses the request it was deciding.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any
from urllib.parse import parse_qsl

import orjson

from fastws.types import Connection, Headers, Request, User

__all__ = ["AuthenticateHook", "AuthorizeHook", "ConnectHook", "DisconnectHook", "HookRunner", "as_user"]

logger = logging.getLogger("fastws")

AuthenticateHook = Callable[[Request], Any]
AuthorizeHook = Callable[[User, str], Any]
ConnectHook = Callable[[Connection], Any]
DisconnectHook = Callable[[Connection, int], Any]


def _request(path: str, query: str, headers: list[tuple[str, str]], remote_addr: str) -> Request:
    host, _, port = remote_addr.rpartition(":")
    return Request(
        path=path,
        query=dict(parse_qsl(query, keep_blank_values=True)),
        headers=Headers(headers),
        remote_addr=host.strip("[]"),
        remote_port=int(port) if port.isdigit() else 0,
    )


def as_user(value: Any) -> User | None:
    """A hook's answer as a User: a ``User``, a ``{"id": ..., "info": {...}}`` dict, or None (refused)."""
    if value is None or isinstance(value, User):
        return value
    if isinstance(value, dict) and "id" in value:
        return User(value["id"], value.get("info") or {})
    raise TypeError(f"authenticate must return a fastws.User, a dict with 'id', or None; got {type(value).__name__}")


class HookRunner:
    """Calls hooks, running coroutines on the server's event loop thread with a time bound."""

    def __init__(self, loop: Callable[[], asyncio.AbstractEventLoop], timeout: float) -> None:
        self._loop = loop
        self._timeout = timeout

    def call(self, func: Callable[..., Any], *args: Any) -> Any:
        result = func(*args)
        if inspect.isawaitable(result):
            future = asyncio.run_coroutine_threadsafe(_awaited(result), self._loop())
            try:
                return future.result(self._timeout)
            except FutureTimeout:
                future.cancel()
                raise TimeoutError(f"the hook did not finish within hook_timeout ({self._timeout:g} s)") from None
        return result

    def authenticate(self, hook: AuthenticateHook) -> Callable[[str, str, list[tuple[str, str]], str], Any]:
        def adapter(path: str, query: str, headers: list[tuple[str, str]], remote_addr: str) -> tuple[str, str] | None:
            request = _request(path, query, headers, remote_addr)
            try:
                user = as_user(self.call(hook, request))
            except Exception:
                logger.exception("fastws: the authenticate hook failed for %s; the handshake is refused", remote_addr)
                raise
            return None if user is None else (user.id, orjson.dumps(user.info).decode())

        return adapter

    def authorize(self, hook: AuthorizeHook) -> Callable[[str, str, str], bool | str]:
        def adapter(user_id: str, info: str, channel: str) -> bool | str:
            user = User(user_id, orjson.loads(info))
            try:
                result = self.call(hook, user, channel)
                if result is None or isinstance(result, bool):
                    return bool(result)
                if isinstance(result, dict):
                    return orjson.dumps(result).decode()
                raise TypeError(f"authorize must return True, False/None or a dict; got {type(result).__name__}")
            except Exception:
                logger.exception("fastws: the authorize hook failed for user %s on %s; refused", user_id, channel)
                raise

        return adapter

    def lifecycle(
        self, on_connect: ConnectHook | None, on_disconnect: DisconnectHook | None
    ) -> tuple[Callable[..., None], Callable[[str, int], None]]:
        """Adapters for the core's connected/disconnected calls; on_disconnect gets the same Connection object."""
        open_connections: dict[str, Connection] = {}

        def connected(
            socket_id: str,
            user_id: str | None,
            user_info: str | None,
            path: str,
            query: str,
            headers: list[tuple[str, str]],
            remote_addr: str,
        ) -> None:
            user = None if user_id is None else User(user_id, orjson.loads(user_info or "{}"))
            connection = Connection(socket_id, user, _request(path, query, headers, remote_addr))
            if on_disconnect is not None:
                open_connections[socket_id] = connection
            if on_connect is not None:
                self._run_logged(on_connect, "on_connect", connection)

        def disconnected(socket_id: str, code: int) -> None:
            connection = open_connections.pop(socket_id, None)
            if on_disconnect is not None and connection is not None:
                self._run_logged(on_disconnect, "on_disconnect", connection, code)

        return connected, disconnected

    def _run_logged(self, func: Callable[..., Any], what: str, *args: Any) -> None:
        """Lifecycle hooks never stop the server: an exception is logged with its traceback."""
        try:
            self.call(func, *args)
        except Exception:
            logger.exception("fastws: the %s hook %s raised", what, getattr(func, "__qualname__", func))


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
