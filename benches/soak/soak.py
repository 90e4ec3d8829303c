#!/usr/bin/env python3
"""Bounded soak test of a real `fastws serve` process on the loopback interface.

It starts `fastws serve` (JWT auth, client publish on `soak.*`) as a subprocess and, for `--duration` seconds,
churns tens of thousands of WebSocket connections through it in waves of a few thousand concurrent clients:

* normal clients (JWT in `?token=` or `Authorization: Bearer`) subscribe to a public and a presence channel,
  receive pushes made by a pusher through `POST /api/publish`, sometimes publish themselves, answer pings, and
  leave by TCP reset (SO_LINGER 0), by a clean close frame, or by a bare FIN; once per wave a mass drop resets
  30 % of them at once;
* misbehaving clients: never reading (slow consumers, expect 4100), flooding (expect 4029 then 1008), silent
  (expect 4201), sending garbage (malformed JSON, bad channels, binary, oversized, bad UTF-8, unmasked frames, bad
  HTTP, oversized heads), and bad credentials (401) or foreign origins (403);
* once, a handshake flood: more idle TCP connections than `max_pending_handshakes`, held until
  `handshake_timeout` drops them.

Every push carries a per-channel sequence number; a connection that sees a gap while it stays open has silently
lost a frame, which fails the run. At the end, with every client gone, `/stats` and `/metrics` must show
0 connections and no channels (hence no presence members), the server's file descriptors must be back to their
baseline, and its RSS after `--settle` seconds must be within `--rss-margin-mib` of the baseline. The default
margin, 96 MiB, is sized for the default load under glibc malloc, which keeps much of the peak's heap mapped after
the connections are gone (30-70 MiB above baseline at ~3,800 peak connections). Preloading jemalloc
(`--server-env LD_PRELOAD=$(dpkg -L libjemalloc2 | grep 'libjemalloc.so.2$')` on Debian) returns that memory,
and a margin of 16 MiB then catches far smaller leaks. The last line on stdout is a JSON summary; the exit
status is 0 when every check held, 1 when one failed, 2 on a setup error.

The fastws command is `--fastws`, else `$SOAK_FASTWS` (a command line, e.g. `python -m fastws`), else
`$SOAK_VENV/bin/fastws`, else `fastws` on PATH. Use a release build: `pip install .` into its own virtualenv.
Only the standard library and PyJWT are needed on the client side.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import json
import os
import random
import resource
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import jwt  # PyJWT
except ImportError:  # pragma: no cover - a setup error, reported as such
    jwt = None  # type: ignore[assignment]

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
SECRET = "soak-" + os.urandom(24).hex()
HOST = "127.0.0.1"
INFLIGHT: asyncio.Semaphore | None = None  # bounds client handshakes in progress (set in run())


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- process probes -----------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (bytes) and Threads of a process, from /proc/PID/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
        elif key == "Threads":
            out[key] = int(value)
    return out


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def raise_nofile(limit: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# -- counters -----------------------------------------------------------------------------------------------------


@dataclass
class Counters:
    spawned: collections.Counter[str] = field(default_factory=collections.Counter)
    connect_attempts: int = 0
    connected: int = 0  # 101 + "connected" frame
    refused: collections.Counter[str] = field(default_factory=collections.Counter)  # HTTP status or failure kind
    refused_during_flood: int = 0
    live: int = 0
    peak_live: int = 0
    endings: collections.Counter[str] = field(default_factory=collections.Counter)
    close_codes: collections.Counter[str] = field(default_factory=collections.Counter)  # "kind:code"
    error_codes: collections.Counter[int] = field(default_factory=collections.Counter)
    frames_in: int = 0
    bytes_in: int = 0
    push_frames: int = 0  # soak-push frames received
    user_frames: int = 0
    fire_frames: int = 0
    client_pub_sent: int = 0
    client_pub_recv: int = 0
    member_added: int = 0
    member_removed: int = 0
    subscribed: int = 0
    pongs: int = 0
    pings_answered: int = 0
    seq_gaps: int = 0
    seq_dups: int = 0
    gap_examples: list[str] = field(default_factory=list)
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    unexpected_examples: list[str] = field(default_factory=list)
    garbage: collections.Counter[str] = field(default_factory=collections.Counter)  # "variant:ok|got ..."
    slow: collections.Counter[str] = field(default_factory=collections.Counter)
    flood_4029: int = 0
    # pusher
    pushes_ok: int = 0
    pushes_failed: collections.Counter[str] = field(default_factory=collections.Counter)
    delivered_reported: int = 0  # sum of {"delivered": N} over channel pushes
    user_pushes_ok: int = 0
    user_delivered_reported: int = 0
    fire_pushes_ok: int = 0
    # handshake flood
    hs_flood: dict[str, Any] = field(default_factory=dict)
    flood_active: bool = False

    def push_failed(self, what: str) -> None:
        self.pushes_failed[f"during-flood:{what}" if self.flood_active else what] += 1

    def note_unexpected(self, what: str, detail: str) -> None:
        self.unexpected[what] += 1
        if len(self.unexpected_examples) < 20:
            self.unexpected_examples.append(f"{what}: {detail}")


C = Counters()


# -- a minimal WebSocket client over asyncio.Protocol ------------------------------------------------------------


def mask_payload(payload: bytes, key: bytes) -> bytes:
    n = len(payload)
    if n == 0:
        return payload
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", first, (0x80 if masked else 0) | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, (0x80 if masked else 0) | 126, n)
    else:
        header = struct.pack("!BBQ", first, (0x80 if masked else 0) | 127, n)
    if not masked:
        return header + payload
    key = random.randbytes(4)
    return header + key + mask_payload(payload, key)


def text(obj: Any) -> bytes:
    return frame(0x1, json.dumps(obj, separators=(",", ":")).encode())


def subscribe_frame(channel: str) -> bytes:
    return text({"event": "subscribe", "data": {"channel": channel}})


PING_EVENT = text({"event": "ping"})


class Conn(asyncio.Protocol):
    """One client connection. Parses server frames cheaply (no JSON except for error frames)."""

    def __init__(self, kind: str, port: int) -> None:
        self.kind = kind
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = False
        self.opened: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.lost = False
        self.close_code: int | None = None  # the code of the server's close frame
        self.we_closed = False
        self.answer_pings = True
        self.sub_count = 0
        self.sub_waiter: asyncio.Future[None] | None = None
        self.sub_needed = 0
        self.last_seq: dict[bytes, int] = {}
        self.errors: list[int] = []
        self.error_waiter: asyncio.Future[int] | None = None
        self.pong_waiter: asyncio.Future[None] | None = None
        self.live_counted = False
        self.stop = asyncio.Event()
        self.ending = "abort"
        self.head_sent: bytes = b""

    # transport callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.head_sent:
            transport.write(self.head_sent)

    def data_received(self, data: bytes) -> None:  # noqa: C901 - one linear script per behaviour
        C.bytes_in += len(data)
        buf = self.buf
        buf += data
        if not self.upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > 65536:
                    self._resolve_open("bad-response")
                return
            head = bytes(buf[:end])
            del buf[: end + 4]
            try:
                status = int(head.split(b" ", 2)[1])
            except (IndexError, ValueError):
                self._resolve_open("bad-response")
                return
            if status != 101:
                self._resolve_open(str(status))
                if self.transport:
                    self.transport.close()
                return
            self.upgraded = True
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length = b1 & 0x7F
            off = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                off = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                off = pos + 10
            if n < off + length:
                break
            self.on_frame(b0 & 0x0F, bytes(buf[off : off + length]))
            pos = off + length
        if pos:
            del buf[:pos]

    def eof_received(self) -> bool | None:
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._resolve_open("eof")
        if not self.closed.done():
            self.closed.set_result(self.close_code)
        if self.sub_waiter and not self.sub_waiter.done():
            self.sub_waiter.set_exception(ConnectionError("lost"))
        if self.live_counted:
            C.live -= 1
            self.live_counted = False

    # frames

    def on_frame(self, opcode: int, payload: bytes) -> None:  # noqa: C901 - one linear script per behaviour
        C.frames_in += 1
        if opcode == 0x1:
            head = payload[:24]
            if head.startswith(b'{"event":"soak-push"'):
                C.push_frames += 1
                self._check_seq(payload)
            elif head.startswith(b'{"event":"soak-fire"'):
                C.fire_frames += 1
            elif head.startswith(b'{"event":"soak-user"'):
                C.user_frames += 1
            elif head.startswith(b'{"event":"client-soak"'):
                C.client_pub_recv += 1
            elif head.startswith(b'{"event":"member_added"'):
                C.member_added += 1
            elif head.startswith(b'{"event":"member_remov'):
                C.member_removed += 1
            elif head.startswith(b'{"event":"subscribed"'):
                C.subscribed += 1
                self.sub_count += 1
                if self.sub_waiter and not self.sub_waiter.done() and self.sub_count >= self.sub_needed:
                    self.sub_waiter.set_result(None)
            elif head.startswith(b'{"event":"unsubscribed"'):
                # No publication on a channel arrives after its `unsubscribed`: restart its sequence tracking.
                if b"presence-" in payload:
                    self.last_seq.pop(b"R", None)
                else:
                    self.last_seq.pop(b"P", None)
            elif head.startswith(b'{"event":"pong"'):
                C.pongs += 1
                if self.pong_waiter and not self.pong_waiter.done():
                    self.pong_waiter.set_result(None)
            elif head.startswith(b'{"event":"connected"'):
                if self.upgraded and not self.opened.done():
                    C.connected += 1
                    C.live += 1
                    C.peak_live = max(C.peak_live, C.live)
                    self.live_counted = True
                    self.opened.set_result("open")
            elif head.startswith(b'{"event":"error"'):
                code = json.loads(payload)["data"]["code"]
                C.error_codes[code] += 1
                self.errors.append(code)
                if code == 4029:
                    C.flood_4029 += 1
                if self.error_waiter and not self.error_waiter.done():
                    self.error_waiter.set_result(code)
            else:
                C.note_unexpected("unknown-frame", payload[:80].decode(errors="replace"))
        elif opcode == 0x8:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.close_code = code
            C.close_codes[f"{self.kind}:{code}"] += 1
            if not self.we_closed and self.transport and not self.transport.is_closing():
                self.we_closed = True
                self.transport.write(frame(0x8, payload[:2]))  # echo, then the server closes TCP
            if not self.closed.done():
                self.closed.set_result(code)
        elif opcode == 0x9:
            if self.answer_pings and self.transport and not self.transport.is_closing():
                C.pings_answered += 1
                self.transport.write(frame(0xA, payload))
        elif opcode == 0xA:
            pass
        else:
            C.note_unexpected("server-opcode", str(opcode))

    def _check_seq(self, payload: bytes) -> None:
        # {"event":"soak-push","data":{"s":123,"t":"P"},"channel":"..."}
        i = payload.find(b'"s":')
        j = payload.find(b",", i)
        seq = int(payload[i + 4 : j])
        tag = payload[j + 6 : j + 7]
        last = self.last_seq.get(tag)
        if last is not None:
            if seq == last + 1:
                pass
            elif seq <= last:
                C.seq_dups += 1
            else:
                C.seq_gaps += 1
                if len(C.gap_examples) < 10:
                    C.gap_examples.append(f"{self.kind} tag {tag.decode()} expected {last + 1} got {seq}")
        self.last_seq[tag] = seq

    def _resolve_open(self, result: str) -> None:
        if not self.opened.done():
            self.opened.set_result(result)

    # actions

    def send(self, data: bytes) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.write(data)

    async def wait_subscribed(self, count: int, timeout: float) -> bool:
        if self.sub_count >= count:
            return True
        self.sub_needed = count
        self.sub_waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self.sub_waiter, timeout)
            return True
        except (asyncio.TimeoutError, ConnectionError):
            return False

    async def next_error(self, timeout: float) -> int | None:
        self.error_waiter = asyncio.get_running_loop().create_future()
        try:
            return await asyncio.wait_for(self.error_waiter, timeout)
        except asyncio.TimeoutError:
            return None

    async def ping_roundtrip(self, timeout: float) -> bool:
        self.pong_waiter = asyncio.get_running_loop().create_future()
        self.send(PING_EVENT)
        try:
            await asyncio.wait_for(self.pong_waiter, timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def wait_closed(self, timeout: float) -> int | None | str:
        try:
            return await asyncio.wait_for(asyncio.shield(self.closed), timeout)
        except asyncio.TimeoutError:
            return "timeout"

    def abort(self) -> None:
        """TCP reset: SO_LINGER 0, then close."""
        if self.transport and not self.lost:
            sock = self.transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.transport.abort()

    def fin(self) -> None:
        """Close the TCP connection without a closing handshake."""
        if self.transport and not self.lost:
            self.transport.close()

    async def close_clean(self, code: int = 1000) -> int | None | str:
        if self.lost:
            return "lost"
        if not self.we_closed:
            self.we_closed = True
            self.send(frame(0x8, struct.pack("!H", code)))
        got = await self.wait_closed(5)
        if not self.lost:
            # The server closes TCP after the closing handshake; give it a moment, then close our side.
            await asyncio.sleep(0)
            self.fin()
        return got


async def open_conn(
    kind: str,
    port: int,
    path: str = "/",
    headers: dict[str, str] | None = None,
    *,
    rcvbuf: int | None = None,
    raw_head: bytes | None = None,
    timeout: float = 10,
) -> tuple[Conn | None, str]:
    """Open a TCP connection from a random 127.0.x.y address and send the upgrade (or `raw_head`)."""
    assert INFLIGHT is not None
    async with INFLIGHT:
        return await _open_conn(kind, port, path, headers, rcvbuf=rcvbuf, raw_head=raw_head, timeout=timeout)


async def _open_conn(
    kind: str,
    port: int,
    path: str,
    headers: dict[str, str] | None,
    *,
    rcvbuf: int | None,
    raw_head: bytes | None,
    timeout: float,
) -> tuple[Conn | None, str]:
    loop = asyncio.get_running_loop()
    C.connect_attempts += 1
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((f"127.0.{random.randint(0, 3)}.{random.randint(2, 254)}", 0))
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), timeout)
    except (OSError, asyncio.TimeoutError) as error:
        sock.close()
        return None, f"connect-{type(error).__name__}"
    conn = Conn(kind, port)
    if raw_head is None:
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {HOST}:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {base64.b64encode(random.randbytes(16)).decode()}",
            "Sec-WebSocket-Version: 13",
        ]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        raw_head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    conn.head_sent = raw_head
    try:
        await loop.create_connection(lambda: conn, sock=sock)
    except OSError as error:
        sock.close()
        return None, f"connect-{type(error).__name__}"
    try:
        result = await asyncio.wait_for(asyncio.shield(conn.opened), timeout)
    except asyncio.TimeoutError:
        result = "timeout"
    if result != "open":
        if C.flood_active:
            C.refused_during_flood += 1
        conn.abort()
        return conn, result
    return conn, "open"


# -- client behaviours --------------------------------------------------------------------------------------------


@dataclass
class Plan:
    port: int
    public_channels: int
    presence_channels: int
    tokens: list[str]
    bad_tokens: dict[str, str]
    lifetime_mean: float
    idle_timeout: float
    max_pending: int
    handshake_timeout: float
    publishers: float

    def user(self) -> int:
        return random.randrange(len(self.tokens))

    def presence_of(self, user: int) -> str:
        return f"presence-soak.{user % self.presence_channels}"


async def record_refusal(kind: str, result: str) -> None:
    """Count a refused handshake; the client then backs off for a moment, as a real one would."""
    C.refused[f"{kind}:{result}"] += 1
    await asyncio.sleep(random.uniform(0.5, 2.0))


async def normal_client(plan: Plan, conns: set[Conn]) -> None:  # noqa: C901 - one linear script per behaviour
    user = plan.user()
    tok = plan.tokens[user]
    if random.random() < 0.5:
        path, headers = f"/?token={tok}", {}
    else:
        path, headers = random.choice(["/", "/ws"]), {"Authorization": f"Bearer {tok}"}
    if random.random() < 0.3:
        headers["Origin"] = f"http://{HOST}:{plan.port}"  # a same-origin browser page
    conn, result = await open_conn("normal", plan.port, path, headers)
    if result != "open" or conn is None:
        await record_refusal("normal", result)
        return
    conns.add(conn)
    try:
        public = f"soak.pub.{random.randrange(plan.public_channels)}"
        presence = plan.presence_of(user)
        wanted = [public, presence]
        if random.random() < 0.005:
            wanted.append("soak.firehose")  # a prompt reader of the big frames: must never be cut
        conn.send(b"".join(subscribe_frame(ch) for ch in wanted))
        if not await conn.wait_subscribed(len(wanted), 15):
            if not conn.lost:
                C.note_unexpected("normal-subscribe-timeout", public)
            return
        lifetime = random.uniform(2, max(2.5, 2 * plan.lifetime_mean - 2))
        deadline = time.monotonic() + lifetime
        publisher = random.random() < plan.publishers
        churner = random.random() < 0.05
        while not conn.lost and not conn.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(conn.stop.wait(), min(left, random.uniform(1.5, 3)))
            except asyncio.TimeoutError:
                pass
            if conn.lost or conn.stop.is_set():
                break
            if publisher:
                C.client_pub_sent += 1
                conn.send(text({"event": "publish", "data": {"channel": public, "payload": {"event": "client-soak"}}}))
            if churner:
                churner = False
                conn.send(text({"event": "unsubscribe", "data": {"channel": presence}}) + subscribe_frame(presence))
        if conn.lost:
            if not conn.stop.is_set():
                C.note_unexpected(f"normal-closed-by-server:{conn.close_code}", public)
            C.endings["normal:lost"] += 1
            return
        ending = conn.ending if conn.stop.is_set() else random.choices(["abort", "clean", "fin"], [4, 4, 2])[0]
        C.endings[f"normal:{ending}"] += 1
        if ending == "abort":
            conn.abort()
        elif ending == "fin":
            conn.fin()
        else:
            got = await conn.close_clean()
            if got != 1000:
                C.note_unexpected("clean-close-reply", str(got))
    finally:
        conns.discard(conn)
        conn.abort()


async def slow_client(plan: Plan, conns: set[Conn]) -> None:
    """Subscribes to the firehose and stops reading: the server must cut it (4100) and nobody else.

    Half of them keep sending pings while they don't read ("pinging"); the others send nothing and resume
    reading before idle_timeout ("quiet"), to see whether the 4100 close frame can reach them at all.
    """
    pinging = random.random() < 0.5
    variant = "pinging" if pinging else "quiet"
    conn, result = await open_conn("slow", plan.port, f"/?token={plan.tokens[plan.user()]}", rcvbuf=4096)
    if result != "open" or conn is None:
        await record_refusal("slow", result)
        return
    conns.add(conn)
    try:
        conn.send(subscribe_frame("soak.firehose"))
        if not await conn.wait_subscribed(1, 15):
            return
        assert conn.transport is not None
        conn.transport.pause_reading()
        until = time.monotonic() + (30 if pinging else plan.idle_timeout * 0.6)
        while time.monotonic() < until and not conn.lost and not conn.stop.is_set():
            if pinging:
                conn.send(frame(0x9, b"alive"))  # client activity, so idle_timeout is not what ends it
            await asyncio.sleep(min(4, max(0.0, until - time.monotonic())))
        if conn.lost:
            C.slow[f"{variant}:reset-while-paused"] += 1  # the server closed; our next write met a reset
        elif conn.stop.is_set():
            C.slow[f"{variant}:still-open-at-end"] += 1
            return
        else:
            conn.transport.resume_reading()
            got = await conn.wait_closed(5)
            if got == 4100:
                C.slow[f"{variant}:saw-4100"] += 1
            elif got is None:
                C.slow[f"{variant}:eof-without-close-frame"] += 1
            elif got == "timeout":
                C.slow[f"{variant}:not-cut-yet"] += 1
            else:
                C.slow[f"{variant}:closed-{got}"] += 1
    finally:
        conns.discard(conn)
        conn.abort()


async def flood_client(plan: Plan, conns: set[Conn]) -> None:
    """Sends far over the rate limit while reading: expects error 4029, then close 1008."""
    conn, result = await open_conn("flood", plan.port, f"/?token={plan.tokens[plan.user()]}")
    if result != "open" or conn is None:
        await record_refusal("flood", result)
        return
    conns.add(conn)
    try:
        conn.send(subscribe_frame(f"soak.pub.{random.randrange(plan.public_channels)}"))
        await conn.wait_subscribed(1, 15)
        conn.send(PING_EVENT * 300)
        until = time.monotonic() + 5
        last = time.monotonic()
        while not conn.lost and conn.close_code is None and time.monotonic() < until:
            await asyncio.sleep(0.02)
            now = time.monotonic()
            conn.send(PING_EVENT * max(30, int(1500 * (now - last))))  # ~1500/s even when this loop lags
            last = now
        got = await conn.wait_closed(3)
        if 4029 not in conn.errors:
            C.note_unexpected("flood-no-4029", str(conn.errors[:5]))
        if got != 1008:
            C.note_unexpected("flood-not-1008", str(got))
    finally:
        conns.discard(conn)
        conn.abort()


async def silent_client(plan: Plan, conns: set[Conn]) -> None:
    """Never sends anything and ignores pings: expects 4201 after idle_timeout."""
    conn, result = await open_conn("silent", plan.port, f"/?token={plan.tokens[plan.user()]}")
    if result != "open" or conn is None:
        await record_refusal("silent", result)
        return
    conns.add(conn)
    try:
        conn.answer_pings = False
        conn.send(subscribe_frame(f"soak.pub.{random.randrange(plan.public_channels)}"))
        await conn.wait_subscribed(1, 15)
        started = time.monotonic()
        got = await conn.wait_closed(plan.idle_timeout + 10)
        if conn.stop.is_set() and got == "timeout":
            return
        if got != 4201:
            C.note_unexpected("silent-not-4201", f"{got} after {time.monotonic() - started:.1f}s")
    finally:
        conns.discard(conn)
        conn.abort()


async def badauth_client(plan: Plan, conns: set[Conn]) -> None:
    variant = random.choice(sorted(plan.bad_tokens) + ["no-token", "cross-origin"])
    headers: dict[str, str] = {}
    path = "/"
    expected = "401"
    if variant == "cross-origin":
        headers["Origin"] = "https://evil.example"
        path = f"/?token={plan.tokens[plan.user()]}"
        expected = "403"
    elif variant != "no-token":
        path = f"/?token={plan.bad_tokens[variant]}"
    conn, result = await open_conn("badauth", plan.port, path, headers)
    if conn is not None:
        conn.abort()
    garbage_outcome(f"badauth-{variant}", "ok" if result == expected else result)
    if result != expected and not C.flood_active:
        C.note_unexpected(f"badauth-{variant}", f"expected {expected}, got {result}")


GARBAGE_VARIANTS = [
    "bad-json",
    "unknown-event",
    "bad-channel",
    "binary",
    "private-of-another-user",
    "publish-presence-unsubscribed",
    "too-many-channels",
    "fragmented-ok",
    "oversized",
    "bad-utf8",
    "unmasked",
    "long-ping",
    "random-after-upgrade",
    "http-garbage",
    "big-head",
    "partial-head-then-reset",
    "half-frame-then-reset",
]


def garbage_outcome(variant: str, outcome: str) -> None:
    """Count a garbage client's outcome; during the handshake flood a refusal at accept is expected instead."""
    if C.flood_active and outcome != "ok":
        outcome = f"during-flood:{outcome}"
    C.garbage[f"{variant}:{outcome}"] += 1


