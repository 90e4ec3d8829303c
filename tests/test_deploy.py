"""docs/deploy/nginx.conf, as documented, in front of a real fastws server: wss through Debian's nginx.

The test runs the documented file as it is, replacing only its ports, certificate paths and log directory, inside a
minimal main config of its own (``events {}``, ``http {}`` and temp paths in ``tmp_path``), so nginx needs no root
paths. TLS uses a throwaway self-signed certificate for both documented host names; clients connect to the real
names (``wss://ws.example.com/``), redirected to nginx's loopback port, so ``Host`` and ``Origin`` look as in
production.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
from conftest import Client, StartServer, push, stop_process
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

import fastws

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "docs" / "deploy" / "nginx.conf"
DEPLOY_MD = ROOT / "docs" / "deploy.md"
NGINX = "/usr/sbin/nginx"
HOSTS = ("ws.example.com", "example.com")  # server A and server B of the documented file
TOKEN = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LWluLXRoZS11cmw.sig"  # must never reach the access log
NEW_MESSAGE = {"event": "new-message", "data": {"user": "João", "message": "Olá a todos!", "timestamp": 1732291200}}

# Around the documented file: what Debian's /etc/nginx/nginx.conf would provide, with every path in tmp_path.
MAIN_CONF = """\
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log info;
events {{
    worker_connections 64;
}}
http {{
    client_body_temp_path {tmp}/client_body_temp;
    proxy_temp_path {tmp}/proxy_temp;
    fastcgi_temp_path {tmp}/fastcgi_temp;
    uwsgi_temp_path {tmp}/uwsgi_temp;
    scgi_temp_path {tmp}/scgi_temp;
    access_log {tmp}/access.log;
    include {tmp}/fastws.conf;
}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def replace_exactly(text: str, pattern: str, replacement: str, count: int) -> str:
    """Replace ``pattern`` (a regex), which docs/deploy/nginx.conf must contain exactly ``count`` times."""
    new_text, found = re.subn(pattern, lambda _: replacement, text)
    assert found == count, f"docs/deploy/nginx.conf: expected {count} x {pattern!r}, found {found}; update the test"
    return new_text


def documented_config(fastws_port: int, nginx_port: int, cert: Path, key: Path, logs: Path) -> str:
    """docs/deploy/nginx.conf with the test's ports, certificate and log directory; every directive else as is."""
    text = NGINX_CONF.read_text()
    text = replace_exactly(text, re.escape("server 127.0.0.1:9501;"), f"server 127.0.0.1:{fastws_port};", 1)
    text = replace_exactly(text, re.escape("listen 443 ssl;"), f"listen 127.0.0.1:{nginx_port} ssl;", 2)
    text = replace_exactly(text, r"/etc/letsencrypt/live/[a-z.]+/fullchain\.pem", str(cert), 2)
    text = replace_exactly(text, r"/etc/letsencrypt/live/[a-z.]+/privkey\.pem", str(key), 2)
    return replace_exactly(text, re.escape("/var/log/nginx/"), f"{logs}/", 2)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fastws deploy test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host) for host in HOSTS]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


class Proxy:
    """A running nginx: its TLS port on 127.0.0.1, the client TLS context that trusts it, its log files."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, tls: ssl.SSLContext, directory: Path) -> None:
        self.process, self.port, self.tls, self.directory = process, port, tls, directory
        self.access_log = directory / "fastws.access.log"

    def errors(self) -> str:
        parts = [self.directory / "error.log", self.directory / "nginx.out"]
        return "\n".join(path.read_text(errors="replace") for path in parts if path.exists())

    @asynccontextmanager
    async def connect(self, host: str, path: str, origin: str | None = None) -> AsyncIterator[Client]:
        """Open ``wss://{host}{path}`` through nginx (TCP to its loopback port) and check the ``connected`` frame."""
        async with connect(
            f"wss://{host}{path}",
            host="127.0.0.1",
            port=self.port,
            ssl=self.tls,
            origin=None if origin is None else Origin(origin),
            open_timeout=10,
            max_size=None,
        ) as ws:
            hello = json.loads(await asyncio.wait_for(ws.recv(), 5))
            assert hello["event"] == "connected", hello
            yield Client(ws, hello["data"]["socket_id"])

    async def request(
        self, method: str, host: str, path: str, headers: dict[str, str] | None = None, body: Any = None
    ) -> tuple[int, Any]:
        """A plain HTTPS request through nginx, with an optional JSON body: (status, JSON answer)."""
        data = b"" if body is None else json.dumps(body).encode()
        head = {"Host": host, "Connection": "close", **(headers or {})}
        if body is not None:
            head.update({"Content-Type": "application/json", "Content-Length": str(len(data))})
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port, ssl=self.tls, server_hostname=host), 10
        )
        try:
            lines = "".join(f"{name}: {value}\r\n" for name, value in head.items())
            writer.write(f"{method} {path} HTTP/1.1\r\n{lines}\r\n".encode() + data)
            await writer.drain()
            response = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        status_line, _, answer = response.partition(b"\r\n\r\n")
        return int(status_line.split()[1]), json.loads(answer)


