"""Hostile clients and overload: each limit is tested with a client written to break it, while a well-behaved
client on the same server keeps getting its messages."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Client, StartServer, client, masked_frame, push, raw_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

import fastws


async def keeps_receiving(good: Client, channel: str, count: int = 3) -> None:
    """The bystander's check: pushes to its channel still arrive, in order."""
    for i in range(count):
        await push(channel, {"i": i})
    assert [(await good.recv())["data"]["i"] for _ in range(count)] == list(range(count))


async def test_flooding_client_gets_4029_then_1008_and_others_are_unaffected(start_server: StartServer) -> None:
    server = start_server(rate_limit=20, rate_burst=5)
    async with client(server) as flood, client(server) as good:
        await good.subscribe("news")
        for _ in range(30):
            await flood.send({"event": "ping"})
        frames = [await flood.recv() for _ in range(6)]
        assert frames[:5] == [{"event": "pong"}] * 5  # the burst
        assert frames[5]["event"] == "error" and frames[5]["data"]["code"] == 4029
        assert "rate limited" in frames[5]["data"]["message"]
        await keeps_receiving(good, "news")
        # Going on past the grace second closes it with 1008. (The flood keeps reading, or its client library
        # would stop reading the socket once its queue is full and never see the close frame.)
        reading = asyncio.create_task(close_code_of(flood))
        with pytest.raises(ConnectionClosed):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                await flood.send({"event": "ping"})
                await asyncio.sleep(0.01)
        assert await reading == 1008
        await keeps_receiving(good, "news")


async def close_code_of(c: Client) -> int | None:
    """Read until the connection closes; the close code received."""
    try:
        while True:
            await c.ws.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else None


async def test_a_client_within_the_rate_is_never_limited(start_server: StartServer) -> None:
    server = start_server(rate_limit=50, rate_burst=5)
    async with client(server) as c:
        for _ in range(40):
            assert await c.request({"event": "ping"}) == {"event": "pong"}
            await asyncio.sleep(0.025)


