"""Authentication, origins, private/presence authorization and push-to-user, with real tokens over real sockets."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import jwt
import pytest
from conftest import Client, StartServer, push
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

import fastws

SECRET = "test-secret-that-is-long-enough-for-hs512-" + "x" * 32


def token(claims: dict[str, Any], key: Any = SECRET, algorithm: str = "HS256", **headers: Any) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers or None)


@asynccontextmanager
async def user_client(
    server: fastws.Server, tok: str | None = None, headers: dict[str, str] | None = None
) -> AsyncIterator[Client]:
    host, port = server.address
    query = f"?token={tok}" if tok else ""
    async with connect(f"ws://{host}:{port}/{query}", additional_headers=headers) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        yield Client(ws, hello["data"]["socket_id"])


async def refused(server: fastws.Server, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """Open a handshake that must be refused; return its HTTP status and JSON body."""
    host, port = server.address
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"ws://{host}:{port}{path}", additional_headers=headers):
            pass
    response = info.value.response
    return response.status_code, json.loads(response.body)


@pytest.fixture
def jwt_server(start_server: StartServer) -> fastws.Server:
    return start_server(jwt_secret=SECRET, client_publish=["private-*", "presence-*"])


# -- connection authentication ----------------------------------------------------------------------------------


async def test_valid_token_in_query_or_bearer_header(jwt_server: fastws.Server) -> None:
    async with user_client(jwt_server, token({"sub": "123", "name": "Ana"})) as c:
        await c.subscribe("private-user.123")
    bearer = {"Authorization": f"Bearer {token({'sub': '7'})}"}
    async with user_client(jwt_server, headers=bearer) as c:
        await c.subscribe("private-user.7")


@pytest.mark.parametrize(
    ("tok", "message"),
    [
        (None, "a token is required"),
        ("not-a-jwt", "not a well-formed JWT"),
        (token({"sub": "1", "exp": int(time.time()) - 10}), "expired"),
        (token({"sub": "1", "nbf": int(time.time()) + 3600}), "not valid yet"),
        (token({"sub": "1"}, key="the-wrong-secret-of-sufficient-length" * 2), "signature"),
        (token({"sub": "1"}, algorithm="HS512"), "not accepted"),
        (jwt.encode({"sub": "1"}, cast(Any, None), algorithm="none"), "not accepted"),
        (token({"name": "no subject"}), "sub"),
        (token({"sub": "1", "aud": "someone-else"}), "audience"),
    ],
)
async def test_bad_tokens_get_401_with_a_json_reason(jwt_server: fastws.Server, tok: str | None, message: str) -> None:
    status, body = await refused(jwt_server, f"/?token={tok}" if tok else "/")
    assert status == 401
    assert message in body["error"]
    # The server is unharmed: a good token still connects.
    async with user_client(jwt_server, token({"sub": "1"})) as c:
        assert await c.request({"event": "ping"}) == {"event": "pong"}


async def test_audience_issuer_and_leeway(start_server: StartServer) -> None:
    server = start_server(jwt_secret=SECRET, jwt_audience="fastws", jwt_issuer="https://auth.example", jwt_leeway=30)
    good = {"sub": "1", "aud": "fastws", "iss": "https://auth.example", "exp": int(time.time()) - 5}
    async with user_client(server, token(good)) as c:  # expired 5 s ago, within the 30 s leeway
        assert await c.request({"event": "ping"}) == {"event": "pong"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({**good, "aud": "other"}, "audience"),
        ({**good, "iss": "https://evil.example"}, "issuer"),
        ({"sub": "1", "aud": "fastws"}, "iss"),  # a configured issuer is required
    ]
    for claims, reason in cases:
        status, body = await refused(server, f"/?token={token(claims)}")
        assert (status, reason in body["error"]) == (401, True), body


async def test_rs256_and_es256_with_a_public_key_and_no_algorithm_confusion(
    start_server: StartServer, tmp_path: Any
) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    key_file = tmp_path / "public.pem"
    key_file.write_bytes(pem)
    server = start_server(jwt_public_key=str(key_file))
    async with user_client(server, token({"sub": "9"}, key=rsa_key, algorithm="RS256")) as c:
        await c.subscribe("private-user.9")
    # An HS256 token "signed" with the public key text must not pass (the classic confusion attack).
    forged = _hs256_with_key(pem, {"sub": "9"})
    status, body = await refused(server, f"/?token={forged}")
    assert status == 401 and "not accepted" in body["error"]
    other = ec.generate_private_key(ec.SECP256R1())
    status, _ = await refused(server, f"/?token={token({'sub': '9'}, key=other, algorithm='ES256')}")
    assert status == 401


def _hs256_with_key(key: bytes, claims: dict[str, Any]) -> str:
    """PyJWT refuses to use a PEM as an HMAC secret; build the token by hand, as an attacker would."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = json.dumps({"alg": "HS256", "typ": "JWT"}).encode()
    signing_input = f"{b64(header)}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


