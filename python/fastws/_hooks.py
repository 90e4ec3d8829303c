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

from fastws.types import Headers, Request, User

__all__ = ["AuthenticateHook", "AuthorizeHook", "HookRunner", "as_user"]

logger = logging.getLogger("fastws")

AuthenticateHook = Callable[[Request], Any]
AuthorizeHook = Callable[[User, str], Any]


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
            host, _, port = remote_addr.rpartition(":")
            request = Request(
                path=path,
                query=dict(parse_qsl(query, keep_blank_values=True)),
                headers=Headers(headers),
                remote_addr=host.strip("[]"),
                remote_port=int(port) if port.isdigit() else 0,
            )
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


async def _awaited(awaitable: Any) -> Any:
    return await awaitable
