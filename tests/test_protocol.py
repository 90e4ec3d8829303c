"""The native wire protocol over real sockets: subscribe, push, publish, and every refusal (docs/protocol.md)."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import StartServer, client, masked_frame, push, raw_websocket
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import fastws


async def test_connected_frame_carries_a_unique_socket_id(server: fastws.Server) -> None:
    async with client(server) as a, client(server, "/ws?token=ignored-in-open-mode") as b:
        assert a.socket_id != b.socket_id
        assert fastws.connection_count() == 2


async def test_seed_quick_start_subscribe_then_receive_a_push(server: fastws.Server) -> None:
    async with client(server) as c:
        await c.subscribe("chat.room.1")
        message = {"event": "new-message", "data": {"user": "João", "message": "Olá a todos!", "timestamp": 1}}
        assert await push("chat.room.1", message) == 1
        assert await c.recv() == {**message, "channel": "chat.room.1"}


async def test_non_event_payloads_are_wrapped_as_message(server: fastws.Server) -> None:
    async with client(server) as c:
        await c.subscribe("news")
        for payload in [{"a": 1}, [1, 2], "text", 3.5, None]:
            await push("news", payload)
            assert await c.recv() == {"event": "message", "channel": "news", "data": payload}
        await push("news", b'{"event":"raw","data":[1]}')
        assert await c.recv() == {"event": "raw", "data": [1], "channel": "news"}


async def test_every_payload_form_arrives_as_documented(server: fastws.Server) -> None:
    # The raw text, not just the parsed object: a "channel" key written twice would parse as one.
    class Event(dict[str, object]):
        pass

    cases: list[tuple[object, str]] = [
        ({"event": "e", "data": {"a": [1, "}"]}}, '{"event":"e","data":{"a":[1,"}"]},"channel":"news"}'),
        ({"channel": "fake", "event": "e", "data": 1}, '{"event":"e","data":1,"channel":"news"}'),
        ({"data": 1, "channel": "fake"}, '{"event":"message","channel":"news","data":{"data":1,"channel":"fake"}}'),
        (Event(event="sub", n=1), '{"event":"sub","n":1,"channel":"news"}'),
        (bytearray(b"[1]"), '{"event":"message","channel":"news","data":[1]}'),
        (memoryview(b' {"event":"m"} '), '{"event":"m","channel":"news"}'),
        ({}, '{"event":"message","channel":"news","data":{}}'),
    ]
    async with client(server) as c:
        await c.subscribe("news")
        for payload, frame in cases:
            assert await push("news", payload) == 1
            assert await asyncio.wait_for(c.ws.recv(), 5) == frame, payload


async def test_unsubscribe_stops_delivery(server: fastws.Server) -> None:
    async with client(server) as c:
        await c.subscribe("news")
        assert await c.request({"event": "unsubscribe", "data": {"channel": "news"}}) == {
            "event": "unsubscribed",
            "channel": "news",
        }
        assert await push("news", {"x": 1}) == 0
        await c.nothing()
        assert fastws.channels() == []


async def test_two_channels_are_isolated(server: fastws.Server) -> None:
    async with client(server) as a, client(server) as b:
        await a.subscribe("room.a")
        await b.subscribe("room.b")
        await push("room.a", {"for": "a"})
        assert (await a.recv())["data"] == {"for": "a"}
        await b.nothing()


async def test_ping_event_gets_pong(server: fastws.Server) -> None:
    async with client(server) as c:
        assert await c.request({"event": "ping"}) == {"event": "pong"}


async def test_exclude_skips_the_sender(server: fastws.Server) -> None:
    async with client(server) as a, client(server) as b:
        await a.subscribe("news")
        await b.subscribe("news")
        assert await push("news", {"n": 1}, exclude=a.socket_id) == 1
        assert (await b.recv())["data"] == {"n": 1}
        await a.nothing()


async def test_fluent_to_channel_and_stats(server: fastws.Server) -> None:
    async with client(server) as a, client(server) as b:
        await a.subscribe("chat.room.1")
        await b.subscribe("chat.room.1")
        await b.subscribe("dashboard")
        assert fastws.to_channel("chat.room.1").push({"event": "e"}) == 2
        assert fastws.channel_stats("chat.room.1") == {"name": "chat.room.1", "subscribers": 2, "type": "public"}
        assert fastws.channel_stats("nobody.here") == {"name": "nobody.here", "subscribers": 0, "type": "public"}
        assert [c["name"] for c in fastws.channels()] == ["chat.room.1", "dashboard"]
    # Disconnecting unsubscribes everywhere and empty channels disappear.
    for _ in range(50):
        if fastws.connection_count() == 0 and not fastws.channels():
            break
        await asyncio.sleep(0.05)
    assert fastws.connection_count() == 0
    assert fastws.channels() == []


async def test_client_publish_reaches_others_but_not_the_sender(server: fastws.Server) -> None:
    async with client(server) as a, client(server) as b:
        await a.subscribe("chat.room.1")
        await b.subscribe("chat.room.1")
        await a.send({"event": "publish", "data": {"channel": "chat.room.1", "payload": {"text": "hi"}}})
        assert await b.recv() == {"event": "message", "channel": "chat.room.1", "data": {"text": "hi"}}
        await a.send({"event": "publish", "data": {"channel": "chat.room.1", "payload": {"event": "client-typing"}}})
        assert await b.recv() == {"event": "client-typing", "channel": "chat.room.1"}
        await a.nothing()


async def test_a_burst_of_client_publications_keeps_its_order_across_channels(server: fastws.Server) -> None:
    # One TCP write, so the server reads the whole burst at once: publications to one channel are delivered
    # together, and a change of channel, or the close at the end, must not reorder or drop any of them.
    async with client(server) as both, client(server) as only_a:
        await both.subscribe("chat.a")
        await both.subscribe("chat.b")
        await only_a.subscribe("chat.a")
        sent = [("chat.a", n) for n in range(30)] + [("chat.b", n) for n in range(30, 50)]
        sent += [("chat.a", n) for n in range(50, 100)]
        burst = b"".join(
            masked_frame(0x81, json.dumps({"event": "publish", "data": {"channel": ch, "payload": {"n": n}}}).encode())
            for ch, n in sent
        )
        sock = await asyncio.to_thread(raw_websocket, server)
        sock.sendall(burst + masked_frame(0x88, (1000).to_bytes(2, "big")))
        got_both = [await both.recv() for _ in sent]
        assert [(f["channel"], f["data"]["n"]) for f in got_both] == sent
        got_a = [(await only_a.recv())["data"]["n"] for ch, _ in sent if ch == "chat.a"]
        assert got_a == [n for ch, n in sent if ch == "chat.a"]
        sock.close()


async def test_clients_cannot_forge_server_events(server: fastws.Server) -> None:
    async with client(server) as a, client(server) as b:
        await a.subscribe("chat.x")
        await b.subscribe("chat.x")
        for forged in ["member_added", "error", "subscribed", "message"]:
            payload = {"event": forged, "data": {"id": "evil"}}
            await a.send({"event": "publish", "data": {"channel": "chat.x", "payload": payload}})
            assert await b.recv() == {"event": "message", "channel": "chat.x", "data": payload}


async def test_publish_outside_client_publish_is_refused(server: fastws.Server) -> None:
    async with client(server) as a, client(server) as b:
        await b.subscribe("news")
        reply = await a.request({"event": "publish", "data": {"channel": "news", "payload": 1}})
        assert reply["event"] == "error"
        assert reply["channel"] == "news"
        assert reply["data"]["code"] == 4003
        assert "client_publish" in reply["data"]["message"]
        await b.nothing()
        assert await a.request({"event": "ping"}) == {"event": "pong"}


async def test_default_allows_no_client_publish(start_server: StartServer) -> None:
    server = start_server()
    async with client(server) as a:
        reply = await a.request({"event": "publish", "data": {"channel": "chat.room.1", "payload": 1}})
        assert reply["data"]["code"] == 4003


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("not json", 4000),
        ("[1, 2]", 4000),
        ('"a string"', 4000),
        ("{}", 4000),
        ({"event": 5}, 4000),
        ({"event": "subscribe"}, 4000),
        ({"event": "subscribe", "data": "chat"}, 4000),
        ({"event": "subscribe", "data": {"channel": 5}}, 4000),
        ({"event": "publish", "data": {"channel": "chat.x"}}, 4000),
        (b"\x00binary", 4000),
        ({"event": "subscribe", "data": {"channel": "has space"}}, 4002),
        ({"event": "subscribe", "data": {"channel": ""}}, 4002),
        ({"event": "subscribe", "data": {"channel": "x" * 201}}, 4002),
        ({"event": "subscribe", "data": {"channel": "canal-ção"}}, 4002),
        ({"event": "subscribe", "data": {"channel": "private-user.1"}}, 4003),
        ({"event": "subscribe", "data": {"channel": "presence-room"}}, 4003),
        ({"event": "dance"}, 4004),
    ],
)
async def test_bad_input_gets_its_error_and_the_connection_stays_usable(
    server: fastws.Server, frame: object, code: int
) -> None:
    async with client(server) as c, client(server) as other:
        await other.subscribe("chat.room.1")
        reply = await c.request(frame)
        assert reply["event"] == "error"
        assert reply["data"]["code"] == code
        assert isinstance(reply["data"]["message"], str) and reply["data"]["message"]
        # The same connection still works, and so does everyone else's.
        await c.subscribe("chat.room.1")
        assert await push("chat.room.1", {"ok": True}) == 2
        assert (await c.recv())["data"] == {"ok": True}
        assert (await other.recv())["data"] == {"ok": True}


async def test_unknown_fields_are_ignored(server: fastws.Server) -> None:
    async with client(server) as c:
        reply = await c.request({"event": "subscribe", "data": {"channel": "news", "extra": 1}, "id": 7})
        assert reply == {"event": "subscribed", "channel": "news"}


async def test_too_many_channels_is_4005(start_server: StartServer) -> None:
    server = start_server(max_channels_per_connection=3)
    async with client(server) as c:
        for i in range(3):
            await c.subscribe(f"c{i}")
        reply = await c.request({"event": "subscribe", "data": {"channel": "c3"}})
        assert reply["data"]["code"] == 4005
        assert reply["channel"] == "c3"
        await c.subscribe("c0")  # re-subscribing to a channel it has is not a new one
        await c.request({"event": "unsubscribe", "data": {"channel": "c0"}})
        await c.subscribe("c3")


async def test_oversized_message_closes_with_1009(start_server: StartServer) -> None:
    server = start_server(max_message_size=1024)
    async with client(server) as c, client(server) as other:
        await c.send(json.dumps({"event": "ping", "pad": "x" * 2000}))
        with pytest.raises(ConnectionClosed) as closed:
            await c.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
        assert await other.request({"event": "ping"}) == {"event": "pong"}


async def test_thousand_subscribers_all_receive_one_push(server: fastws.Server) -> None:
    host, port = server.address
    sockets = []
    try:
        for _ in range(1000):
            ws = await connect(f"ws://{host}:{port}/")
            sockets.append(ws)
        for ws in sockets:
            await ws.recv()  # connected
            await ws.send('{"event":"subscribe","data":{"channel":"big"}}')
        for ws in sockets:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {"event": "subscribed", "channel": "big"}
        assert await push("big", {"event": "hello"}) == 1000
        frames = await asyncio.gather(*(asyncio.wait_for(ws.recv(), 10) for ws in sockets))
        assert all(json.loads(f) == {"event": "hello", "channel": "big"} for f in frames)
    finally:
        await asyncio.gather(*(ws.close() for ws in sockets))


async def test_one_publisher_order_is_kept_for_every_subscriber(server: fastws.Server) -> None:
    async with client(server) as a, client(server) as b:
        await a.subscribe("seq")
        await b.subscribe("seq")

        def publish_all() -> None:
            for i in range(500):
                fastws.push("seq", {"i": i})

        await asyncio.to_thread(publish_all)
        for c in (a, b):
            assert [(await c.recv())["data"]["i"] for _ in range(500)] == list(range(500))


async def test_server_stop_sends_going_away(start_server: StartServer) -> None:
    server = start_server()
    async with client(server) as c:
        await asyncio.to_thread(server.stop)
        with pytest.raises(ConnectionClosed) as closed:
            await c.recv()
        rcvd = closed.value.rcvd
        assert rcvd is not None and (rcvd.code, rcvd.reason) == (1001, "going away")


async def test_a_client_close_gets_the_closing_handshake_back(server: fastws.Server) -> None:
    host, port = server.address
    async with connect(f"ws://{host}:{port}/") as ws:
        await ws.recv()
        await ws.close(code=1000, reason="bye")
        assert ws.protocol.close_rcvd is not None, "the server answered the close frame"
        assert ws.protocol.close_rcvd.code == 1000
