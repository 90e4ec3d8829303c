"""The Python API of fastws.Server and the module-level functions, against a real running server."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

import pytest
from conftest import StartServer, client

import fastws


def test_module_functions_without_a_server_raise_not_running() -> None:
    for call in (
        lambda: fastws.push("news", {}),
        lambda: fastws.to_channel("news").push({}),
        lambda: fastws.to_user(1).push({}),
        fastws.channels,
        fastws.connection_count,
        lambda: fastws.channel_stats("news"),
    ):
        with pytest.raises(fastws.NotRunning, match="no fastws server is running"):
            call()
    assert issubclass(fastws.NotRunning, RuntimeError)


def test_one_server_per_process(start_server: StartServer) -> None:
    first = start_server()
    with pytest.raises(fastws.AlreadyRunning):
        first.start()
    with pytest.raises(fastws.AlreadyRunning, match="another fastws server"):
        fastws.Server(host="127.0.0.1", port=0).start()


def test_stop_is_idempotent_and_a_stopped_server_can_start_again(start_server: StartServer) -> None:
    server = start_server()
    server.stop()
    server.stop()
    assert not server.running
    with pytest.raises(fastws.NotRunning):
        fastws.push("news", {})
    server.start()
    assert fastws.connection_count() == 0


def test_port_in_use_is_an_os_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = fastws.Server(host="127.0.0.1", port=port)
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{port}"):
            server.start()
        assert not server.running
    with pytest.raises(fastws.NotRunning):
        fastws.connection_count()


def test_bad_keyword_fails_where_it_was_written() -> None:
    with pytest.raises(fastws.ConfigError, match="port"):
        fastws.Server(port=70000)
    with pytest.raises(fastws.ConfigError, match="did you mean 'port'"):
        fastws.Server(prot=1)
    assert issubclass(fastws.ConfigError, ValueError)


def test_push_refuses_what_cannot_be_delivered(start_server: StartServer) -> None:
    start_server()
    with pytest.raises(ValueError, match="invalid channel name"):
        fastws.push("bad name", {})
    with pytest.raises(ValueError, match="not valid JSON"):
        fastws.push("news", b"{not json")
    with pytest.raises(TypeError):
        fastws.push("news", {"when": object()})
    assert fastws.push("news", {"nobody": "listens"}) == 0


async def test_to_user_reaches_no_connection_in_open_mode(start_server: StartServer) -> None:
    server = start_server()
    async with client(server) as c:
        await c.subscribe("news")
        assert fastws.to_user(123).push({"event": "notification"}) == 0
        assert server.to_user("123").push({"event": "notification"}) == 0
        await c.nothing()


async def test_on_start_every_and_on_stop_hooks_sync_and_async(start_server: StartServer) -> None:
    calls: list[str] = []
    ticks = threading.Event()
    server = fastws.Server(host="127.0.0.1", port=0)

    @server.on_start
    def started() -> None:
        calls.append("start")

    @server.every(0.05)
    def tick() -> None:
        fastws.push("dashboard", {"event": "metrics-update", "data": {"t": time.time()}})

    @server.every(0.05)
    async def async_tick() -> None:
        await asyncio.sleep(0)
        calls.append("async-tick")
        ticks.set()

    @server.on_stop
    async def stopped() -> None:
        calls.append("stop")

    server.start()
    try:
        async with client(server) as c:
            await c.subscribe("dashboard")
            assert (await c.recv())["event"] == "metrics-update"
            assert (await c.recv())["event"] == "metrics-update"
        assert await asyncio.to_thread(ticks.wait, 5)
    finally:
        await asyncio.to_thread(server.stop)
    assert calls[0] == "start" and calls[-1] == "stop" and "async-tick" in calls


def test_a_raising_hook_is_logged_and_the_timer_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    server = fastws.Server(host="127.0.0.1", port=0)
    count = 0
    done = threading.Event()

    @server.every(0.02)
    def flaky() -> None:
        nonlocal count
        count += 1
        if count >= 3:
            done.set()
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR, logger="fastws"):
        server.start()
        try:
            assert done.wait(5)
            assert server.running
        finally:
            server.stop()
    assert "boom" in caplog.text and "every(0.02)" in caplog.text


def test_every_needs_a_positive_interval() -> None:
    with pytest.raises(ValueError):
        fastws.Server().every(0)
