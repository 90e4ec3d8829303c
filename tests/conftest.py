"""Shared fixtures: a real fastws server on a free loopback port, and a real WebSocket client (``websockets``)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

import fastws

StartServer = Callable[..., fastws.Server]


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """Start ``fastws.Server(**settings)`` on 127.0.0.1 and a free port; stopped after the test."""
    started: list[fastws.Server] = []

    def start(**settings: Any) -> fastws.Server:
        server = fastws.Server(**{"host": "127.0.0.1", "port": 0, "workers": 2, **settings})
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server: StartServer) -> fastws.Server:
    """A server with the default settings, plus client publish allowed on ``chat.*``."""
    return start_server(client_publish=["chat.*"])


class Client:
    """A thin wrapper over a ``websockets`` connection speaking fastws's JSON frames."""

    def __init__(self, ws: ClientConnection, socket_id: str) -> None:
        self.ws = ws
        self.socket_id = socket_id

    async def send(self, frame: Any) -> None:
        await self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def recv(self, timeout: float = 5.0) -> Any:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def nothing(self, wait: float = 0.3) -> None:
        """Assert that no frame arrives within ``wait`` seconds."""
        with pytest.raises(TimeoutError):
            frame = await asyncio.wait_for(self.ws.recv(), wait)
            pytest.fail(f"unexpected frame {frame!r}")

    async def request(self, frame: Any) -> Any:
        await self.send(frame)
        return await self.recv()

    async def subscribe(self, channel: str) -> Any:
        """Subscribe and check the reply (presence replies also carry ``data.members``); return the reply."""
        reply = await self.request({"event": "subscribe", "data": {"channel": channel}})
        expected = {"event": "subscribed", "channel": channel}
        assert {k: reply[k] for k in reply if k != "data" or not channel.startswith("presence-")} == expected, reply
        return reply


@asynccontextmanager
async def client(server: fastws.Server, path: str = "/") -> AsyncIterator[Client]:
    """Connect to ``server``, check the ``connected`` frame, and yield a :class:`Client`."""
    host, port = server.address
    async with connect(f"ws://{host}:{port}{path}", max_size=None) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert hello["event"] == "connected"
        yield Client(ws, hello["data"]["socket_id"])


async def push(channel: str, payload: Any, **kwargs: Any) -> int:
    """``fastws.push`` from a worker thread, as application code in another thread would call it."""
    return await asyncio.to_thread(fastws.push, channel, payload, **kwargs)


def raw_websocket(server: fastws.Server) -> socket.socket:
    """A bare socket that completes the upgrade and nothing else: it answers no ping, reads only when told to.

    For tests of hostile or silent clients, which a WebSocket library would not let us write.
    """
    sock = socket.create_connection(server.address, timeout=5)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    return sock


def masked_frame(first_byte: int, payload: bytes) -> bytes:
    """One client frame (masked, as RFC 6455 requires of clients) for a :func:`raw_websocket`."""
    mask = os.urandom(4)
    length = len(payload)
    header = bytes([first_byte]) + (
        bytes([0x80 | length]) if length < 126 else bytes([0x80 | 126]) + length.to_bytes(2, "big")
    )
    return header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def stop_process(process: subprocess.Popen[Any]) -> None:
    """Stop a process this test started, by its PID: SIGTERM, then SIGKILL if it is still there after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