def raw_connect(server: fastws.Server) -> socket.socket:
    sock = socket.create_connection(server.address, timeout=5)
    return sock


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes the socket (EOF or reset) within ``within`` seconds."""
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


async def test_slowloris_is_dropped_after_handshake_timeout(start_server: StartServer) -> None:
    server = start_server(handshake_timeout=0.5)
    async with client(server) as good:
        await good.subscribe("news")
        slow = await asyncio.to_thread(raw_connect, server)
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
        started = time.monotonic()
        assert await asyncio.to_thread(closed_by_server, slow, 3)
        assert 0.4 < time.monotonic() - started < 2.5
        slow.close()
        await keeps_receiving(good, "news")


async def test_pending_handshake_cap_sheds_new_connections_not_old_ones(start_server: StartServer) -> None:
    server = start_server(max_pending_handshakes=5, handshake_timeout=1.5)
    async with client(server) as good:
        await good.subscribe("news")
        idle = [await asyncio.to_thread(raw_connect, server) for _ in range(5)]
        await asyncio.sleep(0.2)
        extra = await asyncio.to_thread(raw_connect, server)
        assert await asyncio.to_thread(closed_by_server, extra, 1.0), "the sixth is shed at once"
        await keeps_receiving(good, "news")
        for sock in idle:  # they time out; then new clients get in again
            assert await asyncio.to_thread(closed_by_server, sock, 3)
            sock.close()
        async with client(server) as later:
            assert await later.request({"event": "ping"}) == {"event": "pong"}
        extra.close()


async def test_invalid_utf8_text_closes_with_1007(start_server: StartServer) -> None:
    server = start_server()
    async with client(server) as good:
        await good.subscribe("news")
        sock = await asyncio.to_thread(raw_websocket, server)
        sock.sendall(masked_frame(0x81, b"\xff\xfe"))
        assert await asyncio.to_thread(close_code, sock) == 1007
        sock.close()
        await keeps_receiving(good, "news")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (lambda: masked_frame(0x89, b"x" * 126), 1002),  # a ping longer than 125 bytes
        (lambda: masked_frame(0x09, b"ping"), 1002),  # a fragmented control frame (FIN unset)
        (lambda: b"\x81\x7f" + (2**62).to_bytes(8, "big") + os.urandom(4), 1009),  # a huge length header
        (lambda: b"\x81\x05hello", 1002),  # an unmasked client frame
    ],
)
async def test_protocol_violations_close_with_their_code(start_server: StartServer, frame: Any, code: int) -> None:
    server = start_server()
    async with client(server) as good:
        await good.subscribe("news")
        sock = await asyncio.to_thread(raw_websocket, server)
        sock.sendall(frame())
        assert await asyncio.to_thread(close_code, sock) == code
        sock.close()
        await keeps_receiving(good, "news")


async def test_a_ping_frame_flood_is_rate_limited_too(start_server: StartServer) -> None:
    server = start_server(rate_limit=20, rate_burst=5)
    async with client(server) as good:
        await good.subscribe("news")
        sock = await asyncio.to_thread(raw_websocket, server)
        flood = masked_frame(0x89, b"p") * 50  # 50 WebSocket ping frames every 50 ms: 1,000/s against 20/s

        def keep_flooding() -> None:
            deadline = time.monotonic() + 3
            try:
                while time.monotonic() < deadline:
                    sock.sendall(flood)
                    time.sleep(0.05)
            except OSError:
                pass  # the server closed the connection

        def flood_until_closed() -> int:
            # Read while flooding, so the close frame is taken before the server's final reset can discard it.
            flooder = threading.Thread(target=keep_flooding)
            flooder.start()
            try:
                return close_code(sock)
            finally:
                flooder.join()

        assert await asyncio.to_thread(flood_until_closed) == 1008
        sock.close()
        await keeps_receiving(good, "news")


def close_code(sock: socket.socket) -> int:
    """Read server frames until the close frame; return its code."""
    sock.settimeout(5)
    buffer = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("the server closed the socket without a close frame")
        buffer += chunk
        while len(buffer) >= 2:
            opcode, length = buffer[0] & 0x0F, buffer[1] & 0x7F
            offset = 2
            if length == 126:
                length, offset = int.from_bytes(buffer[2:4], "big"), 4
            if len(buffer) < offset + length:
                break
            payload, buffer = buffer[offset : offset + length], buffer[offset + length :]
            if opcode == 0x8:
                return int.from_bytes(payload[:2], "big")


# -- fuzzing a live server -----------------------------------------------------------------------------------------
# (a module-scoped server: keep these after the tests that start their own, or those would find it running)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[fastws.Server]:
    server = fastws.Server(host="127.0.0.1", port=0, rate_limit=0, client_publish=["chat.*"])
    server.start()
    yield server
    server.stop()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
frames = st.one_of(
    st.text(max_size=300),
    json_values.map(json.dumps),
    st.fixed_dictionaries(
        {
            "event": st.sampled_from(["subscribe", "unsubscribe", "publish", "ping", "member_added", "x"]),
            "data": st.one_of(
                json_values,
                st.fixed_dictionaries(
                    {
                        "channel": st.one_of(st.text(max_size=210), st.sampled_from(["chat.a", "private-x"]))
                        | json_values
                    },
                    optional={"payload": json_values, "info": json_values},
                ),
            ),
        }
    ).map(json.dumps),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=frames)
def test_fuzzed_frames_get_a_documented_answer_and_the_server_survives(fuzz_server: fastws.Server, frame: str) -> None:
    from websockets.sync.client import connect

    host, port = fuzz_server.address
    with connect(f"ws://{host}:{port}/") as ws:
        ws.recv(timeout=5)
        ws.send(frame)
        ws.send('{"event":"ping"}')
        # Every answer before the pong is a documented frame: an error with a known code, or a reply.
        while True:
            answer = json.loads(ws.recv(timeout=5))
            if answer == {"event": "pong"}:
                break
            assert answer["event"] in {"error", "subscribed", "unsubscribed"}, answer
            if answer["event"] == "error":
                assert answer["data"]["code"] in {4000, 4002, 4003, 4004, 4005}
                assert answer["data"]["message"]


# -- slow consumers -----------------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match.group(1)) * 1024


async def count_frames(reader: asyncio.StreamReader, expected: int, timeout: float) -> list[int]:
    """Read server text frames cheaply (header parsing only) and return the "i" of each, in arrival order."""
    buffer = b""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while len(seen) < expected:
        chunk = await asyncio.wait_for(reader.read(1 << 16), max(0.1, deadline - time.monotonic()))
        if not chunk:
            break
        buffer += chunk
        offset = 0
        while len(buffer) - offset >= 4:
            length = buffer[offset + 1] & 0x7F
            start = offset + 2
            if length == 126:
                length, start = int.from_bytes(buffer[offset + 2 : offset + 4], "big"), offset + 4
            if len(buffer) < start + length:
                break
            payload = buffer[start : start + length]
            marker = payload.find(b'"i":')
            if marker >= 0:
                seen.append(int(payload[marker + 4 : payload.index(b",", marker)]))
            offset = start + length
        buffer = buffer[offset:]
    return seen


async def open_subscriber(port: int, channel: str, rcvbuf: int | None = None) -> tuple[Any, Any]:
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    subscribe = json.dumps({"event": "subscribe", "data": {"channel": channel}}).encode()
    writer.write(masked_frame(0x81, subscribe))
    await writer.drain()
    return reader, writer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_slow_consumers_are_cut_and_prompt_readers_get_everything_in_order(tmp_path: Path) -> None:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "fastws", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-demo"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    draining = threading.Thread()
    try:
        assert server.stderr is not None and "listening" in server.stderr.readline()
        draining = threading.Thread(target=server.stderr.read, daemon=True)  # keep draining its log
        draining.start()
        prompt = [await open_subscriber(port, "feed") for _ in range(200)]
        never_read = [await open_subscriber(port, "feed", rcvbuf=4096) for _ in range(10)]
        # Both kinds have their connected + subscribed frames to consume first.
        for reader, _ in prompt:
            await reader.read(256)
        baseline = rss_bytes(server.pid)
        pushes, size = 2000, 2048
        payload = {"pad": "x" * (size - 40)}
        peak = baseline

        def publish_all() -> None:
            nonlocal peak
            started = time.monotonic()
            for i in range(pushes):
                body = json.dumps({"channel": "feed", "payload": {"i": i, **payload}}).encode()
                request = urllib.request.Request(f"http://127.0.0.1:{port}/api/publish", data=body)
                urllib.request.urlopen(request, timeout=5).read()
                if i % 100 == 0:
                    peak = max(peak, rss_bytes(server.pid))
                time.sleep(max(0.0, started + (i + 1) / 500 - time.monotonic()))  # 500 pushes/s

        publishing = asyncio.create_task(asyncio.to_thread(publish_all))
        received = await asyncio.gather(*(count_frames(reader, pushes, timeout=30) for reader, _ in prompt))
        await publishing
        for seen in received:
            assert seen == list(range(pushes))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as response:
            stats = json.load(response)
        assert stats["channels"] == [{"name": "feed", "type": "public", "subscribers": 200}]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert "fastws_slow_consumer_closes_total 10" in response.read().decode()
        after = rss_bytes(server.pid)
        # Bounded queues: memory did not follow the 10 stalled readers' 4 MB backlog each.
        assert peak - baseline < 32 << 20, (baseline, peak)
        assert after - baseline < 32 << 20, (baseline, after)
        for _, writer in prompt + never_read:
            writer.close()
    finally:
        server.terminate()
        server.wait(10)
        if server.stderr:
            if draining.ident is not None:
                draining.join(5)
            server.stderr.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    head=st.binary(max_size=2000) | st.text(max_size=300).map(lambda t: f"GET /{t} HTTP/1.1\r\n{t}\r\n\r\n".encode())
)
def test_fuzzed_request_heads_get_an_http_answer_or_a_close(fuzz_server: fastws.Server, head: bytes) -> None:
    with socket.create_connection(fuzz_server.address, timeout=5) as sock:
        try:
            sock.sendall(head)
            sock.shutdown(socket.SHUT_WR)  # the server must not wait for more
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        except (ConnectionResetError, BrokenPipeError):
            answer = b""
    if answer:
        status = int(answer.split(b" ", 2)[1])
        assert status in {101, 200, 400, 401, 403, 404, 405, 411, 426, 431, 503}, answer[:200]
    # And the server still serves.
    status, _ = http_get(fuzz_server, "/healthz")
    assert status == 200


def http_get(server: fastws.Server, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(f"http://{server.address[0]}:{server.address[1]}{path}", timeout=5) as response:
        return response.status, response.read()
