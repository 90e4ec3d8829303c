"""Operations over real sockets: /healthz, /stats, /metrics, /api/publish, access rules, heartbeats, limits,
lifecycle hooks, logging and demo mode."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import StartServer, client, masked_frame, push, raw_websocket
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import fastws


def http(
    server: fastws.Server, path: str, *, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, str]:
    """A plain HTTP request to the server's port; returns (status, body text)."""
    host, port = server.address
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(f"http://{host}:{port}{path}", data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def metrics(server: fastws.Server) -> dict[str, float]:
    """/metrics parsed by the official Prometheus client's parser: sample name{labels} → value."""
    status, text = http(server, "/metrics")
    assert status == 200
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


async def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- health, stats, metrics ---------------------------------------------------------------------------------------


async def test_healthz_is_always_open(start_server: StartServer) -> None:
    server = start_server(api_key="k")
    assert await asyncio.to_thread(http, server, "/healthz") == (200, '{"status":"ok"}')


async def test_stats_counts_connections_channels_and_messages(start_server: StartServer) -> None:
    server = start_server(jwt_secret="s" * 32)
    import jwt

    tokens = [jwt.encode({"sub": user}, "s" * 32, algorithm="HS256") for user in ("ana", "ana", "bob")]
    host, port = server.address
    sockets = [await connect(f"ws://{host}:{port}/?token={t}") for t in tokens]
    try:
        for ws in sockets:
            await ws.recv()
            await ws.send(json.dumps({"event": "subscribe", "data": {"channel": "presence-room"}}))
            await ws.recv()
        await sockets[0].send(json.dumps({"event": "subscribe", "data": {"channel": "news"}}))
        await sockets[0].recv()
        await push("news", {"x": 1})
        status, text = await asyncio.to_thread(http, server, "/stats")
        stats = json.loads(text)
        assert status == 200
        assert stats["connections"] == 3
        assert stats["channels"] == [
            {"name": "news", "type": "public", "subscribers": 1},
            {"name": "presence-room", "type": "presence", "subscribers": 3, "members": 2},
        ]
        assert stats["messages_in"] == 4 and stats["messages_out"] >= 1 and stats["uptime_s"] >= 0
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))


async def test_metrics_are_valid_prometheus_text(start_server: StartServer) -> None:
    server = start_server()
    async with client(server) as c:
        await c.subscribe("news")
        await push("news", {"x": 1})
        await c.recv()
        with pytest.raises(InvalidStatus):
            async with connect(f"ws://{server.address[0]}:{server.port}/", origin="https://evil.example"):  # type: ignore[arg-type]
                pass
        # The latency sample is observed once the frame is flushed; the client has it, so it was.
        samples = await asyncio.to_thread(metrics, server)
    assert samples["fastws_connections"] == 1
    assert samples["fastws_channels"] == 1
    assert samples["fastws_messages_in_total"] == 1
    assert samples["fastws_messages_out_total"] >= 1
    assert samples["fastws_bytes_out_total"] > 0 and samples["fastws_bytes_in_total"] > 0
    assert samples["fastws_handshakes_total{result=accepted}"] == 1
    assert samples["fastws_handshakes_total{result=forbidden}"] == 1
    assert samples["fastws_slow_consumer_closes_total"] == 0
    assert samples["fastws_publish_latency_seconds_count"] == 1
    assert samples["fastws_publish_latency_seconds_bucket{le=+Inf}"] == 1


# -- access rule --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/stats", "/metrics", "/dashboard"])
async def test_ops_endpoints_are_loopback_only_without_an_api_key(start_server: StartServer, path: str) -> None:
    server = start_server()
    assert (await asyncio.to_thread(http, server, path))[0] == 200
    # Through a proxy the peer is the proxy, not the client: such requests are not treated as local.
    status, body = await asyncio.to_thread(http, server, path, headers={"X-Forwarded-For": "203.0.113.9"})
    assert status == 403 and "api_key" in json.loads(body)["error"]


