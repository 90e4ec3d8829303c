"""Typed shapes of what the stats API returns."""

from __future__ import annotations

import sys
from typing import Literal

if sys.version_info >= (3, 11):
    from typing import TypedDict
else:  # pragma: no cover - typing_extensions is not a dependency; plain TypedDict is enough on 3.9/3.10
    from typing import TypedDict

__all__ = ["ChannelInfo", "ChannelType"]

ChannelType = Literal["public", "private", "presence"]


class ChannelInfo(TypedDict):
    """One channel as ``channels()`` and ``channel_stats()`` describe it."""

    name: str
    subscribers: int
    type: ChannelType
