"""The fastws exception hierarchy.

Each error also inherits the builtin a caller would naturally catch (a bad setting is a ``ValueError``, pushing
without a server is a ``RuntimeError``), as orjson's JSONDecodeError is a ``json.JSONDecodeError``.
"""

from __future__ import annotations

__all__ = ["AlreadyRunning", "ConfigError", "FastWSError", "NotRunning"]


class FastWSError(Exception):
    """Base class of every error fastws raises."""


class ConfigError(FastWSError, ValueError):
    """A setting has a bad value, an unknown name, or its source cannot be read.

    The message names the setting and where its value came from, in one line.
    """


class NotRunning(FastWSError, RuntimeError):
    """A push, stats or presence call was made but no fastws server runs in this process."""


class AlreadyRunning(FastWSError, RuntimeError):
    """A second server was started in a process that already runs one."""
