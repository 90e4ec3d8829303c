"""Shared bits of the Python peer adapters: arguments, JSON, the event loop, and the one-line readiness log.

Every peer speaks the same tiny bench protocol as fastws's native one (see docs/benchmarks.md): a subscribe frame gets
``{"event":"subscribed","channel":C}``; a publish frame is sent as ``{"event":"message","channel":C,"data":P}`` to
every other subscriber of C. Peers send nothing on connect. Each is tuned the way its documentation recommends for
throughput (no compression, pings off like fastws's ``--heartbeat-interval 0``, uvloop where the library runs on
asyncio, a large listen backlog).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from typing import Any

try:
    import orjson

    def dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

    loads: Callable[[str | bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is installed with fastws in the bench venv
    import json

    def dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    loads = json.loads

BACKLOG = 4096
MAX_MESSAGE = 65536


def parse_args(name: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=f"{name} peer for the fastws benchmarks")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    return parser.parse_args()


def install_uvloop() -> str:
    """Use uvloop when it is installed (the bench venv has it); returns the loop's name for the log line."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return f"uvloop {uvloop.__version__}"


def ready(name: str, host: str, port: int, detail: str = "") -> None:
    print(f"{name} peer listening on ws://{host}:{port}/ {detail}".rstrip(), file=sys.stderr, flush=True)


def parse(message: str | bytes) -> tuple[str | None, Any, Any]:
    """Return (event, channel, payload) of a client frame; payload is only meaningful for publish."""
    try:
        frame = loads(message)
        event = frame.get("event")
        data = frame.get("data") or {}
        return event, data.get("channel"), data.get("payload")
    except Exception:
        return None, None, None


def subscribed(channel: Any) -> bytes:
    return dumps({"event": "subscribed", "channel": channel})


def publication(channel: Any, payload: Any) -> bytes:
    return dumps({"event": "message", "channel": channel, "data": payload})