@pytest.mark.parametrize("path", ["/stats", "/metrics", "/dashboard"])
async def test_ops_endpoints_need_the_api_key_when_one_is_set(start_server: StartServer, path: str) -> None:
    server = start_server(api_key="s3cret")
    assert (await asyncio.to_thread(http, server, path))[0] == 401
    assert (await asyncio.to_thread(http, server, path, headers={"Authorization": "Bearer wrong"}))[0] == 401
    assert (await asyncio.to_thread(http, server, path, headers={"Authorization": "Bearer s3cret"}))[0] == 200
    assert (await asyncio.to_thread(http, server, f"{path}?api_key=s3cret"))[0] == 200


# -- POST /api/publish --------------------------------------------------------------------------------------------


async def test_http_publish_to_a_channel_and_to_a_user(start_server: StartServer) -> None:
    import jwt

    server = start_server(jwt_secret="s" * 32)
    tok = jwt.encode({"sub": "123"}, "s" * 32, algorithm="HS256")
    host, port = server.address
    async with connect(f"ws://{host}:{port}/?token={tok}") as ws:
        await ws.recv()
        await ws.send(json.dumps({"event": "subscribe", "data": {"channel": "orders"}}))
        await ws.recv()
        message = {"event": "new-order", "data": {"id": 1234}}
        status, body = await asyncio.to_thread(
            http, server, "/api/publish", body={"channel": "orders", "payload": message}
        )
        assert (status, json.loads(body)) == (200, {"delivered": 1})
        assert json.loads(await ws.recv()) == {**message, "channel": "orders"}
        status, body = await asyncio.to_thread(http, server, "/api/publish", body={"user": 123, "payload": [1]})
        assert (status, json.loads(body)) == (200, {"delivered": 1})
        assert json.loads(await ws.recv()) == {"event": "message", "data": [1]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not json", "JSON object"),
        ({"channel": "news"}, "payload"),
        ({"payload": 1}, "exactly one"),
        ({"channel": "news", "user": "1", "payload": 1}, "exactly one"),
        ({"channel": "bad name", "payload": 1}, "invalid channel name"),
        ({"user": "", "payload": 1}, "user"),
    ],
)
async def test_http_publish_refuses_malformed_bodies(start_server: StartServer, body: Any, message: str) -> None:
    server = start_server()
    status, text = await asyncio.to_thread(http, server, "/api/publish", body=body)
    assert status == 400 and message in json.loads(text)["error"]


async def test_http_publish_needs_post(start_server: StartServer) -> None:
    server = start_server()
    assert (await asyncio.to_thread(http, server, "/api/publish"))[0] == 405


# -- heartbeats and limits ----------------------------------------------------------------------------------------


def read_close_code(sock: socket.socket, timeout: float) -> tuple[int, float]:
    """Read server frames until a close frame; return its code and when it came. Pings are ignored (not answered)."""
    sock.settimeout(timeout)
    started = time.monotonic()
    while True:
        opcode, length = sock.recv(1)[0] & 0x0F, sock.recv(1)[0] & 0x7F
        if length == 126:
            length = struct.unpack("!H", sock.recv(2))[0]
        payload = b""
        while len(payload) < length:
            payload += sock.recv(length - len(payload))
        if opcode == 0x8:
            return struct.unpack("!H", payload[:2])[0], time.monotonic() - started


async def test_heartbeat_closes_a_silent_client_and_keeps_a_responsive_one(start_server: StartServer) -> None:
    server = start_server(heartbeat_interval=0.2, idle_timeout=0.6)
    silent = await asyncio.to_thread(raw_websocket, server)
    async with client(server) as responsive:  # websockets answers ping frames with pongs
        code, after = await asyncio.to_thread(read_close_code, silent, 5)
        assert code == 4201 and 0.4 < after < 2.5
        await asyncio.sleep(1.0)
        assert await responsive.request({"event": "ping"}) == {"event": "pong"}
    silent.close()


