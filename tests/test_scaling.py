"""Redis scale-out (docs/scaling.md) with a real ``redis-server`` and real nodes.

Each test starts its own ``redis-server`` on a free loopback port (no persistence), and nodes as subprocesses
(``python -m fastws serve --redis-url ...``) beside, when a test needs it, the one server this process may run.
Every process a test starts is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import jwt
import pytest
from click.testing import CliRunner
from conftest import Client, StartServer, push, stop_process
from test_deploy import run_nginx
from websockets.asyncio.client import connect

import fastws
from fastws.cli import main

SECRET = "scale-out-test-secret-" + "x" * 32
NODE_TTL = 1.0  # seconds; members of a killed node must be gone within 2 × NODE_TTL
REDIS_SERVER = shutil.which("redis-server") or "/usr/sbin/redis-server"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's FASTWS_REDIS_URL or FASTWS_URL must not redirect these tests."""
    for name in list(os.environ):
        if name.startswith("FASTWS_"):
            monkeypatch.delenv(name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def token(user: str, **claims: Any) -> str:
    return jwt.encode({"sub": user, **claims}, SECRET, algorithm="HS256")


# -- redis-server --------------------------------------------------------------------------------------------


class Redis:
    """One redis-server on 127.0.0.1, no persistence; it can be killed and started again on the same port."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen([*command, "--dir", str(self.directory)], stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"redis-server did not start:\n{(self.directory / 'redis.log').read_text()}")
            time.sleep(0.02)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: Redis vanishes without closing anything, as in a crash."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[Redis]:
    if not os.access(REDIS_SERVER, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing: .ci/run must install it (apt-get install -y redis-server)")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


# -- nodes ----------------------------------------------------------------------------------------------------


class Node:
    """A fastws node: a subprocess (``python -m fastws serve``), or the server running in this process."""

    def __init__(self, port: int, process: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
        self.port, self.process, self.log = port, process, log

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log is not None and self.log.exists() else ""

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.http + path, timeout=5) as answer:
            return json.loads(answer.read())

    def post(self, path: str, body: Any) -> Any:
        request = urllib.request.Request(
            self.http + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            return json.loads(answer.read())

    @asynccontextmanager
    async def client(self, user: str | None = None, path: str = "/") -> AsyncIterator[Client]:
        query = f"?token={token(user)}" if user is not None else ""
        async with connect(f"ws://127.0.0.1:{self.port}{path}{query}", max_size=None) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert hello["event"] == "connected", hello
            yield Client(ws, hello["data"]["socket_id"])


StartNode = Callable[..., Node]


def wait_until_serving(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        if process.poll() is not None:
            pytest.fail(f"the node exited with status {process.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                pytest.fail(f"the node does not answer on port {port} after 20 s:\n{log.read_text(errors='replace')}")
            time.sleep(0.05)


def node_environment(**extra: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FASTWS_")}
    env.update(extra)
    return env


@pytest.fixture
def start_node(redis: Redis, tmp_path: Path) -> Iterator[StartNode]:
    """Start ``fastws serve`` as a subprocess joined to the test's Redis; every node is stopped after the test."""
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, *flags: str, node_ttl: float = NODE_TTL) -> Node:
        port = free_port()
        log = tmp_path / f"node-{name}.log"
        command = [sys.executable, "-m", "fastws", "serve", "--host", "127.0.0.1", "--port", str(port)]
        command += ["--workers", "2", "--no-demo", "--redis-url", redis.url, "--node-ttl", str(node_ttl)]
        command += ["--client-publish", "chat.*", *flags]
        with open(log, "wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=node_environment(FASTWS_JWT_SECRET=SECRET)
            )
        started.append(process)
        wait_until_serving(port, process, log)
        return Node(port, process, log)

    yield start
    for process in started:  # only the processes this test started, by PID
        stop_process(process)


@pytest.fixture
def local_node(redis: Redis, start_server: StartServer) -> Node:
    """This process's own server, joined to the test's Redis: ``fastws.push`` here goes through it."""
    server = start_server(redis_url=redis.url, node_ttl=NODE_TTL, jwt_secret=SECRET, client_publish=["chat.*"])
    return Node(server.port)