async def garbage_client(plan: Plan, conns: set[Conn]) -> None:  # noqa: C901 - one linear script per behaviour
    variant = random.choice(GARBAGE_VARIANTS)
    user = plan.user()
    tok = plan.tokens[user]
    raw_head: bytes | None = None
    if variant == "http-garbage":
        raw_head = random.randbytes(random.randint(1, 600)) + b"\r\n\r\n"
    elif variant == "big-head":
        raw_head = (f"GET /?token={tok} HTTP/1.1\r\nHost: x\r\nX-Pad: {'a' * 10000}\r\n\r\n").encode()
    elif variant == "partial-head-then-reset":
        raw_head = b"GET / HTTP/1.1\r\nHost: x\r\nUpgr"
    conn, result = await open_conn(
        "garbage", plan.port, f"/?token={tok}", raw_head=raw_head, timeout=2 if raw_head else 10
    )
    try:
        if variant == "http-garbage":
            # Random bytes may still parse as a request head: any HTTP answer or a close is fine.
            ok = result in {"400", "404", "426", "431", "eof", "bad-response"} or result.isdigit()
            garbage_outcome(variant, "ok" if ok else result)
            return
        if variant == "big-head":
            garbage_outcome(variant, "ok" if result == "431" else result)
            return
        if variant == "partial-head-then-reset":
            garbage_outcome(variant, "ok" if result == "timeout" else result)
            return
        if result != "open" or conn is None:
            await record_refusal("garbage", result)
            return
        conns.add(conn)
        got: Any
        if variant in (
            "bad-json",
            "unknown-event",
            "bad-channel",
            "binary",
            "private-of-another-user",
            "publish-presence-unsubscribed",
        ):
            expected = {
                "bad-json": 4000,
                "unknown-event": 4004,
                "bad-channel": 4002,
                "binary": 4000,
                "private-of-another-user": 4003,
                "publish-presence-unsubscribed": 4003,
            }[variant]
            payload = {
                "bad-json": frame(0x1, b'{"event": "subscribe", "data": '),
                "unknown-event": text({"event": "dance"}),
                "bad-channel": subscribe_frame("bad channel!"),
                "binary": frame(0x2, b"\x00\x01binary"),
                "private-of-another-user": subscribe_frame(f"private-user.{user + 1}"),
                "publish-presence-unsubscribed": text(
                    {"event": "publish", "data": {"channel": "presence-soak.x", "payload": {}}}
                ),
            }[variant]
            conn.send(payload)
            got = await conn.next_error(10)
            alive = await conn.ping_roundtrip(10)  # the connection stays usable after an error frame
            ok = got == expected and alive
            garbage_outcome(variant, "ok" if ok else f"got {got} alive={alive}")
            await conn.close_clean()
        elif variant == "too-many-channels":
            conn.send(b"".join(subscribe_frame(f"soak.g.{user}.{i}") for i in range(101)))
            got = await conn.next_error(10)
            ok = got == 4005 and await conn.wait_subscribed(100, 10)
            garbage_outcome(variant, "ok" if ok else f"got {got}")
            await asyncio.sleep(random.uniform(0, 3))
            random.choice([conn.abort, conn.fin])()
        elif variant == "fragmented-ok":
            body = b'{"event":"ping"}'
            conn.pong_waiter = asyncio.get_running_loop().create_future()
            conn.send(frame(0x1, body[:7], fin=False) + frame(0x0, body[7:]))
            try:
                await asyncio.wait_for(conn.pong_waiter, 10)
                garbage_outcome(variant, "ok")
            except asyncio.TimeoutError:
                garbage_outcome(variant, "no pong")
            await conn.close_clean()
        elif variant in ("oversized", "bad-utf8", "unmasked", "long-ping", "random-after-upgrade"):
            payload, expected_codes = {
                "oversized": (frame(0x1, b'"' + b"x" * 70_000 + b'"'), {1009}),
                "bad-utf8": (frame(0x1, b'{"event":"\xff\xfe"}'), {1007}),
                "unmasked": (frame(0x1, b'{"event":"ping"}', masked=False), {1002}),
                "long-ping": (frame(0x9, b"x" * 126), {1002}),
                "random-after-upgrade": (bytes([0x83]) + random.randbytes(64), {1002}),  # reserved opcode 3
            }[variant]
            conn.send(payload)
            got = await conn.wait_closed(10)
            ok = got in expected_codes
            garbage_outcome(variant, "ok" if ok else f"got {got}")
        elif variant == "half-frame-then-reset":
            conn.send(b"\x81\xfe")  # a masked text frame header cut short
            await asyncio.sleep(random.uniform(0, 1))
            garbage_outcome(variant, "ok")
    finally:
        if conn is not None:
            conns.discard(conn)
            conn.abort()