StartProxy = Callable[[int], Proxy]


def nginx_binary() -> str:
    """Debian's nginx: CI must have it (.ci/run installs it); elsewhere the test is skipped without it."""
    if os.access(NGINX, os.X_OK):
        return NGINX
    if os.environ.get("CI"):
        pytest.fail(f"{NGINX} is missing: .ci/run must install nginx (apt-get install -y nginx)")
    pytest.skip(f"{NGINX} is not installed (apt-get install nginx)")


@contextmanager
def run_nginx(fastws_ports: list[int], directory: Path) -> Iterator[Proxy]:
    """nginx with the documented config, every port in ``fastws_ports`` in its upstream (round robin); stopped
    (only this nginx, by its PID) when the block ends. Used here and by tests/test_scaling.py's load balancer."""
    binary = nginx_binary()
    directory.mkdir()
    cert, key = self_signed_certificate(directory)
    port = free_port()
    config = documented_config(fastws_ports[0], port, cert, key, directory)
    upstream = "\n    ".join(f"server 127.0.0.1:{node};" for node in fastws_ports)
    config = replace_exactly(config, rf"server 127\.0\.0\.1:{fastws_ports[0]};", upstream, 1)
    (directory / "fastws.conf").write_text(config)
    (directory / "nginx.conf").write_text(MAIN_CONF.format(tmp=directory))
    with open(directory / "nginx.out", "wb") as out:
        process = subprocess.Popen(
            [binary, "-e", str(directory / "error.log"), "-p", f"{directory}/"]
            + ["-c", str(directory / "nginx.conf"), "-g", "daemon off;"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proxy = Proxy(process, port, ssl.create_default_context(cafile=str(cert)), directory)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                pytest.fail(f"nginx exited with status {process.returncode}:\n{proxy.errors()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"nginx is not listening on 127.0.0.1:{port} after 10 s:\n{proxy.errors()}")
                time.sleep(0.05)
        yield proxy
    finally:
        stop_process(process)


@pytest.fixture
def start_nginx(tmp_path: Path) -> Iterator[StartProxy]:
    """Start nginx with the documented config in front of the fastws server on the given port; stopped after."""
    with ExitStack() as stack:

        def start(fastws_port: int) -> Proxy:
            return stack.enter_context(run_nginx([fastws_port], tmp_path / "nginx"))

        yield start


def test_deploy_md_shows_the_tested_nginx_conf() -> None:
    assert NGINX_CONF.read_text() in DEPLOY_MD.read_text(), "docs/deploy.md must include docs/deploy/nginx.conf as is"


async def test_own_host_push_publish_healthz_and_1001_through_nginx(
    start_server: StartServer, start_nginx: StartProxy
) -> None:
    server = start_server(client_publish=["chat.*"])
    proxy = start_nginx(server.port)

    async with (
        proxy.connect("ws.example.com", f"/?token={TOKEN}", origin="https://ws.example.com") as alice,
        proxy.connect("ws.example.com", "/") as bob,
    ):
        await alice.subscribe("chat.room.1")
        await bob.subscribe("chat.room.1")

        # The application pushes; both subscribers get the object with "channel" added.
        assert await push("chat.room.1", NEW_MESSAGE) == 2
        for client in (alice, bob):
            assert await client.recv() == {**NEW_MESSAGE, "channel": "chat.room.1"}

        # A client publishes (client_publish=["chat.*"]); the others get it, the sender doesn't.
        typing = {"event": "client-typing", "data": {"user": "bob"}}
        await bob.send({"event": "publish", "data": {"channel": "chat.room.1", "payload": typing}})
        assert await alice.recv() == {**typing, "channel": "chat.room.1"}
        await bob.nothing()

        assert await alice.request({"event": "ping"}) == {"event": "pong"}
        assert await proxy.request("GET", "ws.example.com", "/healthz") == (200, {"status": "ok"})

        # Stopping fastws (what SIGTERM does) closes every client with 1001, and nginx passes the close frame on.
        await asyncio.to_thread(server.stop)
        for client in (alice, bob):
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(client.ws.recv(), 10)
            assert closed.value.rcvd is not None, "no close frame came through nginx"
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "going away")

    # The documented log format logs the handshake (101) without the query string, so without the token.
    deadline = time.monotonic() + 5
    while " 101 " not in (log := proxy.access_log.read_text() if proxy.access_log.exists() else ""):
        assert time.monotonic() < deadline, f"no 101 line in the access log:\n{log}\n{proxy.errors()}"
        await asyncio.sleep(0.05)
    assert '"GET / HTTP/1.1" 101 ' in log, log
    assert TOKEN not in log and "token=" not in log, log


async def test_ws_path_on_the_apps_own_host(start_server: StartServer, start_nginx: StartProxy) -> None:
    """Server B: wss://example.com/ws reaches fastws's /ws, and the page's own origin passes the default rule."""
    server = start_server()
    proxy = start_nginx(server.port)
    async with proxy.connect("example.com", f"/ws?token={TOKEN}", origin="https://example.com") as client:
        await client.subscribe("chat.room.1")
        assert await push("chat.room.1", NEW_MESSAGE) == 1
        assert await client.recv() == {**NEW_MESSAGE, "channel": "chat.room.1"}
    assert TOKEN not in proxy.access_log.read_text()


async def refused_status(proxy: Proxy, host: str, origin: str) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as refused:
        async with proxy.connect(host, "/", origin=origin):
            pass
    response = refused.value.response
    return response.status_code, json.loads(response.body or b"{}").get("error", "")


async def test_a_page_on_another_origin_is_refused_by_default(
    start_server: StartServer, start_nginx: StartProxy
) -> None:
    """Host: $host is ws.example.com; a page on app.example.com sends Origin https://app.example.com: 403."""
    server = start_server()
    proxy = start_nginx(server.port)
    status, error = await refused_status(proxy, "ws.example.com", "https://app.example.com")
    assert status == 403 and "allowed_origins" in error
    # $host has no port: on a non-standard port the page's own origin keeps it and no longer matches.
    host = f"ws.example.com:{proxy.port}"
    status, _ = await refused_status(proxy, host, f"https://{host}")
    assert status == 403


async def test_allowed_origins_admits_the_apps_origin_and_replaces_the_same_origin_rule(
    start_server: StartServer, start_nginx: StartProxy
) -> None:
    server = start_server(allowed_origins=["https://app.example.com"])
    proxy = start_nginx(server.port)
    async with proxy.connect("ws.example.com", "/", origin="https://app.example.com") as client:
        await client.subscribe("chat.room.1")
    # Once allowed_origins is set, only its patterns count: the WebSocket host's own origin must be listed too.
    status, _ = await refused_status(proxy, "ws.example.com", "https://ws.example.com")
    assert status == 403


async def test_fastws_sees_nginx_as_remote_addr_and_the_client_in_x_forwarded_for(start_nginx: StartProxy) -> None:
    seen: list[fastws.Request] = []
    server = fastws.Server(host="127.0.0.1", port=0, workers=2)

    @server.authenticate
    def authenticate(request: fastws.Request) -> fastws.User | None:
        seen.append(request)
        return fastws.User("ana") if request.query.get("token") == TOKEN else None

    server.start()
    try:
        proxy = start_nginx(server.port)
        async with proxy.connect("ws.example.com", f"/?token={TOKEN}") as client:
            await client.subscribe("private-user.ana")
    finally:
        await asyncio.to_thread(server.stop)
    request = seen[0]
    assert request.remote_addr == "127.0.0.1"  # nginx's side of the proxied connection
    assert request.headers["X-Forwarded-For"] == "127.0.0.1"  # the client's address, as nginx saw it
    assert request.headers["X-Forwarded-Proto"] == "https"
    assert request.headers["Host"] == "ws.example.com"
    assert request.query == {"token": TOKEN}


def local_get(server: fastws.Server, path: str) -> int:
    """GET straight to fastws on the loopback, as a monitor on the same host does: the status."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as answer:
            status: int = answer.status
            return status
    except urllib.error.HTTPError as error:
        return error.code


async def test_operational_endpoints_count_proxied_requests_as_remote(
    start_server: StartServer, start_nginx: StartProxy
) -> None:
    """X-Forwarded-For marks requests as proxied: without api_key, /stats answers local requests only."""
    server = start_server()
    proxy = start_nginx(server.port)
    assert await asyncio.to_thread(local_get, server, "/stats") == 200
    status, answer = await proxy.request("GET", "ws.example.com", "/stats")
    assert status == 403 and "api_key" in answer["error"], answer
    status, _ = await proxy.request("POST", "ws.example.com", "/api/publish", body={"channel": "c", "payload": 1})
    assert status == 403


async def test_with_api_key_the_endpoints_answer_through_the_proxy(
    start_server: StartServer, start_nginx: StartProxy
) -> None:
    server = start_server(api_key="test-key-0123456789")
    proxy = start_nginx(server.port)
    bearer = {"Authorization": "Bearer test-key-0123456789"}
    status, _ = await proxy.request("GET", "ws.example.com", "/stats")
    assert status == 401
    status, stats = await proxy.request("GET", "ws.example.com", "/stats", bearer)
    assert status == 200 and isinstance(stats, dict), stats
    async with proxy.connect("ws.example.com", "/") as client:
        await client.subscribe("chat.room.1")
        publish = {"channel": "chat.room.1", "payload": NEW_MESSAGE}
        assert await proxy.request("POST", "ws.example.com", "/api/publish", bearer, publish) == (200, {"delivered": 1})
        assert await client.recv() == {**NEW_MESSAGE, "channel": "chat.room.1"}