async def frames(client: Client, wait: float = 0.5) -> list[Any]:
    """Every frame that arrives until none comes for ``wait`` seconds."""
    received = []
    while True:
        try:
            received.append(json.loads(await asyncio.wait_for(client.ws.recv(), wait)))
        except TimeoutError:
            return received


async def eventually(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.05)


def member_ids(members: list[Any]) -> list[str]:
    return [member["id"] for member in members]


# -- delivery -------------------------------------------------------------------------------------------------


async def test_pushes_from_every_node_and_another_process_reach_each_subscriber_once(
    redis: Redis, local_node: Node, start_node: StartNode
) -> None:
    b, c = start_node("b"), start_node("c")
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(node.client(f"user-{i}"))
            for i, node in enumerate([local_node, local_node, b, b, c, c])
        ]
        for client in clients:
            await client.subscribe("chat.room")
        sender = clients[4]  # on node c

        # 1. fastws.push in a node's own process: this node's two subscribers are counted; the rest get it too.
        assert await push("chat.room", {"n": 1}) == 2
        # 2. POST /api/publish on another node.
        assert await asyncio.to_thread(b.post, "/api/publish", {"channel": "chat.room", "payload": {"n": 2}}) == {
            "delivered": 2
        }
        # 3. A client publishes on the third node; it doesn't get its own publication back.
        typing = {"event": "client-typing", "data": {"n": 3}}
        await sender.send({"event": "publish", "data": {"channel": "chat.room", "payload": typing}})
        # 4. Another Python process, with only FASTWS_REDIS_URL: straight into Redis, every node delivers.
        script = "import fastws; print(fastws.push('chat.room', {'n': 4}))"
        env = node_environment(FASTWS_REDIS_URL=redis.url)
        other = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=30
        )
        assert other.returncode == 0, other.stderr
        assert other.stdout.strip() == "3", "PUBLISH's answer: the three nodes with a subscriber"
        # 5. fastws.Client here, explicit.
        assert await asyncio.to_thread(fastws.Client(redis_url=redis.url).push, "chat.room", {"n": 5}) == 3

        expected = Counter(["1", "2", "client-3", "4", "5"])
        for client in clients:
            got = Counter(
                f"client-{f['data']['n']}" if f["event"] == "client-typing" else str(f["data"]["n"])
                for f in await frames(client)
            )
            assert all(f == 1 for f in got.values()), f"a frame arrived twice on {client.socket_id}: {got}"
            assert got == (expected - Counter(["client-3"]) if client is sender else expected), client.socket_id


async def test_a_push_right_after_subscribed_is_never_missed(redis: Redis, start_node: StartNode) -> None:
    """`subscribed` is sent once the node's Redis subscription is confirmed: a push made after it arrives."""
    node = start_node("a")
    publisher = fastws.Client(redis_url=redis.url)
    async with node.client("ana") as ana:
        for i in range(25):
            channel = f"chat.fresh.{i}"
            await ana.subscribe(channel)
            assert await asyncio.to_thread(publisher.push, channel, {"i": i}) == 1
            assert await ana.recv() == {"event": "message", "channel": channel, "data": {"i": i}}
        # And a presence channel: after its `subscribed` (with the members), pushes reach it.
        reply = await ana.subscribe("presence-fresh")
        assert member_ids(reply["data"]["members"]) == ["ana"]
        assert await asyncio.to_thread(publisher.push, "presence-fresh", {"x": 1}) == 1
        assert (await ana.recv())["data"] == {"x": 1}


async def test_a_push_from_a_node_without_subscribers_reaches_the_others(
    redis: Redis, local_node: Node, start_node: StartNode
) -> None:
    # This process's node has nobody on the channel and no connection of the user (push() returns 0), which must
    # not mean "nothing to send": a single node drops such a push at once, a clustered one still sends it on.
    b = start_node("b")
    async with b.client("bob") as bob, b.client("eve") as eve:
        await bob.subscribe("news")
        assert await push("news", {"n": 1}) == 0
        assert await asyncio.to_thread(fastws.to_user("eve").push, {"event": "hello"}) == 0
        assert await bob.recv() == {"event": "message", "channel": "news", "data": {"n": 1}}
        assert await eve.recv() == {"event": "hello"}


