"""The Python API of fastws.Server and the module-level functions, against a real running server."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import threading
import time

import pytest
import websockets
from conftest import StartServer, client, masked_frame, raw_websocket

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


async def test_a_burst_of_pushes_arrives_complete_and_in_order_at_every_subscriber(start_server: StartServer) -> None:
    # push() only queues: the fan-out runs on the server's threads, and must keep the caller's order.
    server = start_server()
    count = 5_000
    async with client(server) as a, client(server) as b:
        await a.subscribe("news")
        await b.subscribe("news")

        def burst() -> list[int]:
            return [fastws.push("news", {"n": n}) for n in range(count)]

        returned = await asyncio.to_thread(burst)
        assert returned == [2] * count
        for c in (a, b):
            assert [(await c.recv())["data"]["n"] for _ in range(count)] == list(range(count))
        await a.nothing()


async def test_interleaved_pushes_keep_their_order_and_their_exclusions(start_server: StartServer) -> None:
    # The fan-out delivers runs of pushes to one channel together: a run must end where the channel or the
    # excluded socket changes, and the order across channels must hold.
    server = start_server()
    async with client(server) as both, client(server) as only_a:
        await both.subscribe("a")
        await both.subscribe("b")
        await only_a.subscribe("a")
        rng = random.Random(7)
        plan = [(rng.choice("aab"), rng.random() < 0.25) for _ in range(600)]

        def burst() -> None:
            for n, (channel, excluded) in enumerate(plan):
                fastws.push(channel, {"n": n}, exclude=only_a.socket_id if excluded else None)

        await asyncio.to_thread(burst)
        assert [(await both.recv())["data"]["n"] for _ in plan] == list(range(len(plan)))
        expected = [n for n, (channel, excluded) in enumerate(plan) if channel == "a" and not excluded]
        assert [(await only_a.recv())["data"]["n"] for _ in expected] == expected
        await only_a.nothing()


async def test_stop_delivers_the_queued_pushes_before_going_away(start_server: StartServer) -> None:
    # 300 subscribers that never read make the fan-out lag well behind the caller, so stop() comes while most
    # pushes are still queued; they must still reach the reading client before its 1001.
    server = start_server(max_connections=1000)
    count = 2_000
    silent = []
    subscribe = masked_frame(0x81, json.dumps({"event": "subscribe", "data": {"channel": "news"}}).encode())
    for _ in range(300):
        sock = await asyncio.to_thread(raw_websocket, server)
        sock.sendall(subscribe)
        silent.append(sock)
    try:
        async with client(server) as c:
            await c.subscribe("news")
            while server.channel_stats("news")["subscribers"] < 301:
                await asyncio.sleep(0.01)

            def push_then_stop() -> None:
                for n in range(count):
                    server.push("news", {"n": n})
                server.stop()

            await asyncio.to_thread(push_then_stop)
            assert [(await c.recv())["data"]["n"] for _ in range(count)] == list(range(count))
            with pytest.raises(websockets.exceptions.ConnectionClosedOK) as closed:
                await c.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    finally:
        for sock in silent:
            sock.close()


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