BEHAVIOURS = {
    "normal": normal_client,
    "slow": slow_client,
    "flood": flood_client,
    "silent": silent_client,
    "garbage": garbage_client,
    "badauth": badauth_client,
}


# -- HTTP to the operational endpoints ---------------------------------------------------------------------------


async def http(port: int, method: str, path: str, body: Any = None, timeout: float = 10) -> tuple[int, bytes]:
    data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), timeout)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: {len(data)}\r\n"
        if body is not None:
            head += "Content-Type: application/json\r\n"
        writer.write(head.encode() + b"\r\n" + data)
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    if not raw:
        raise ConnectionError("no answer")
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), payload


async def get_json(port: int, path: str) -> Any:
    status, payload = await http(port, "GET", path)
    if status != 200:
        raise RuntimeError(f"GET {path}: HTTP {status}")
    return json.loads(payload)


async def get_metrics(port: int) -> dict[str, float]:
    status, payload = await http(port, "GET", "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics: HTTP {status}")
    out: dict[str, float] = {}
    for line in payload.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def publish_loop(port: int, channel: str, tag: str, rate: float, stop: asyncio.Event) -> None:
    """Pushes to one channel at `rate`/s, sequentially: seq only advances once a push was accepted."""
    seq = 0
    await asyncio.sleep(random.uniform(0, 1 / rate))
    next_at = time.monotonic()
    while not stop.is_set():
        body = {"channel": channel, "payload": {"event": "soak-push", "data": {"s": seq, "t": tag}}}
        try:
            status, payload = await http(port, "POST", "/api/publish", body, timeout=5)
            if status == 200:
                seq += 1
                C.pushes_ok += 1
                C.delivered_reported += json.loads(payload)["delivered"]
            else:
                C.push_failed(str(status))
        except (OSError, asyncio.TimeoutError, ConnectionError, IndexError, ValueError) as error:
            C.push_failed(type(error).__name__)
        next_at = max(next_at + 1 / rate, time.monotonic() - 1)
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))