async def test_exclude_skips_a_socket_on_another_node(redis: Redis, start_node: StartNode) -> None:
    a, b = start_node("a"), start_node("b")
    async with a.client("ana") as ana, b.client("bob") as bob:
        await ana.subscribe("chat.room")
        await bob.subscribe("chat.room")
        body = {"channel": "chat.room", "payload": {"event": "e"}, "exclude": bob.socket_id}
        assert await asyncio.to_thread(a.post, "/api/publish", body) == {"delivered": 1}
        assert await ana.recv() == {"event": "e", "channel": "chat.room"}
        await bob.nothing()


async def test_to_user_reaches_the_users_connections_on_every_node(
    redis: Redis, local_node: Node, start_node: StartNode
) -> None:
    b, c = start_node("b"), start_node("c")
    async with local_node.client("ana") as ana_1, b.client("ana") as ana_2, c.client("bob") as bob:
        client = fastws.Client(redis_url=redis.url)
        notification = {"event": "notification", "data": {"unread": 3}}
        assert await asyncio.to_thread(client.to_user("ana").push, notification) == 3, "every node receives it"
        assert await asyncio.to_thread(fastws.to_user("ana").push, {"event": "again"}) == 1, "ana_1 is local"
        assert await asyncio.to_thread(c.post, "/api/publish", {"user": "ana", "payload": {"n": 1}}) == {"delivered": 0}
        expected = [notification, {"event": "again"}, {"event": "message", "data": {"n": 1}}]
        for ana in (ana_1, ana_2):  # three publishers: no order between them
            assert sorted(map(json.dumps, await frames(ana))) == sorted(map(json.dumps, expected))
        await bob.nothing()


# -- presence ---------------------------------------------------------------------------------------------------


async def test_one_user_on_two_nodes_is_one_member(redis: Redis, local_node: Node, start_node: StartNode) -> None:
    b, c = start_node("b"), start_node("c")
    async with (
        c.client("bob") as bob,
        local_node.client("ana") as ana_tab_1,
        b.client("ana") as ana_tab_2,
        b.client("carl") as carl,
    ):
        assert member_ids((await bob.subscribe("presence-room"))["data"]["members"]) == ["bob"]
        reply = await ana_tab_1.subscribe("presence-room")
        assert member_ids(reply["data"]["members"]) == ["bob", "ana"]
        assert all(isinstance(m["connected_at"], int) for m in reply["data"]["members"])
        ana = {"id": "ana", "info": {}}
        assert await bob.recv() == {"event": "member_added", "channel": "presence-room", "data": ana}

        # The same user's second tab, on another node: a member already, so no member_added.
        assert member_ids((await ana_tab_2.subscribe("presence-room"))["data"]["members"]) == ["bob", "ana"]
        await bob.nothing()
        await ana_tab_1.nothing()

        await carl.subscribe("presence-room")
        for client in (bob, ana_tab_1, ana_tab_2):
            assert (await client.recv())["event"] == "member_added"

        # The whole cluster answers, from any node and from outside.
        assert member_ids(fastws.presence("presence-room")) == ["bob", "ana", "carl"]
        assert member_ids(fastws.Client(redis_url=redis.url).presence("presence-room")) == ["bob", "ana", "carl"]
        expected_stats = {"name": "presence-room", "type": "presence", "subscribers": 4, "members": 3}
        await eventually("cluster-wide counts", lambda: fastws.channel_stats("presence-room") == expected_stats)
        assert await asyncio.to_thread(b.get, "/api/presence?channel=presence-room") == {
            "channel": "presence-room",
            "members": fastws.presence("presence-room"),
        }

        # Closing one of ana's tabs: still a member. Closing the other: member_removed, on every node.
        await ana_tab_1.request({"event": "unsubscribe", "data": {"channel": "presence-room"}})
        await bob.nothing()
        await ana_tab_2.ws.close()
        for client in (bob, carl):
            assert await client.recv() == {"event": "member_removed", "channel": "presence-room", "data": ana}
        assert member_ids(fastws.presence("presence-room")) == ["bob", "carl"]


