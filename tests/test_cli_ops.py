"""``fastws stats`` and ``fastws push`` against a live server, with real WebSocket clients (``websockets.sync``)."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import jwt
import pytest
from click.testing import CliRunner, Result
from conftest import StartServer
from websockets.sync.client import ClientConnection, connect

import fastws
import fastws.cli
from fastws._http import normalize_url
from fastws.cli import format_stats, main

# click 8.2 keeps stderr apart by default and dropped mix_stderr, which click 8.1 needs to do so
SEPARATE_STDERR: dict[str, Any] = (
    {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner).parameters else {}
)

SECRET = "test-secret-that-is-long-enough-for-hs512-" + "x" * 32


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own FASTWS_* variables (a FASTWS_URL, a FASTWS_API_KEY) must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith("FASTWS_"):
            monkeypatch.delenv(name)


def url_of(server: fastws.Server) -> str:
    host, port = server.address
    return f"http://{host}:{port}"


def run(
    server: fastws.Server | None, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> Result:
    """Invoke ``fastws ARGS`` in-process with FASTWS_URL naming ``server``."""
    full_env = {"FASTWS_URL": url_of(server)} if server is not None else {}
    full_env.update(env or {})
    return CliRunner(**SEPARATE_STDERR).invoke(main, list(args), env=full_env, input=stdin)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.output, result.stderr)
    assert result.stderr == ""
    return result.stdout


def assert_one_line_error(result: Result, code: int, *parts: str) -> None:
    assert result.exit_code == code, (result.output, result.stderr)
    assert result.stdout == ""
    assert result.stderr.startswith("fastws: error: ")
    assert result.stderr.count("\n") == 1
    for part in parts:
        assert part in result.stderr


def squeeze(text: str) -> list[str]:
    """The lines of a report with runs of spaces made single (the columns are aligned) and ends stripped."""
    return [" ".join(line.split()) for line in text.splitlines()]


@contextmanager
def ws_client(server: fastws.Server, query: str = "") -> Iterator[tuple[ClientConnection, str]]:
    """A connected client and its socket id."""
    with connect(url_of(server).replace("http://", "ws://") + "/" + query) as ws:
        hello = json.loads(ws.recv(timeout=5))
        assert hello["event"] == "connected", hello
        yield ws, hello["data"]["socket_id"]


def subscribe(ws: ClientConnection, channel: str) -> None:
    ws.send(json.dumps({"event": "subscribe", "data": {"channel": channel}}))
    reply = json.loads(ws.recv(timeout=5))
    assert (reply["event"], reply["channel"]) == ("subscribed", channel), reply


def closed_port() -> int:
    """A loopback port nothing listens on (bound for a moment by the OS's choice, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- the report -------------------------------------------------------------------------------------------------


def test_report_has_the_seed_guides_shape() -> None:
    stats = {
        "connections": 1234,
        "channels": [
            {"name": "private-user.123", "type": "private", "subscribers": 1},
            {"name": "chat.room.1", "type": "public", "subscribers": 156},
            {"name": "presence-dashboard", "type": "presence", "subscribers": 12, "members": 10},
        ],
        "messages_in": 5000,
        "messages_out": 1234567,
        "uptime_s": 3723.4,
    }
    assert format_stats(stats) == (
        "WebSocket Server Statistics\n"
        "\n"
        "Total Connections: 1,234\n"
        "Total Channels:    3\n"
        "Messages In:       5,000\n"
        "Messages Out:      1,234,567\n"
        "Uptime:            1h 02m 03s\n"
        "\n"
        "Active Channels:\n"
        "  chat.room.1 (public):          156 subscribers\n"
        "  presence-dashboard (presence):  12 subscribers, 10 members\n"
        "  private-user.123 (private):      1 subscriber"
    )
    limited = format_stats(stats, limit=1).splitlines()
    assert limited[-2:] == ["  chat.room.1 (public): 156 subscribers", "  ... and 2 more (--limit 0 shows all)"]


def test_report_of_an_idle_server() -> None:
    report = format_stats({"connections": 0, "channels": [], "messages_in": 0, "messages_out": 0, "uptime_s": 2.5})
    assert squeeze(report)[2:] == [
        "Total Connections: 0",
        "Total Channels: 0",
        "Messages In: 0",
        "Messages Out: 0",
        "Uptime: 2.5s",
        "",
        "Active Channels: none",
    ]


# -- fastws stats -----------------------------------------------------------------------------------------------


def test_stats_after_two_clients_subscribe(start_server: StartServer) -> None:
    server = start_server()
    with ws_client(server) as (ana, _), ws_client(server) as (bob, _):
        subscribe(ana, "chat.room.1")
        subscribe(ana, "news")
        subscribe(bob, "chat.room.1")
        lines = squeeze(ok(run(server, "stats")))
    assert lines[:4] == ["WebSocket Server Statistics", "", "Total Connections: 2", "Total Channels: 2"]
    assert lines[4].startswith("Messages In: ") and lines[5].startswith("Messages Out: ")
    assert lines[6].startswith("Uptime: ")
    assert lines[-3:] == ["Active Channels:", "chat.room.1 (public): 2 subscribers", "news (public): 1 subscriber"]


def test_stats_json_is_one_parsable_line(start_server: StartServer) -> None:
    server = start_server()
    with ws_client(server) as (ws, _):
        subscribe(ws, "chat.room.1")
        out = ok(run(server, "stats", "--json"))
    assert out.count("\n") == 1
    stats = json.loads(out)
    assert stats["connections"] == 1
    assert stats["channels"] == [{"name": "chat.room.1", "type": "public", "subscribers": 1}]
    assert {"messages_in", "messages_out", "uptime_s"} <= stats.keys()


def test_stats_url_option_and_websocket_scheme(start_server: StartServer) -> None:
    server = start_server()
    ws_url = url_of(server).replace("http://", "ws://") + "/"
    assert json.loads(ok(run(None, "stats", "--json", "--url", ws_url)))["connections"] == 0
    # A client's address with a path is not where the endpoints are: the error says what to give instead.
    result = run(None, "stats", "--url", ws_url + "ws")
    assert_one_line_error(result, 1, f"{url_of(server)}/ws/stats: not found (HTTP 404); give only http://host:port")


def test_watch_refreshes_count_times(start_server: StartServer) -> None:
    server = start_server()
    out = ok(run(server, "stats", "--watch", "--interval", "0.05", "--count", "2"))
    assert out.count("WebSocket Server Statistics") == 2
    assert out.count(f"Every 0.05s: {url_of(server)}") == 2
    lines = ok(run(server, "stats", "--json", "--watch", "--interval", "0.05", "--count", "3")).splitlines()
    assert len(lines) == 3 and all(json.loads(line)["connections"] == 0 for line in lines)


def test_watch_ends_with_exit_0_on_ctrl_c(start_server: StartServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(seconds: float) -> None:
        assert seconds == 2.0  # the default interval
        raise KeyboardInterrupt

    monkeypatch.setattr(fastws.cli, "_pause", interrupt)
    out = ok(run(start_server(), "stats", "--watch"))
    assert out.count("WebSocket Server Statistics") == 1


def test_count_needs_watch(start_server: StartServer) -> None:
    result = run(start_server(), "stats", "--count", "2")
    assert result.exit_code == 2 and "--interval and --count need --watch" in result.stderr


# -- fastws push ------------------------------------------------------------------------------------------------


def test_push_reaches_a_subscriber(start_server: StartServer) -> None:
    server = start_server()
    with ws_client(server) as (ws, socket_id):
        subscribe(ws, "chat.room.1")
        out = ok(run(server, "push", "chat.room.1", '{"event": "new-message", "data": {"text": "hi", "n": 1.50}}'))
        assert out == "delivered to 1 connection\n"
        assert json.loads(ws.recv(timeout=5)) == {
            "event": "new-message",
            "data": {"text": "hi", "n": 1.5},
            "channel": "chat.room.1",
        }
        assert ok(run(server, "push", "chat.room.1", "[1, 2]", "--json")) == '{"delivered":1}\n'
        assert json.loads(ws.recv(timeout=5)) == {"event": "message", "channel": "chat.room.1", "data": [1, 2]}
        assert ok(run(server, "push", "chat.room.1", "-", "--exclude", socket_id, stdin='"x"\n')) == (
            "delivered to 0 connections\n"
        )
        assert ok(run(server, "push", "nobody.here", "{}")) == "delivered to 0 connections\n"
        with pytest.raises(TimeoutError):
            ws.recv(timeout=0.3)


def test_push_to_a_user(start_server: StartServer) -> None:
    server = start_server(jwt_secret=SECRET)
    with ws_client(server, "?token=" + jwt.encode({"sub": "42", "name": "Ana"}, SECRET, algorithm="HS256")) as (ws, _):
        subscribe(ws, "presence-room")
        lines = squeeze(ok(run(server, "stats")))
        assert "presence-room (presence): 1 subscriber, 1 member" in lines
        assert ok(run(server, "push", "--user", "42", '{"event": "notification", "data": {"unread": 3}}')) == (
            "delivered to 1 connection\n"
        )
        assert json.loads(ws.recv(timeout=5)) == {"event": "notification", "data": {"unread": 3}}
    assert ok(run(server, "push", "--user", "7", "{}")) == "delivered to 0 connections\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["push", "chat.room.1"], "missing JSON payload"),
        (["push", "--user", "1", "chat.room.1", "{}"], "give only the JSON payload"),
        (["push", "--user", "1", "--exclude", "abc", "{}"], "--exclude applies to channel pushes"),
    ],
)
def test_push_usage_errors(start_server: StartServer, args: list[str], message: str) -> None:
    result = run(start_server(), *args)
    assert result.exit_code == 2 and message in result.stderr