async def test_open_mode_ignores_tokens_and_refuses_private_channels(start_server: StartServer) -> None:
    server = start_server()
    async with user_client(server, "YOUR_JWT_TOKEN") as c:
        for channel in ["private-user.1", "presence-room"]:
            reply = await c.request({"event": "subscribe", "data": {"channel": channel}})
            assert reply["data"]["code"] == 4003 and "open mode" in reply["data"]["message"]
        await c.subscribe("chat.room.1")


# -- authenticate hook ------------------------------------------------------------------------------------------


async def test_authenticate_hook_sync_and_async_and_its_request(start_server: StartServer) -> None:
    seen: list[fastws.Request] = []
    server = fastws.Server(host="127.0.0.1", port=0)

    @server.authenticate
    async def check(request: fastws.Request) -> fastws.User | dict[str, Any] | None:
        seen.append(request)
        await asyncio.sleep(0)
        if request.query.get("key") == "ana":
            return fastws.User(42, {"name": "Ana"})
        if request.headers.get("X-API-KEY") == "bob":
            return {"id": "bob", "info": {"name": "Bob"}}
        return None

    server.start()
    try:
        async with _connect(server, "/ws?key=ana&x=1") as c:
            await c.subscribe("private-user.42")  # ids are strings: 42 became "42"
        async with _connect(server, "/", {"x-api-key": "bob"}) as c:
            await c.subscribe("presence-room")
        status, body = await refused(server, "/?key=mallory")
        assert status == 401 and "refused" in body["error"]
    finally:
        await asyncio.to_thread(server.stop)
    request = seen[0]
    assert (request.path, request.query) == ("/ws", {"key": "ana", "x": "1"})
    assert request.remote_addr == "127.0.0.1" and request.remote_port > 0
    assert "Sec-WebSocket-Key" in request.headers


@asynccontextmanager
async def _connect(server: fastws.Server, path: str, headers: dict[str, str] | None = None) -> AsyncIterator[Client]:
    host, port = server.address
    async with connect(f"ws://{host}:{port}{path}", additional_headers=headers) as ws:
        hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
        yield Client(ws, hello["data"]["socket_id"])