async def test_a_killed_nodes_members_are_removed_within_twice_node_ttl(
    redis: Redis, local_node: Node, start_node: StartNode
) -> None:
    b, doomed = start_node("b"), start_node("doomed")
    async with local_node.client("ana") as ana, b.client("carl") as carl, doomed.client("bob") as bob:
        for client in (ana, carl, bob):
            await client.subscribe("presence-room")
        await frames(ana)
        await frames(carl)
        assert member_ids(fastws.presence("presence-room")) == ["ana", "carl", "bob"]
        await eventually("three nodes", lambda: len(local_node.get("/stats")["nodes"]) == 3)

        assert doomed.process is not None
        doomed.process.kill()  # SIGKILL: no goodbye, its liveness key simply stops being refreshed
        killed_at = time.monotonic()
        bob_gone = {"event": "member_removed", "channel": "presence-room", "data": {"id": "bob", "info": {}}}
        assert await ana.recv(timeout=2 * NODE_TTL + 1) == bob_gone
        elapsed = time.monotonic() - killed_at
        assert elapsed <= 2 * NODE_TTL, f"member_removed after {elapsed:.2f} s, node_ttl = {NODE_TTL}"
        assert await carl.recv() == bob_gone
        assert member_ids(fastws.presence("presence-room")) == ["ana", "carl"]
        assert len(local_node.get("/stats")["nodes"]) == 2


async def test_a_stopped_node_removes_its_members_at_once(
    redis: Redis, local_node: Node, start_node: StartNode
) -> None:
    leaving = start_node("leaving")
    async with local_node.client("ana") as ana, leaving.client("bob") as bob:
        await ana.subscribe("presence-room")
        await bob.subscribe("presence-room")
        await frames(ana)
        assert leaving.process is not None
        leaving.process.send_signal(signal.SIGTERM)
        assert (await ana.recv(timeout=NODE_TTL / 2 + 2))["event"] == "member_removed"


# -- Redis faults -------------------------------------------------------------------------------------------


async def test_redis_restart_local_delivery_goes_on_and_delivery_resumes(redis: Redis, start_node: StartNode) -> None:
    a, b = start_node("a"), start_node("b")
    async with a.client("ana") as ana, b.client("bob") as bob, a.client("zoe") as zoe:
        await ana.subscribe("chat.room")
        await bob.subscribe("chat.room")
        await zoe.subscribe("presence-room")

        redis.kill()
        await eventually("node a noticed", lambda: "lost the connection to Redis" in a.logs())
        # Alone, each node keeps serving its own clients: a publication on a reaches a's subscriber only.
        assert await asyncio.to_thread(a.post, "/api/publish", {"channel": "chat.room", "payload": {"n": 1}}) == {
            "delivered": 1
        }
        assert (await ana.recv())["data"] == {"n": 1}
        await bob.nothing()
        # A subscription during the outage is answered (by the node alone).
        await bob.subscribe("chat.during")
        # A process without a server gets a clear error.
        with pytest.raises(ConnectionError, match="cannot connect to Redis"):
            await asyncio.to_thread(fastws.Client(redis_url=redis.url).push, "chat.room", {})

        redis.start()  # the same port, empty: no key and no subscription survived
        publisher = fastws.Client(redis_url=redis.url)

        def reaches_both() -> bool:
            try:
                return publisher.push("chat.room", {"n": 2}) == 2
            except ConnectionError:
                return False

        await eventually("both nodes resubscribed", reaches_both, timeout=15)
        for client in (ana, bob):
            assert {"event": "message", "channel": "chat.room", "data": {"n": 2}} in await frames(client)
        assert await asyncio.to_thread(publisher.push, "chat.during", {"n": 3}) == 1
        assert (await bob.recv())["data"] == {"n": 3}
        # The nodes wrote their presence back into the new Redis.
        await eventually("presence restored", lambda: member_ids(publisher.presence("presence-room")) == ["zoe"])
        for node in (a, b):
            assert "reconnected to Redis" in node.logs(), node.logs()