@pytest.mark.parametrize("payload", ["{'a': 1}", "hello", '{"a": NaN}', ""])
def test_push_refuses_a_payload_that_is_not_json(start_server: StartServer, payload: str) -> None:
    assert_one_line_error(run(start_server(), "push", "chat.room.1", payload), 2, "the payload is not valid JSON")


def test_push_reports_the_servers_refusal(start_server: StartServer) -> None:
    result = run(start_server(), "push", "bad channel!", "{}")
    assert_one_line_error(result, 1, 'invalid channel name "bad channel!"', "(HTTP 400)")


# -- errors and the api_key rule --------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["stats"], ["stats", "--watch"], ["stats", "--json"], ["push", "chat", "{}"]])
def test_unreachable_server_is_one_line_and_exit_1(args: list[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    result = run(None, *args, env={"FASTWS_URL": url})
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == (
        f"fastws: error: cannot reach {url} (connection refused); is the server running? (set --url or FASTWS_URL)\n"
    )


def test_a_bad_url_is_a_usage_error() -> None:
    assert_one_line_error(run(None, "stats", "--url", "ftp://host"), 2, "must start with http://")


def test_api_key_is_required_when_the_server_sets_one(start_server: StartServer) -> None:
    server = start_server(api_key="k")
    assert_one_line_error(run(server, "stats"), 1, "a valid API key is required", "(HTTP 401; set FASTWS_API_KEY")
    assert_one_line_error(run(server, "stats", env={"FASTWS_API_KEY": "wrong"}), 1, "(HTTP 401")
    assert_one_line_error(run(server, "push", "chat.room.1", "{}"), 1, "a valid API key is required")
    assert json.loads(ok(run(server, "stats", "--json", env={"FASTWS_API_KEY": "k"})))["connections"] == 0
    assert ok(run(server, "push", "chat.room.1", "{}", "--api-key", "k")) == "delivered to 0 connections\n"


def test_python_dash_m_reports_an_unreachable_server_without_traceback() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    env = {name: value for name, value in os.environ.items() if not name.startswith("FASTWS_")}
    completed = subprocess.run(
        [sys.executable, "-m", "fastws", "stats"],
        env={**env, "FASTWS_URL": url},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 1
    assert completed.stdout == ""
    assert completed.stderr == (
        f"fastws: error: cannot reach {url} (connection refused); is the server running? (set --url or FASTWS_URL)\n"
    )


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:9501", "http://127.0.0.1:9501"),
        ("ws://example.com:9501/", "http://example.com:9501"),
        ("wss://example.com/ws-prefix/", "https://example.com/ws-prefix"),
        ("localhost:9501", "http://localhost:9501"),
    ],
)
def test_normalize_url(given: str, expected: str) -> None:
    assert normalize_url(given) == expected


@pytest.mark.parametrize("given", ["ftp://host", "http://host:99999", "http://:9501", "http://host/?a=1"])
def test_normalize_url_refuses(given: str) -> None:
    with pytest.raises(ValueError, match="the URL"):
        normalize_url(given)