async def test_a_raising_or_hanging_authenticate_hook_refuses_only_that_handshake(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = fastws.Server(host="127.0.0.1", port=0, hook_timeout=0.5)

    @server.authenticate
    def check(request: fastws.Request) -> fastws.User | None:
        if "boom" in request.query:
            raise RuntimeError("database down")
        if "slow" in request.query:
            time.sleep(2)
        return fastws.User("u")

    server.start()
    try:
        status, body = await refused(server, "/?boom=1")
        assert status == 401 and "raised" in body["error"]
        started = time.monotonic()
        status, body = await refused(server, "/?slow=1")
        assert status == 401 and "timed out" in body["error"]
        assert time.monotonic() - started < 1.9
        async with _connect(server, "/") as c:
            assert await c.request({"event": "ping"}) == {"event": "pong"}
    finally:
        await asyncio.to_thread(server.stop)
    assert "database down" in caplog.text


# -- origins ----------------------------------------------------------------------------------------------------


async def test_cross_origin_is_refused_by_default_and_allowed_by_setting(start_server: StartServer) -> None:
    server = start_server()
    host, port = server.address
    status, body = await refused(server, headers={"Origin": "https://evil.example"})
    assert status == 403 and "allowed_origins" in body["error"]
    async with connect(f"ws://{host}:{port}/", origin=f"http://{host}:{port}") as ws:  # type: ignore[arg-type]
        assert json.loads(await ws.recv())["event"] == "connected"
    server.stop()
    server = start_server(allowed_origins=["https://*.example.com"])
    host, port = server.address
    async with connect(f"ws://{host}:{port}/", origin="https://app.example.com") as ws:  # type: ignore[arg-type]
        assert json.loads(await ws.recv())["event"] == "connected"
    status, _ = await refused(server, headers={"Origin": "https://example.org"})
    assert status == 403


# -- channel authorization --------------------------------------------------------------------------------------


async def test_default_authorization_rule(jwt_server: fastws.Server) -> None:
    async with user_client(jwt_server, token({"sub": "123"})) as c:
        await c.subscribe("private-user.123")
        for channel in ["private-user.1234", "private-orders"]:
            reply = await c.request({"event": "subscribe", "data": {"channel": channel}})
            assert (reply["event"], reply["channel"], reply["data"]["code"]) == ("error", channel, 4003)
        await c.subscribe("presence-lobby")
        stats = fastws.channel_stats("private-orders")
        assert stats["subscribers"] == 0  # a refused subscription leaves no trace


async def test_authorize_hook_sync_and_async_refusal_true_and_info(start_server: StartServer) -> None:
    server = fastws.Server(host="127.0.0.1", port=0, jwt_secret=SECRET)
    calls: list[tuple[str, str]] = []

    @server.authorize
    async def allow(user: fastws.User, channel: str) -> bool | dict[str, Any] | None:
        calls.append((user.id, channel))
        if channel == "private-admin":
            return user.info.get("role") == "admin"
        if channel.startswith("presence-"):
            return {"name": user.info["name"], "avatar": "a.png"}
        return None

    server.start()
    try:
        async with user_client(server, token({"sub": "1", "name": "Ana", "role": "admin"})) as ana:
            await ana.subscribe("private-admin")
            reply = await ana.request({"event": "subscribe", "data": {"channel": "private-other"}})
            assert reply["data"]["code"] == 4003
            reply = await ana.request({"event": "subscribe", "data": {"channel": "presence-room"}})
            assert reply["data"]["members"] == [
                {
                    "id": "1",
                    "info": {"name": "Ana", "avatar": "a.png"},
                    "connected_at": reply["data"]["members"][0]["connected_at"],
                }
            ]
        async with user_client(server, token({"sub": "2", "name": "Bob"})) as bob:
            reply = await bob.request({"event": "subscribe", "data": {"channel": "private-admin"}})
            assert reply["data"]["code"] == 4003
    finally:
        await asyncio.to_thread(server.stop)
    assert ("1", "private-admin") in calls


async def test_a_slow_authorize_hook_does_not_delay_anyone_else(start_server: StartServer) -> None:
    server = fastws.Server(host="127.0.0.1", port=0, jwt_secret=SECRET)

    @server.authorize
    def slow(user: fastws.User, channel: str) -> bool:
        time.sleep(1)
        return True

    server.start()
    try:
        async with (
            user_client(server, token({"sub": "1"})) as waiting,
            user_client(server, token({"sub": "2"})) as other,
        ):
            await other.subscribe("news")
            await waiting.send({"event": "subscribe", "data": {"channel": "private-slow"}})
            latencies = []
            for i in range(5):
                started = time.monotonic()
                await push("news", {"i": i})
                assert (await other.recv())["data"] == {"i": i}
                latencies.append(time.monotonic() - started)
            # The waiting connection itself keeps serving too.
            assert await waiting.request({"event": "ping"}) == {"event": "pong"}
            assert await waiting.recv(3) == {"event": "subscribed", "channel": "private-slow"}
    finally:
        await asyncio.to_thread(server.stop)
    assert max(latencies) < 0.5, latencies


# -- presence ---------------------------------------------------------------------------------------------------


async def test_presence_two_users_and_a_user_with_two_connections(jwt_server: fastws.Server) -> None:
    ana_token = token({"sub": "ana", "name": "Ana", "exp": int(time.time()) + 600})
    room = "presence-chat.room.1"
    async with user_client(jwt_server, token({"sub": "bob", "name": "Bob"})) as bob:
        reply = await bob.request({"event": "subscribe", "data": {"channel": room}})
        assert reply["event"] == "subscribed" and reply["channel"] == room
        [member] = reply["data"]["members"]
        assert member["id"] == "bob" and member["info"] == {"name": "Bob"}
        assert isinstance(member["connected_at"], int) and abs(member["connected_at"] - time.time()) < 5

        async with user_client(jwt_server, ana_token) as ana1:
            reply = await ana1.request({"event": "subscribe", "data": {"channel": room}})
            assert [m["id"] for m in reply["data"]["members"]] == ["bob", "ana"]
            # JWT users' info is their claims without the registered ones (exp here).
            assert await bob.recv() == {
                "event": "member_added",
                "channel": room,
                "data": {"id": "ana", "info": {"name": "Ana"}},
            }

            async with user_client(jwt_server, ana_token) as ana2:
                reply = await ana2.request({"event": "subscribe", "data": {"channel": room}})
                assert len(reply["data"]["members"]) == 2
                await bob.nothing()  # a second tab is not a new member
                assert fastws.channel_stats(room) == {"name": room, "type": "presence", "subscribers": 3, "members": 2}
                assert [m["id"] for m in fastws.presence(room)] == ["bob", "ana"]
            await bob.nothing()  # ana still has a tab open
            await ana1.request({"event": "unsubscribe", "data": {"channel": room}})
            assert await bob.recv() == {
                "event": "member_removed",
                "channel": room,
                "data": {"id": "ana", "info": {"name": "Ana"}},
            }
        assert [m["id"] for m in fastws.presence(room)] == ["bob"]


async def test_member_removed_after_an_abrupt_tcp_drop(jwt_server: fastws.Server) -> None:
    room = "presence-room"
    host, port = jwt_server.address
    async with user_client(jwt_server, token({"sub": "bob"})) as bob:
        await bob.request({"event": "subscribe", "data": {"channel": room}})
        ws = await connect(f"ws://{host}:{port}/?token={token({'sub': 'ana'})}")
        await ws.recv()
        await ws.send(json.dumps({"event": "subscribe", "data": {"channel": room}}))
        await ws.recv()
        assert (await bob.recv())["event"] == "member_added"
        # Abort the TCP connection without a closing handshake.
        sock = ws.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close → RST
        ws.transport.abort()
        assert await bob.recv() == {"event": "member_removed", "channel": room, "data": {"id": "ana", "info": {}}}


# -- push to a user ---------------------------------------------------------------------------------------------


async def test_to_user_reaches_every_connection_of_that_user_only(jwt_server: fastws.Server) -> None:
    async with (
        user_client(jwt_server, token({"sub": "123"})) as tab1,
        user_client(jwt_server, token({"sub": "123"})) as tab2,
        user_client(jwt_server, token({"sub": "456"})) as other,
    ):
        notification = {"event": "notification", "data": {"title": "Novo pedido", "body": "Pedido #1234"}}
        assert await asyncio.to_thread(fastws.to_user(123).push, notification) == 2
        assert await tab1.recv() == notification
        assert await tab2.recv() == notification
        await other.nothing()
        assert await asyncio.to_thread(fastws.to_user("999").push, {"x": 1}) == 0
        assert await asyncio.to_thread(fastws.to_user(456).push, [1, 2]) == 1
        assert await other.recv() == {"event": "message", "data": [1, 2]}
        # A user push has no "channel": one in the payload is dropped, wherever it was.
        assert await asyncio.to_thread(fastws.to_user(456).push, {"channel": "x", "event": "e"}) == 1
        assert await asyncio.wait_for(other.ws.recv(), 5) == '{"event":"e"}'
        assert await asyncio.to_thread(fastws.to_user(456).push, {"event": "e", "n": 1}) == 1
        assert await asyncio.wait_for(other.ws.recv(), 5) == '{"event":"e","n":1}'


# -- fastws token -----------------------------------------------------------------------------------------------


async def test_fastws_token_prints_a_token_the_server_accepts(start_server: StartServer) -> None:
    env = {**os.environ, "FASTWS_JWT_SECRET": SECRET, "FASTWS_JWT_AUDIENCE": "fastws"}
    result = subprocess.run(
        [sys.executable, "-m", "fastws", "token", "--user", "123", "--claim", "name=Ana", "--ttl", "60"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=True,
    )
    printed = result.stdout.strip()
    claims = jwt.decode(printed, SECRET, algorithms=["HS256"], audience="fastws")
    assert claims["sub"] == "123" and claims["name"] == "Ana" and 0 < claims["exp"] - time.time() <= 60
    server = start_server(jwt_secret=SECRET, jwt_audience="fastws")
    async with user_client(server, printed) as c:
        await c.subscribe("private-user.123")
        assert (await c.subscribe("presence-room"))["data"]["members"][0]["info"] == {"name": "Ana"}


def test_fastws_token_without_a_secret_is_a_one_line_error() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    result = subprocess.run(
        [sys.executable, "-m", "fastws", "token", "--user", "1"], capture_output=True, text=True, env=env, timeout=30
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "jwt_secret" in result.stderr


async def test_publishing_to_private_or_presence_needs_a_subscription(start_server: StartServer) -> None:
    server = start_server(jwt_secret=SECRET, client_publish=["private-*", "presence-*"])
    async with user_client(server, token({"sub": "a"})) as a, user_client(server, token({"sub": "b"})) as b:
        await b.subscribe("presence-r")
        for channel in ["presence-r", "private-user.b"]:
            reply = await a.request({"event": "publish", "data": {"channel": channel, "payload": 1}})
            assert reply["data"]["code"] == 4003 and "subscribe" in reply["data"]["message"], reply
        await b.nothing()
        await a.subscribe("presence-r")
        assert (await b.recv())["event"] == "member_added"
        await a.send({"event": "publish", "data": {"channel": "presence-r", "payload": {"x": 1}}})
        assert await b.recv() == {"event": "message", "channel": "presence-r", "data": {"x": 1}}


async def test_a_raising_or_hanging_authorize_hook_refuses_with_4003() -> None:
    server = fastws.Server(host="127.0.0.1", port=0, jwt_secret=SECRET, hook_timeout=0.5)

    @server.authorize
    def decide(user: fastws.User, channel: str) -> bool:
        if channel == "private-boom":
            raise RuntimeError("authorization backend down")
        time.sleep(2)
        return True

    server.start()
    try:
        async with user_client(server, token({"sub": "a"})) as c:
            for channel in ["private-boom", "private-slow"]:
                reply = await c.request({"event": "subscribe", "data": {"channel": channel}})
                assert (reply["channel"], reply["data"]["code"]) == (channel, 4003), reply
                assert "authorization failed" in reply["data"]["message"]
            assert await c.request({"event": "ping"}) == {"event": "pong"}
    finally:
        await asyncio.to_thread(server.stop)