def test_redis_unavailable_at_start_is_one_line_and_exit_1() -> None:
    url = f"redis://:not-shown@127.0.0.1:{free_port()}/0"
    command = [sys.executable, "-m", "fastws", "serve", "--host", "127.0.0.1", "--port", "0", "--redis", url]
    result = subprocess.run(command, env=node_environment(), capture_output=True, text=True, timeout=30)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fastws: error: cannot connect to Redis at redis://:***@127.0.0.1:"), lines[0]
    assert "not-shown" not in result.stderr


def test_in_process_start_raises_connection_error() -> None:
    server = fastws.Server(host="127.0.0.1", port=0, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(ConnectionError, match="cannot connect to Redis"):
        server.start()
    assert not server.running
    with pytest.raises(fastws.NotRunning):
        fastws.push("news", {})


# -- stats and the command line ----------------------------------------------------------------------------


async def test_stats_are_cluster_totals_with_the_nodes(redis: Redis, local_node: Node, start_node: StartNode) -> None:
    b = start_node("b")
    async with local_node.client("ana") as ana, b.client("bob") as bob, b.client("carl") as carl:
        for client in (ana, bob, carl):
            await client.subscribe("chat.room")
        await carl.subscribe("presence-room")
        await ana.subscribe("presence-room")

        def settled() -> Any:
            stats = local_node.get("/stats")
            return stats if stats["connections"] == 3 else None

        stats = await eventually("connection counts refreshed", settled)
        assert stats["broker"] == "redis"
        assert stats["channels"] == [
            {"name": "chat.room", "type": "public", "subscribers": 3},
            {"name": "presence-room", "type": "presence", "subscribers": 2, "members": 2},
        ]
        nodes = {node["address"]: node for node in stats["nodes"]}
        assert set(nodes) == {f"127.0.0.1:{local_node.port}", f"127.0.0.1:{b.port}"}
        assert nodes[f"127.0.0.1:{b.port}"]["connections"] == 2
        assert {node["id"] for node in stats["nodes"]} == {ana.socket_id.split(".")[0], bob.socket_id.split(".")[0]}
        assert b.get("/stats")["channels"] == stats["channels"], "any node answers for the cluster"
        assert fastws.channels() == stats["channels"]
        assert fastws.Client(redis_url=redis.url).channels() == stats["channels"]
        assert fastws.Client(url=b.http).channel_stats("chat.room")["subscribers"] == 3
        outside = fastws.Client(redis_url=redis.url)
        await eventually("every node's own figure refreshed", lambda: outside.connection_count() == 3)

        result = CliRunner().invoke(main, ["stats"], env={"FASTWS_URL": b.http})
        assert result.exit_code == 0, result.output
        lines = [" ".join(line.split()) for line in result.output.splitlines()]
        assert "Total Connections: 3" in lines and "Nodes: 2" in lines
        assert f"{bob.socket_id.split('.')[0]} 127.0.0.1:{b.port} 2 connections" in lines


async def test_fastws_push_command_through_redis(redis: Redis, start_node: StartNode) -> None:
    node = start_node("a")
    async with node.client("ana") as ana:
        await ana.subscribe("chat.room")
        runner = CliRunner()
        result = await asyncio.to_thread(
            runner.invoke, main, ["push", "--redis", redis.url, "chat.room", '{"event": "x", "data": 1}']
        )
        assert (result.exit_code, result.output) == (0, "published to 1 node\n")
        assert await ana.recv() == {"event": "x", "data": 1, "channel": "chat.room"}
        # FASTWS_REDIS_URL alone picks the same route; --user pushes to a user.
        env = {"FASTWS_REDIS_URL": redis.url}
        result = await asyncio.to_thread(runner.invoke, main, ["push", "--json", "--user", "ana", "[1]"], env=env)
        assert (result.exit_code, result.output) == (0, '{"nodes":1}\n')
        assert await ana.recv() == {"event": "message", "data": [1]}


async def test_client_over_http(redis: Redis, start_node: StartNode) -> None:
    node = start_node("a")
    async with node.client("ana") as ana:
        await ana.subscribe("presence-room")
        client = fastws.Client(url=node.http)
        assert client.route == "http"
        assert client.push("presence-room", {"n": 1}) == 1
        assert client.to_channel("presence-room").push({"n": 2}) == 1
        assert client.to_user("ana").push({"n": 3}) == 1
        assert [f["data"] for f in await frames(ana)] == [{"n": 1}, {"n": 2}, {"n": 3}]
        assert member_ids(client.presence("presence-room")) == ["ana"]
        assert client.channel_stats("nobody") == {"name": "nobody", "type": "public", "subscribers": 0}
        with pytest.raises(ValueError):
            client.push("bad name", {})


def test_module_functions_use_the_environment_without_a_server(redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(fastws.NotRunning, match="FASTWS_REDIS_URL.*FASTWS_URL"):
        fastws.push("news", {})
    monkeypatch.setenv("FASTWS_REDIS_URL", redis.url)
    assert fastws.push("news", {}) == 0, "no node has a subscriber"
    assert fastws.channel_stats("presence-x") == {
        "name": "presence-x",
        "type": "presence",
        "subscribers": 0,
        "members": 0,
    }
    assert fastws.presence("presence-x") == []
    monkeypatch.setenv("FASTWS_REDIS_PREFIX", "other")
    assert fastws.push("news", {}) == 0


def test_client_needs_exactly_one_route() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        fastws.Client()
    with pytest.raises(ValueError, match="exactly one"):
        fastws.Client(redis_url="redis://x", url="http://y")
    with pytest.raises(ValueError, match="redis://"):
        fastws.Client(redis_url="http://not-redis")


async def test_nodes_with_different_prefixes_share_one_redis(redis: Redis, start_node: StartNode) -> None:
    first, second = start_node("first"), start_node("second", "--redis-prefix", "app2")
    async with first.client("ana") as ana, second.client("bob") as bob:
        await ana.subscribe("chat.room")
        await bob.subscribe("chat.room")
        assert fastws.Client(redis_url=redis.url, redis_prefix="app2").push("chat.room", {"n": 1}) == 1
        assert (await bob.recv())["data"] == {"n": 1}
        await ana.nothing()


# -- behind a load balancer ---------------------------------------------------------------------------------


async def test_nginx_balances_two_nodes_and_clients_on_both_chat(
    redis: Redis, start_node: StartNode, tmp_path: Path
) -> None:
    a, b = start_node("a"), start_node("b")
    with run_nginx([a.port, b.port], tmp_path / "nginx") as proxy:
        port, tls = proxy.port, proxy.tls
        async with AsyncExitStack() as stack:
            clients: list[Client] = []
            for user in ("ana", "bob", "carl", "dora"):
                ws = await stack.enter_async_context(
                    connect(f"wss://ws.example.com/?token={token(user)}", host="127.0.0.1", port=port, ssl=tls)
                )
                hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
                clients.append(Client(ws, hello["data"]["socket_id"]))
            nodes = {client.socket_id.split(".")[0] for client in clients}
            assert len(nodes) == 2, f"nginx spread the connections over both nodes: {nodes}"
            for client in clients:
                await client.subscribe("chat.room.1")
                await client.subscribe("presence-lobby")
            for client in clients:
                await frames(client, 0.3)  # the member_added of those who joined later
            # Everyone says something; everyone else hears it once, whichever node they are on.
            for i, client in enumerate(clients):
                message = {"event": "client-message", "data": {"from": i}}
                await client.send({"event": "publish", "data": {"channel": "chat.room.1", "payload": message}})
            for i, client in enumerate(clients):
                heard = sorted(f["data"]["from"] for f in await frames(client) if f["event"] == "client-message")
                assert heard == [j for j in range(4) if j != i], (i, heard)
            lobby = fastws.Client(redis_url=redis.url).presence("presence-lobby")
            assert member_ids(lobby) == ["ana", "bob", "carl", "dora"]
