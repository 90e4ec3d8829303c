"""Payload → JSON bytes, once per push, before the native fan-out (which never touches a Python object)."""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["encode_payload"]


def encode_payload(payload: Any) -> bytes:
    """Serialise ``payload`` with orjson; ``bytes`` (and bytearray/memoryview) are taken as JSON already.

    Raises:
        TypeError: the payload is not JSON-serialisable (orjson.JSONEncodeError is a TypeError).
    """
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    return orjson.dumps(payload)