async def user_push_loop(port: int, users: int, rate: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        body = {"user": f"u{random.randrange(users)}", "payload": {"event": "soak-user", "data": {"n": 1}}}
        try:
            status, payload = await http(port, "POST", "/api/publish", body, timeout=5)
            if status == 200:
                C.user_pushes_ok += 1
                C.user_delivered_reported += json.loads(payload)["delivered"]
            else:
                C.push_failed(f"user-{status}")
        except (OSError, asyncio.TimeoutError, ConnectionError, IndexError, ValueError) as error:
            C.push_failed(f"user-{type(error).__name__}")
        await asyncio.sleep(1 / rate)


async def firehose_loop(port: int, rate: float, size: int, stop: asyncio.Event) -> None:
    """Big pushes on soak.firehose at a fixed rate (requests overlap), for the slow consumers to choke on."""
    pad = "x" * size

    async def one() -> None:
        body = {"channel": "soak.firehose", "payload": {"event": "soak-fire", "data": pad}}
        try:
            status, _ = await http(port, "POST", "/api/publish", body, timeout=5)
            if status == 200:
                C.fire_pushes_ok += 1
            else:
                C.push_failed(f"fire-{status}")
        except (OSError, asyncio.TimeoutError, ConnectionError, IndexError, ValueError) as error:
            C.push_failed(f"fire-{type(error).__name__}")

    running: set[asyncio.Task[None]] = set()
    next_at = time.monotonic()
    while not stop.is_set():
        if len(running) < 8:
            task = asyncio.create_task(one())
            running.add(task)
            task.add_done_callback(running.discard)
        next_at = max(next_at + 1 / rate, time.monotonic() - 1)
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*running, return_exceptions=True)


