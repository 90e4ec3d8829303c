"""Payload → JSON bytes for the route that sends JSON text: ``Client``'s HTTP publish.

In-process and Redis pushes pass the payload itself to the native call, which serialises it with orjson
(rust/bridge/payload.rs) under the same rules.
"""

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