async def test_a_client_that_talks_but_never_reads_is_closed_after_idle_timeout(start_server: StartServer) -> None:
    # Its messages keep it "heard", so only the stalled-write rule can close it: a write waiting for room in the
    # socket for idle_timeout. The queue bound is high so that the slow-consumer rule (4100) stays out of it.
    server = start_server(heartbeat_interval=0, idle_timeout=0.6, send_queue_bytes=256 * 1024 * 1024)
    sock = await asyncio.to_thread(raw_websocket, server)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(masked_frame(0x81, json.dumps({"event": "subscribe", "data": {"channel": "feed"}}).encode()))
    await eventually(lambda: fastws.channel_stats("feed")["subscribers"] == 1)
    chunk = "x" * 60_000
    for _ in range(300):  # 18 MB: more than the socket buffers on both sides hold
        await push("feed", chunk)
    started = time.monotonic()
    ping = masked_frame(0x81, b'{"event": "ping"}')
    closed_after = None
    while time.monotonic() - started < 6:
        sock.sendall(ping)  # the server still reads: it is only its writes that wait
        await asyncio.sleep(0.1)
        if fastws.connection_count() == 0:
            closed_after = time.monotonic() - started
            break
    sock.close()
    assert closed_after is not None, "a client whose socket never drains must not be kept forever"
    assert closed_after > 0.5


async def test_max_connections_refuses_with_503_and_keeps_the_others(start_server: StartServer) -> None:
    server = start_server(max_connections=2)
    async with client(server) as a, client(server) as b:
        host, port = server.address
        with pytest.raises(InvalidStatus) as refused:
            async with connect(f"ws://{host}:{port}/"):
                pass
        assert refused.value.response.status_code == 503
        await a.subscribe("news")
        await b.subscribe("news")
        assert await push("news", {"ok": 1}) == 2
    await eventually(lambda: fastws.connection_count() == 0)
    async with client(server):
        pass


# -- lifecycle hooks ----------------------------------------------------------------------------------------------


async def test_on_connect_and_on_disconnect_see_the_connection_and_the_code(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[str, Any]] = []
    server = fastws.Server(host="127.0.0.1", port=0)

    @server.on_connect
    async def opened(conn: fastws.Connection) -> None:
        seen.append(("connect", (conn.socket_id, conn.user, conn.request.path, conn.request.query)))

    @server.on_disconnect
    def closed(conn: fastws.Connection, code: int) -> None:
        seen.append(("disconnect", (conn.socket_id, code)))
        raise RuntimeError("a buggy hook")

    server.start()
    try:
        async with client(server, "/ws?room=1") as c:
            socket_id = c.socket_id
        await eventually(lambda: len(seen) == 2)
        assert seen == [
            ("connect", (socket_id, None, "/ws", {"room": "1"})),
            ("disconnect", (socket_id, 1000)),
        ]
        # The raising hook was logged and the server goes on.
        async with client(server) as c:
            assert await c.request({"event": "ping"}) == {"event": "pong"}
            other = c.socket_id
        await eventually(lambda: ("disconnect", (other, 1000)) in seen)
    finally:
        await asyncio.to_thread(server.stop)
    assert "a buggy hook" in caplog.text


# -- logging ------------------------------------------------------------------------------------------------------