# -- handshake flood ----------------------------------------------------------------------------------------------


async def handshake_flood(port: int, count: int, hold: float, timeout: float) -> None:
    """Open `count` TCP connections at once that send half a request head and nothing more, and time how long the
    server keeps each: shed at accept (closed at once) or dropped after `timeout` (handshake_timeout)."""
    loop = asyncio.get_running_loop()
    C.flood_active = True
    started = time.monotonic()
    opened_at: list[float] = []

    async def one() -> float | str:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((f"127.0.9.{random.randint(2, 254)}", 0))
            await loop.sock_connect(sock, (HOST, port))
            t0 = time.monotonic()
            opened_at.append(t0)
            try:
                await loop.sock_sendall(sock, b"GET / HTTP/1.1\r\nHost: soak\r\n")
                while await asyncio.wait_for(loop.sock_recv(sock, 4096), hold):
                    pass
            except (ConnectionResetError, BrokenPipeError):
                pass
            except asyncio.TimeoutError:
                return "still-open"
            return time.monotonic() - t0
        except OSError:
            return "connect-failed"
        finally:
            sock.close()

    results = await asyncio.gather(*(one() for _ in range(count)))
    C.flood_active = False
    closed = sorted(r for r in results if isinstance(r, float))
    C.hs_flood = {
        "sockets": count,
        "opened": len(opened_at),
        "opened_in_s": round(max(opened_at) - started, 2) if opened_at else None,
        "dropped_at_once": sum(1 for r in closed if r < 1.0),
        "dropped_near_handshake_timeout": sum(1 for r in closed if timeout - 1 <= r <= timeout + 2),
        "dropped_other": sum(1 for r in closed if 1.0 <= r < timeout - 1 or r > timeout + 2),
        "median_drop_s": round(closed[len(closed) // 2], 2) if closed else None,
        "still_open_after_hold": sum(1 for r in results if r == "still-open"),
        "connect_failed": sum(1 for r in results if r == "connect-failed"),
    }


# -- the run ------------------------------------------------------------------------------------------------------


def fastws_command(arg: str | None) -> list[str]:
    if arg:
        return shlex.split(arg)
    if os.environ.get("SOAK_FASTWS"):
        return shlex.split(os.environ["SOAK_FASTWS"])
    if os.environ.get("SOAK_VENV"):
        return [str(Path(os.environ["SOAK_VENV"]) / "bin" / "fastws")]
    found = shutil.which("fastws")
    if not found:
        raise SystemExit("soak: no fastws command: pass --fastws, set SOAK_FASTWS or SOAK_VENV, or put fastws on PATH")
    return [found]


def make_tokens(users: int, ttl: float) -> tuple[list[str], dict[str, str]]:
    if jwt is None:
        raise SystemExit("soak: PyJWT is required (pip install PyJWT)")
    exp = int(time.time() + ttl)
    tokens = [
        jwt.encode({"sub": f"u{i}", "name": f"User {i}", "exp": exp}, SECRET, algorithm="HS256") for i in range(users)
    ]
    header = jwt.utils.base64url_encode(b'{"alg":"none","typ":"JWT"}').decode()
    claims = jwt.utils.base64url_encode(b'{"sub":"u1"}').decode()
    bad = {
        "garbage": "not-a-jwt",
        "expired": jwt.encode({"sub": "u1", "exp": int(time.time()) - 60}, SECRET, algorithm="HS256"),
        "wrong-secret": jwt.encode({"sub": "u1"}, "another-secret-" + "y" * 40, algorithm="HS256"),
        "hs512": jwt.encode({"sub": "u1"}, SECRET, algorithm="HS512"),
        "alg-none": f"{header}.{claims}.",
        "no-sub": jwt.encode({"name": "x"}, SECRET, algorithm="HS256"),
    }
    return tokens, bad


def mib(n: float) -> float:
    return round(n / (1 << 20), 1)


async def run(args: argparse.Namespace) -> int:  # noqa: C901 - one linear script per behaviour
    nofile = raise_nofile(20_000)
    warnings.filterwarnings("ignore", module="jwt")  # the deliberately bad HS512 token's short-key warning
    random.seed(args.seed)
    cmd = fastws_command(args.fastws)
    port = free_port()
    users = args.users or max(100, args.concurrency // 3)
    tokens, bad_tokens = make_tokens(users, args.duration + 3600)
    max_connections = args.max_connections or max(10, args.concurrency * 95 // 100)
    server_args = [
        "serve",
        "--host",
        HOST,
        "--port",
        str(port),
        "--client-publish",
        "soak.*",
        "--workers",
        str(args.server_workers),
        "--max-connections",
        str(max_connections),
        "--heartbeat-interval",
        str(args.heartbeat),
        "--idle-timeout",
        str(args.idle_timeout),
        "--handshake-timeout",
        str(args.handshake_timeout),
        "--max-pending-handshakes",
        str(args.max_pending),
        *args.server_arg,
    ]
    # The JWT secret goes in the environment (the same setting as --jwt-secret, but not visible in `ps`).
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    env["FASTWS_JWT_SECRET"] = SECRET
    for item in args.server_env:
        key, _, value = item.partition("=")
        env[key] = value
    workdir = tempfile.mkdtemp(prefix="fastws-soak-")
    log_path = Path(workdir) / "server.log"
    log_file = open(log_path, "w")
    log(f"starting {shlex.join(cmd + server_args)} (FASTWS_JWT_SECRET set in its environment); nofile={nofile}")
    cpus = os.cpu_count() or 1
    pinned = cpus >= 2 and args.server_cpus != "none"
    server_cpus = {int(c) for c in args.server_cpus.split(",")} if pinned else set(range(cpus))
    # Pinned before exec, so every thread of the server inherits it: the server gets that core's worth of CPU.
    server = subprocess.Popen(
        cmd + server_args,
        cwd=workdir,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        preexec_fn=(lambda: os.sched_setaffinity(0, server_cpus)) if pinned else None,
    )
    if pinned:
        os.sched_setaffinity(0, set(range(cpus)) - server_cpus or set(range(cpus)))
    summary: dict[str, Any] = {"ok": False}
    failures: list[str] = []
    stop_push = asyncio.Event()
    tasks: set[asyncio.Task[Any]] = set()
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                raise SystemExit(
                    f"soak: the server exited with {server.returncode}; see its log:\n{log_path.read_text()}"
                )
            try:
                status, _ = await http(port, "GET", "/healthz", timeout=2)
                if status == 200:
                    break
            except (OSError, asyncio.TimeoutError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise SystemExit("soak: the server did not answer /healthz within 30 s")
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        base = proc_status(server.pid)
        base_fds = fd_count(server.pid)
        base_cpu = cpu_seconds(server.pid)
        client_cpu0 = time.process_time()
        log(
            f"server pid {server.pid} on port {port}: RSS {mib(base['VmRSS'])} MiB, {base_fds} fds, "
            f"{base['Threads']} threads"
        )

        plan = Plan(
            port,
            args.public_channels,
            args.presence_channels,
            tokens,
            bad_tokens,
            args.lifetime,
            args.idle_timeout,
            args.max_pending,
            args.handshake_timeout,
            args.publishers,
        )
        for i in range(args.public_channels):
            tasks.add(asyncio.create_task(publish_loop(port, f"soak.pub.{i}", "P", args.push_rate, stop_push)))
        for i in range(args.presence_channels):
            tasks.add(asyncio.create_task(publish_loop(port, f"presence-soak.{i}", "R", args.push_rate, stop_push)))
        tasks.add(asyncio.create_task(user_push_loop(port, users, args.user_push_rate, stop_push)))
        tasks.add(asyncio.create_task(firehose_loop(port, args.firehose_rate, args.firehose_size, stop_push)))

        conns: set[Conn] = set()
        clients: set[asyncio.Task[Any]] = set()
        kinds = list(args.mix)
        weights = [args.mix[k] for k in kinds]
        global INFLIGHT
        INFLIGHT = asyncio.Semaphore(args.inflight)

        async def spawn(kind: str) -> None:
            await BEHAVIOURS[kind](plan, conns)

        def alive() -> int:
            return len(clients)

        series: list[dict[str, Any]] = []
        peak_rss = base["VmRSS"]
        peak_server_conns = 0
        peak_fds = base_fds
        max_lag = 0.0
        started = time.monotonic()
        end_at = started + args.duration
        next_report = started + 10
        next_sample = started
        next_series = started
        flood_at = started + args.duration * 0.4 if args.handshake_flood else None
        flood_task: asyncio.Task[None] | None = None
        drops_done: set[int] = set()
        waves: dict[int, dict[str, Any]] = {}
        last_tick = time.monotonic()
        while time.monotonic() < end_at:
            now = time.monotonic()
            lag = now - last_tick - 0.05
            max_lag = max(max_lag, lag)
            t = now - started
            phase = (t % args.wave) / args.wave
            target = int(args.concurrency * (args.min_fraction + (1 - args.min_fraction) * (1 - abs(2 * phase - 1))))
            wave_no = int(t // args.wave)
            if wave_no not in waves:
                waves[wave_no] = {
                    "wave": wave_no,
                    "rss_start_mib": mib(proc_status(server.pid)["VmRSS"]),
                    "rss_max_mib": 0.0,
                    "open_max": 0,
                }
            waves[wave_no]["open_max"] = max(waves[wave_no]["open_max"], C.live)
            if phase >= 0.5 and wave_no not in drops_done:
                drops_done.add(wave_no)
                victims = [c for c in conns if c.kind == "normal" and not c.lost]
                victims = random.sample(victims, int(len(victims) * args.mass_drop))
                for c in victims:
                    c.ending = "abort"
                    c.stop.set()
                C.endings["mass-drop-signalled"] += len(victims)
                log(f"wave {wave_no}: mass drop of {len(victims)} clients by TCP reset")
            missing = min(target - alive(), args.spawn_per_tick)
            for _ in range(max(0, missing)):
                kind = random.choices(kinds, weights)[0]
                C.spawned[kind] += 1
                task = asyncio.create_task(spawn(kind))
                clients.add(task)
                task.add_done_callback(clients.discard)
            if flood_at is not None and now >= flood_at and flood_task is None:
                log(f"handshake flood: {args.max_pending + 100} idle TCP connections (cap {args.max_pending})")
                flood_task = asyncio.create_task(
                    handshake_flood(port, args.max_pending + 100, args.handshake_timeout + 5, args.handshake_timeout)
                )
            if now >= next_sample:
                next_sample = now + 1
                st = proc_status(server.pid)
                fds = fd_count(server.pid)
                peak_rss = max(peak_rss, st["VmRSS"])
                waves[wave_no]["rss_max_mib"] = max(waves[wave_no]["rss_max_mib"], mib(st["VmRSS"]))
                peak_fds = max(peak_fds, fds)
                if now >= next_series:
                    next_series = now + 5
                    try:
                        stats = await get_json(port, "/stats")
                        peak_server_conns = max(peak_server_conns, stats["connections"])
                        series.append(
                            {
                                "t": int(t),
                                "clients": C.live,
                                "server_conns": stats["connections"],
                                "channels": len(stats["channels"]),
                                "rss_mib": mib(st["VmRSS"]),
                                "fds": fds,
                            }
                        )
                    except (OSError, asyncio.TimeoutError, ConnectionError, RuntimeError):
                        pass  # e.g. shed during the handshake flood
            if now >= next_report:
                next_report = now + 10
                log(
                    f"t={int(t)}s target={target} tasks={alive()} open={C.live} connected={C.connected} "
                    f"refused={sum(C.refused.values())} pushes={C.pushes_ok} push_frames={C.push_frames} "
                    f"rss={mib(proc_status(server.pid)['VmRSS'])}MiB fds={fd_count(server.pid)} "
                    f"lag_max={max_lag * 1000:.0f}ms"
                )
            if server.poll() is not None:
                failures.append(f"the server exited during the run with status {server.returncode}")
                break
            last_tick = time.monotonic()
            await asyncio.sleep(0.05)

        # -- wind down: every client leaves, then the pusher stops -----------------------------------------------
        log(f"duration reached: ending {alive()} clients")
        for c in list(conns):
            c.ending = random.choice(["abort", "clean", "fin"])
            c.stop.set()
        if flood_task is not None:
            await flood_task
        if clients:
            done, pending = await asyncio.wait(set(clients), timeout=40)
            for task in pending:
                task.cancel()
            for c in list(conns):
                c.abort()
        stop_push.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        run_time = time.monotonic() - started
        server_cpu = cpu_seconds(server.pid) - base_cpu
        client_cpu = time.process_time() - client_cpu0

        # -- counters back to zero? ---------------------------------------------------------------------------------
        zero_started = time.monotonic()
        stats = {}
        while time.monotonic() - zero_started < 60:
            stats = await get_json(port, "/stats")
            if stats["connections"] == 0 and stats["channels"] == []:
                break
            await asyncio.sleep(0.5)
        time_to_zero = time.monotonic() - zero_started
        reached = stats["connections"] == 0 and stats["channels"] == []
        log(
            f"all clients gone; server counters {'at zero' if reached else 'NOT at zero'} after "
            f"{time_to_zero:.1f}s; settling {args.settle}s"
        )
        await asyncio.sleep(args.settle)
        stats = await get_json(port, "/stats")
        metrics = await get_metrics(port)
        end = proc_status(server.pid)
        end_fds = fd_count(server.pid)
        members = sum(ch.get("members", 0) for ch in stats["channels"])

        if stats["connections"] != 0:
            failures.append(f"/stats connections = {stats['connections']} at the end")
        if stats["channels"]:
            failures.append(f"/stats channels not empty at the end: {stats['channels'][:5]}")
        if members:
            failures.append(f"{members} presence members left at the end")
        if metrics.get("fastws_connections") != 0 or metrics.get("fastws_channels") != 0:
            failures.append(
                f"/metrics gauges not zero: connections={metrics.get('fastws_connections')} "
                f"channels={metrics.get('fastws_channels')}"
            )
        if end_fds > base_fds + args.fd_slack:
            failures.append(f"server fds {end_fds} at the end vs {base_fds} at baseline")
        margin = args.rss_margin_mib << 20
        if end["VmRSS"] > base["VmRSS"] + margin:
            failures.append(
                f"RSS end {mib(end['VmRSS'])} MiB > baseline {mib(base['VmRSS'])} MiB + {args.rss_margin_mib} MiB"
            )
        if C.seq_gaps:
            failures.append(f"{C.seq_gaps} sequence gaps: pushes silently lost on open connections")
        if C.connected < args.concurrency:
            failures.append(f"only {C.connected} connections succeeded")
        if server.poll() is not None:
            failures.append(f"the server is not running at the end (status {server.returncode})")

        summary = {
            "ok": False,
            "duration_s": round(run_time, 1),
            "server": {
                "command": shlex.join(cmd + server_args),
                "workers": args.server_workers,
                "pinned_cpus": args.server_cpus if pinned else None,
                "max_connections": max_connections,
            },
            "connections": {
                "attempted": C.connect_attempts,
                "opened": C.connected,
                "peak_concurrent_client": C.peak_live,
                "peak_concurrent_server_sampled": peak_server_conns,
                "spawned_by_kind": dict(C.spawned),
                "refused": dict(C.refused),
                "refused_during_handshake_flood": C.refused_during_flood,
                "endings": dict(C.endings),
            },
            "pushes": {
                "channel_pushes_ok": C.pushes_ok,
                "deliveries_reported_by_server": C.delivered_reported,
                "push_frames_received": C.push_frames,
                "user_pushes_ok": C.user_pushes_ok,
                "user_deliveries_reported": C.user_delivered_reported,
                "user_frames_received": C.user_frames,
                "firehose_pushes_ok": C.fire_pushes_ok,
                "firehose_frames_received": C.fire_frames,
                "client_publishes_sent": C.client_pub_sent,
                "client_publications_received": C.client_pub_recv,
                "member_added": C.member_added,
                "member_removed": C.member_removed,
                "push_failures": dict(C.pushes_failed),
                "seq_gaps": C.seq_gaps,
                "seq_dups": C.seq_dups,
                "gap_examples": C.gap_examples,
            },
            "closes": {
                "client_observed_close_codes": dict(C.close_codes),
                "slow_consumer_closes_client_observed": sum(v for k, v in C.close_codes.items() if k.endswith(":4100")),
                "slow_consumer_closes_server_metric": metrics.get("fastws_slow_consumer_closes_total"),
                "slow_client_outcomes": dict(C.slow),
                "rate_limit_closes_1008": sum(v for k, v in C.close_codes.items() if k.endswith(":1008")),
                "rate_limit_errors_4029": C.flood_4029,
                "idle_closes_4201": sum(v for k, v in C.close_codes.items() if k.endswith(":4201")),
                "error_frame_codes": {str(k): v for k, v in sorted(C.error_codes.items())},
                "garbage_outcomes": dict(sorted(C.garbage.items())),
            },
            "handshake_flood": C.hs_flood,
            "handshakes_metric": {
                k.split('"')[1]: v for k, v in metrics.items() if k.startswith("fastws_handshakes_total")
            },
            "end_state": {
                "connections": stats["connections"],
                "channels": stats["channels"],
                "presence_members": members,
                "metrics_connections": metrics.get("fastws_connections"),
                "metrics_channels": metrics.get("fastws_channels"),
                "seconds_to_zero": round(time_to_zero, 1),
                "messages_in": stats["messages_in"],
                "messages_out": stats["messages_out"],
            },
            "rss_mib": {
                "baseline": mib(base["VmRSS"]),
                "peak_sampled": mib(peak_rss),
                "peak_hwm": mib(end.get("VmHWM", 0)),
                "end_after_settle": mib(end["VmRSS"]),
                "margin": args.rss_margin_mib,
                "settle_s": args.settle,
            },
            "fds": {"baseline": base_fds, "peak_sampled": peak_fds, "end": end_fds},
            "threads": {"baseline": base["Threads"], "end": end["Threads"]},
            "cpu_s": {
                "server": round(server_cpu, 1),
                "client": round(client_cpu, 1),
                "client_loop_lag_max_ms": round(max_lag * 1000),
            },
            "unexpected": dict(C.unexpected),
            "unexpected_examples": C.unexpected_examples,
            "waves": list(waves.values()),
            "series": series,
        }
    except (OSError, ConnectionError, RuntimeError, asyncio.TimeoutError, KeyError, ValueError) as error:
        # Typically: the server died or stopped answering. Report what is known rather than a traceback.
        failures.append(f"the run broke off: {type(error).__name__}: {error}")
        summary = {
            "ok": False,
            "partial": True,
            "connections": {"attempted": C.connect_attempts, "opened": C.connected, "peak": C.peak_live},
        }
    finally:
        stop_push.set()
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
                failures.append("the server did not stop within 20 s of SIGTERM")
        log_file.close()
    server_log = log_path.read_text(errors="replace")
    panics = server_log.count("panicked")
    if panics:
        failures.append(f"{panics} panics in the server log")
    if server.returncode != 0:
        failures.append(f"the server exited with status {server.returncode} after SIGTERM")
    summary["server_log"] = {
        "lines": server_log.count("\n"),
        "refused_handshake_lines": server_log.count("refused handshake"),
        "panics": panics,
        "accept_failed": server_log.count("accept failed"),
        "errors": sum(1 for line in server_log.splitlines() if " ERROR " in line),
        "exit_status": server.returncode,
    }
    if args.keep_log:
        summary["server_log"]["path"] = str(log_path)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    summary["failures"] = failures
    summary["ok"] = not failures
    for failure in failures:
        log(f"FAILED: {failure}")
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    return 0 if not failures else 1


def parse_mix(value: str) -> dict[str, float]:
    mix = {}
    for part in value.split(","):
        kind, _, weight = part.partition("=")
        if kind not in BEHAVIOURS:
            raise argparse.ArgumentTypeError(f"unknown client kind {kind!r}; known: {', '.join(BEHAVIOURS)}")
        mix[kind] = float(weight)
    return mix


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=float(os.environ.get("SOAK_DURATION", 180)),
        help="seconds of churn ($SOAK_DURATION)",
    )
    parser.add_argument("--fastws", help="the fastws command line (else $SOAK_FASTWS, $SOAK_VENV/bin/fastws, PATH)")
    parser.add_argument("--concurrency", type=int, default=4000, help="clients open at the top of a wave")
    parser.add_argument(
        "--min-fraction", type=float, default=0.4, help="clients at the bottom of a wave, as a fraction"
    )
    parser.add_argument("--wave", type=float, default=60, help="seconds per wave (ramp up, mass drop, ramp down)")
    parser.add_argument("--mass-drop", type=float, default=0.3, help="fraction of normal clients reset at a wave's top")
    parser.add_argument("--lifetime", type=float, default=10, help="mean lifetime of a normal client, seconds")
    parser.add_argument(
        "--mix",
        type=parse_mix,
        default=parse_mix("normal=89,slow=1,flood=2,silent=1,garbage=4,badauth=3"),
        help="client kinds and weights",
    )
    parser.add_argument(
        "--publishers",
        type=float,
        default=0.05,
        help="fraction of normal clients that publish to their channel every few seconds",
    )
    parser.add_argument("--users", type=int, default=0, help="distinct JWT users (default concurrency/3)")
    parser.add_argument("--public-channels", type=int, default=20)
    parser.add_argument("--presence-channels", type=int, default=40)
    parser.add_argument("--push-rate", type=float, default=2, help="pushes per second per channel")
    parser.add_argument("--user-push-rate", type=float, default=5, help="pushes per second to random users")
    parser.add_argument("--firehose-rate", type=float, default=16, help="pushes per second on soak.firehose")
    parser.add_argument("--firehose-size", type=int, default=65_536, help="bytes per firehose push")
    parser.add_argument("--inflight", type=int, default=256, help="client handshakes in flight at once")
    parser.add_argument("--spawn-per-tick", type=int, default=100, help="most clients started per 50 ms")
    parser.add_argument("--server-workers", type=int, default=2)
    parser.add_argument("--server-cpus", default="0", help="CPUs the server is pinned to ('none': no pinning)")
    parser.add_argument(
        "--max-connections", type=int, default=0, help="server max_connections (default 95%% of --concurrency)"
    )
    parser.add_argument("--heartbeat", type=float, default=5, help="server heartbeat_interval")
    parser.add_argument("--idle-timeout", type=float, default=15, help="server idle_timeout")
    parser.add_argument("--handshake-timeout", type=float, default=10, help="server handshake_timeout")
    parser.add_argument("--max-pending", type=int, default=1024, help="server max_pending_handshakes")
    parser.add_argument("--server-arg", action="append", default=[], help="extra argument for fastws serve")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment variable for the server (e.g. MALLOC_ARENA_MAX=2)",
    )
    parser.add_argument("--no-handshake-flood", dest="handshake_flood", action="store_false")
    parser.add_argument("--settle", type=float, default=20, help="seconds between the last client and the RSS reading")
    parser.add_argument(
        "--rss-margin-mib",
        type=int,
        default=16,
        help="allowed RSS growth, end vs baseline (the core's jemalloc gives the peak's heap back: 6.1 MiB above "
        "baseline after the default 3-minute run; builds before 085f960 used glibc malloc and needed 96)",
    )
    parser.add_argument("--fd-slack", type=int, default=2, help="allowed fd growth, end vs baseline")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep-log", action="store_true", help="keep the server log and print its path")
    args = parser.parse_args()
    try:
        return asyncio.run(run(args))
    except SystemExit as error:
        if isinstance(error.code, str):
            print(error.code, file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