async def test_refused_handshakes_reach_python_logging(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fastws")
    server = start_server(jwt_secret="s" * 32)
    with pytest.raises(InvalidStatus):
        async with connect(f"ws://{server.address[0]}:{server.port}/"):
            pass
    await eventually(lambda: "refused handshake" in caplog.text)
    record = next(r for r in caplog.records if "refused handshake" in r.getMessage())
    assert record.name == "fastws" and record.levelno == logging.INFO
    assert "401" in record.getMessage() and "127.0.0.1" in record.getMessage()


def test_json_log_format(tmp_path: Any) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "fastws", "serve", "--host", "127.0.0.1", "--port", "0", "--log-format", "json"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = json.loads(process.stderr.readline())
        assert line["level"] == "info" and line["logger"] == "fastws"
        assert "listening on ws://127.0.0.1:" in line["message"]
        assert "origins: same-origin" in line["message"] and "broker: memory" in line["message"]
    finally:
        process.terminate()
        assert process.wait(10) == 0
        if process.stderr:
            process.stderr.close()


# -- demo mode ----------------------------------------------------------------------------------------------------


async def test_demo_mode_allows_demo_publish_and_anonymous_presence(start_server: StartServer) -> None:
    server = start_server(demo=True)
    status, page = await asyncio.to_thread(http, server, "/")
    assert status == 200 and page.lower().startswith("<!doctype html>") and "fastws" in page
    async with client(server) as ana, client(server) as bob:
        reply = await ana.request(
            {"event": "subscribe", "data": {"channel": "presence-demo.lobby", "info": {"name": "Ana"}}}
        )
        assert reply["data"]["members"] == [
            {"id": ana.socket_id, "info": {"name": "Ana"}, "connected_at": reply["data"]["members"][0]["connected_at"]}
        ]
        await bob.request({"event": "subscribe", "data": {"channel": "presence-demo.lobby", "info": {"name": "Bob"}}})
        assert await ana.recv() == {
            "event": "member_added",
            "channel": "presence-demo.lobby",
            "data": {"id": bob.socket_id, "info": {"name": "Bob"}},
        }
        await bob.subscribe("demo.lobby")
        payload = {"event": "client-message", "data": {"name": "Ana", "text": "olá"}}
        await ana.send({"event": "publish", "data": {"channel": "demo.lobby", "payload": payload}})
        assert await bob.recv() == {**payload, "channel": "demo.lobby"}
        # Outside demo.* client publish stays closed, and private channels stay private.
        reply = await ana.request({"event": "publish", "data": {"channel": "other", "payload": 1}})
        assert reply["data"]["code"] == 4003
        reply = await ana.request({"event": "subscribe", "data": {"channel": "presence-other"}})
        assert reply["data"]["code"] == 4003


async def test_without_demo_the_root_path_is_426(start_server: StartServer) -> None:
    server = start_server()
    assert (await asyncio.to_thread(http, server, "/"))[0] == 426


async def test_browser_pages_cannot_use_the_local_ops_endpoints(start_server: StartServer) -> None:
    """Without api_key the rule is "local tools only": a page of another site (its Origin) or a DNS-rebinding page
    (its Host) reaching the loopback port through a browser is refused."""
    server = start_server()
    body = {"channel": "news", "payload": 1}
    assert (await asyncio.to_thread(http, server, "/api/publish", body=body))[0] == 200
    for headers in [{"Origin": "https://evil.example"}, {"Host": "evil.example:9501"}]:
        status, text = await asyncio.to_thread(http, server, "/api/publish", body=body, headers=headers)
        assert status == 403 and "api_key" in json.loads(text)["error"], headers
        assert (await asyncio.to_thread(http, server, "/stats", headers=headers))[0] == 403


async def test_api_key_in_the_query_is_for_get_only(start_server: StartServer) -> None:
    server = start_server(api_key="k")
    body = {"channel": "news", "payload": 1}
    assert (await asyncio.to_thread(http, server, "/api/publish?api_key=k", body=body))[0] == 401
    headers = {"Authorization": "Bearer k"}
    assert (await asyncio.to_thread(http, server, "/api/publish", body=body, headers=headers))[0] == 200


def listen_queue_length(port: int) -> int:
    """The listening socket's backlog as the kernel reports it (`ss` shows it as Send-Q of a LISTEN socket)."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return int(out.split()[2])


@pytest.mark.parametrize("backlog", [None, 300])
def test_listen_backlog_is_the_setting_not_the_platform_default(start_server: StartServer, backlog: int | None) -> None:
    # std's bind listens with 128, which overflowed under 200 connects in flight; uvicorn's default is 2048.
    settings = {} if backlog is None else {"backlog": backlog}
    server = start_server(**settings)
    expected = backlog or 2048
    with open("/proc/sys/net/core/somaxconn") as somaxconn:
        expected = min(expected, int(somaxconn.read()))
    assert listen_queue_length(server.address[1]) == expected
