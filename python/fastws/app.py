"""``fastws.Server``: settings, lifecycle (run / start / stop) and the push and stats API of one server.

The sockets, channels and fan-out live in the native core (``fastws._fastws.NativeServer``); this class resolves
the settings, owns the process-wide "current server" that the module-level functions act on, and runs the
application's own Python (start/stop hooks and timers) on Python threads, never on the core's threads.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar, Union

import orjson

from fastws._fastws import NativeServer, next_log_record
from fastws._hooks import AuthenticateHook, AuthorizeHook, ConnectHook, DisconnectHook, HookRunner
from fastws.config import Settings, check_keyword_names, describe_mode, resolve_settings
from fastws.errors import AlreadyRunning, ConfigError, NotRunning
from fastws.types import ChannelInfo, Member

if TYPE_CHECKING:
    from fastws.client import Client

__all__ = ["ChannelTarget", "Server", "UserTarget", "current_server"]

logger = logging.getLogger("fastws")

Hook = Callable[[], Union[None, Awaitable[None]]]
H = TypeVar("H", bound=Hook)
AuthN = TypeVar("AuthN", bound=AuthenticateHook)
AuthZ = TypeVar("AuthZ", bound=AuthorizeHook)
OnConnect = TypeVar("OnConnect", bound=ConnectHook)
OnDisconnect = TypeVar("OnDisconnect", bound=DisconnectHook)

# One server per process: the module-level push()/channels()/... act on it.
_current: Server | None = None
_current_lock = threading.Lock()
_core_logs_forwarded = False


def _forward_core_logs() -> None:
    """Hand the native core's log records to the ``fastws`` logger (a daemon thread, one per process)."""
    while True:
        record = next_log_record(1.0)
        if record is not None:
            level, message = record
            logger.log(level, "%s", message)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (``log_format = "json"``)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def _origins_rule(settings: Settings) -> str:
    if not settings.allowed_origins:
        return "origins: same-origin"
    return "origins: any" if "*" in settings.allowed_origins else "origins: " + ", ".join(settings.allowed_origins)


def current_server() -> Server:
    """The server running in this process.

    Raises:
        NotRunning: no server has been started in this process.
    """
    server = _current
    if server is None:
        raise NotRunning(
            "no fastws server is running in this process: start one with fastws.Server(...).start(), "
            "or run this code inside `fastws serve module:server`"
        )
    return server


class Server:
    """A fastws WebSocket server.

    Every keyword is a setting (see docs/configuration.md); ``fastws.toml``, ``FASTWS_*`` environment variables
    and ``fastws serve`` flags override them, in that order.

    Example:
        >>> server = fastws.Server(port=9501, client_publish=["chat.*"])
        >>> server.run()  # blocks until Ctrl-C or SIGTERM
    """

    def __init__(self, **settings: Any) -> None:
        check_keyword_names(settings)
        # Validate the keywords alone now, so a mistake is reported where it was written.
        resolve_settings(settings, env={})
        self._kwargs = dict(settings)
        self._native: NativeServer | None = None
        self._settings: Settings | None = None
        self._authenticate: AuthenticateHook | None = None
        self._authorize: AuthorizeHook | None = None
        self._on_connect: ConnectHook | None = None
        self._on_disconnect: DisconnectHook | None = None
        self._on_start: list[Hook] = []
        self._on_stop: list[Hook] = []
        self._timers: list[tuple[float, Hook]] = []
        self._stop_timers = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = threading.Thread()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def resolve_settings(self, *, config_path: str | None = None, cli: Mapping[str, Any] | None = None) -> Settings:
        """The settings this server would start with: its keywords, then the file, environment and ``cli``."""
        return resolve_settings(self._kwargs, config_path=config_path, cli=cli)

    def start(self, *, config_path: str | None = None, cli: Mapping[str, Any] | None = None) -> None:
        """Start serving in background threads of this process and return at once.

        Args:
            config_path: A ``fastws.toml`` to read (else ``FASTWS_CONFIG``, else none).
            cli: Settings given on the command line (highest precedence).

        Raises:
            AlreadyRunning: a server already runs in this process.
            ConfigError: a setting from the file, environment or command line is invalid.
            OSError: the address cannot be bound; ConnectionError (an OSError) when ``redis_url`` is set and
                Redis can't be reached.
        """
        self._start(self.resolve_settings(config_path=config_path, cli=cli))

    def _start(self, settings: Settings) -> None:
        global _current, _core_logs_forwarded
        with _current_lock:
            if _current is not None:
                which = "this server" if _current is self else "another fastws server"
                raise AlreadyRunning(f"{which} is already running in this process (one server per process)")
            runner = HookRunner(self._event_loop, settings.hook_timeout)
            connected, disconnected = (
                runner.lifecycle(self._on_connect, self._on_disconnect)
                if self._on_connect or self._on_disconnect
                else (None, None)
            )
            try:
                native = NativeServer(
                    settings.as_dict(),
                    authenticate=runner.authenticate(self._authenticate) if self._authenticate else None,
                    authorize=runner.authorize(self._authorize) if self._authorize else None,
                    on_connect=connected,
                    on_disconnect=disconnected,
                )
            except ValueError as exc:  # a key the core cannot use (for example, not a PEM public key)
                raise ConfigError(str(exc)) from None
            native.start()
            self._native, self._settings, _current = native, settings, self
            if not _core_logs_forwarded:
                threading.Thread(target=_forward_core_logs, name="fastws-core-logs", daemon=True).start()
                _core_logs_forwarded = True
        host, port = native.address
        logger.info(
            "fastws listening on ws://%s:%d (%s; %s; broker: %s; %d workers)%s",
            host,
            port,
            describe_mode(settings, has_auth_hook=self._authenticate is not None, accepted=native.jwt_algorithms),
            _origins_rule(settings),
            native.broker,
            settings.workers,
            f"; demo page at http://{host}:{port}/" if settings.demo else "",
        )
        self._stop_timers.clear()
        for hook in self._on_start:
            self._call_hook(hook, "on_start")
        for interval, func in self._timers:
            self._spawn(f"fastws-every-{func.__name__}", self._timer_loop, interval, func)

    def stop(self) -> None:
        """Close every connection with 1001 "going away", stop timers, run on_stop hooks. Idempotent."""
        global _current
        native = self._native
        if native is None:
            return
        self._stop_timers.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        for hook in self._on_stop:
            self._call_hook(hook, "on_stop")
        native.stop()
        if self._loop is not None:
            loop, self._loop = self._loop, None
            loop.call_soon_threadsafe(loop.stop)
            self._loop_thread.join(timeout=5)
            loop.close()
        with _current_lock:
            self._native = None
            if _current is self:
                _current = None
        logger.info("fastws stopped")

    def run(self, *, config_path: str | None = None, cli: Mapping[str, Any] | None = None) -> None:
        """Start, then block until Ctrl-C or SIGTERM, then stop cleanly (clients get 1001 "going away")."""
        settings = self.resolve_settings(config_path=config_path, cli=cli)
        # Like uvicorn: the blocking entry point owns logging unless the app configured it.
        if not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(
                JsonFormatter()
                if settings.log_format == "json"
                else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
            )
            logger.addHandler(handler)
            logger.setLevel(settings.log_level.upper())
        stopping = threading.Event()
        previous: dict[signal.Signals, Any] = {}
        # Handlers go in before the server starts, so a signal right after the start-up line still stops cleanly.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, lambda *_: stopping.set())
        try:
            self._start(settings)
            while not stopping.wait(0.5):
                pass
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.stop()

    @property
    def running(self) -> bool:
        """True between start() and stop()."""
        return self._native is not None

    @property
    def settings(self) -> Settings:
        """The settings in force (resolved at start)."""
        if self._settings is None:
            raise NotRunning("settings are resolved when the server starts")
        return self._settings

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port); with ``port=0`` the port the OS picked."""
        return self._require().address

    @property
    def port(self) -> int:
        """The bound port."""
        return self.address[1]

    # -- hooks and timers ------------------------------------------------------------------------------------

    def authenticate(self, func: AuthN) -> AuthN:
        """Register the hook that decides who a connection is, at the handshake.

        ``func(request: fastws.Request)`` (sync or ``async def``) returns a ``fastws.User`` (or a
        ``{"id": ..., "info": {...}}`` dict) to accept, or None to refuse with HTTP 401. When it is registered it
        alone decides (JWT settings are then not used), and anonymous connections are refused. A hook that raises
        or runs past ``hook_timeout`` refuses that one handshake.
        """
        self._authenticate = func
        return func

    def authorize(self, func: AuthZ) -> AuthZ:
        """Register the hook that decides ``private-``/``presence-`` subscriptions.

        ``func(user: fastws.User, channel: str)`` (sync or ``async def``) returns True to allow, False/None to
        refuse (the client gets error 4003), or, for presence channels, a dict of member info to show others.
        Without it: ``private-user.<id>`` only for user ``<id>``, other ``private-`` channels refused,
        ``presence-`` channels open to any authenticated user.
        """
        self._authorize = func
        return func

    def on_connect(self, func: OnConnect) -> OnConnect:
        """Run ``func(conn: fastws.Connection)`` (sync or ``async def``) after each connection opens.

        It runs beside the connection (nothing waits for it) on a Python thread; exceptions are logged.
        """
        self._on_connect = func
        return func

    def on_disconnect(self, func: OnDisconnect) -> OnDisconnect:
        """Run ``func(conn: fastws.Connection, code: int)`` after each connection ends.

        ``code`` is the close code sent or received (1006 when the socket dropped without a close frame). It runs
        after that connection's ``on_connect`` has finished; exceptions are logged.
        """
        self._on_disconnect = func
        return func

    def on_start(self, func: H) -> H:
        """Run ``func`` (sync or ``async def``) once the server listens."""
        self._on_start.append(func)
        return func

    def on_stop(self, func: H) -> H:
        """Run ``func`` (sync or ``async def``) when the server stops, before connections are closed."""
        self._on_stop.append(func)
        return func

    def every(self, seconds: float) -> Callable[[H], H]:
        """Run the decorated function (sync or ``async def``) every ``seconds`` while the server runs.

        Ticks never overlap: a tick that overruns delays the next one. Exceptions are logged and the timer goes on.
        """
        if not seconds > 0:
            raise ValueError(f"every() needs a positive interval in seconds, got {seconds!r}")

        def register(func: H) -> H:
            self._timers.append((float(seconds), func))
            return func

        return register

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _timer_loop(self, interval: float, func: Hook) -> None:
        next_tick = time.monotonic() + interval
        while not self._stop_timers.wait(max(0.0, next_tick - time.monotonic())):
            self._call_hook(func, f"every({interval:g})")
            next_tick = max(next_tick + interval, time.monotonic())

    def _call_hook(self, func: Hook, what: str) -> None:
        try:
            result = func()
            if inspect.isawaitable(result):
                asyncio.run_coroutine_threadsafe(_as_coroutine(result), self._event_loop()).result()
        except Exception:
            logger.exception("fastws: %s hook %s raised", what, getattr(func, "__qualname__", func))

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        """The event loop that runs the app's ``async def`` hooks, on a thread of its own, started on first use."""
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._loop_thread = threading.Thread(target=loop.run_forever, name="fastws-async-hooks", daemon=True)
            self._loop_thread.start()
            self._loop = loop
        return self._loop

    # -- push and stats --------------------------------------------------------------------------------------

    def _require(self) -> NativeServer:
        native = self._native
        if native is None:
            raise NotRunning("this fastws server is not running: call start() or run() first")
        return native

    def push(self, channel: str, payload: Any, *, exclude: str | None = None) -> int:
        """Send ``payload`` to every subscriber of ``channel``.

        A dict with an ``"event"`` key is delivered as that object with ``"channel"`` added; anything else as
        ``{"event": "message", "channel": ..., "data": payload}``. Never blocks on sockets.

        Args:
            channel: The channel name.
            payload: Any orjson-serialisable object, or ``bytes`` already holding JSON.
            exclude: A ``socket_id`` not to deliver to (the sender, in the "to others" case).

        Returns:
            The number of subscribers this node has for it when called. With ``redis_url`` the other nodes deliver
            it too (through Redis, without waiting); they are not counted.

        Raises:
            ValueError: invalid channel name, or bytes that are not JSON.
            TypeError: the payload is not JSON-serialisable.
            NotRunning: the server is not running.
        """
        # The hot path of the API: the native push serialises with orjson itself (rust/bridge/payload.rs).
        native = self._native
        if native is None:
            native = self._require()
        return native.push(channel, payload, exclude)

    def to_channel(self, name: str) -> ChannelTarget:
        """The seed's fluent form: ``server.to_channel("chat.room.1").push({...})``."""
        return ChannelTarget(self, name)

    def to_user(self, user_id: int | str) -> UserTarget:
        """``server.to_user(123).push({...})``: every connection of that user (user ids compare as strings)."""
        return UserTarget(self, str(user_id))

    def push_to_user(self, user_id: int | str, payload: Any) -> int:
        """Send ``payload`` to every connection of a user, whatever channels they are on, on every node.

        Delivered like a channel push without ``"channel"``. Returns how many connections this node has for the
        user when called.
        """
        return self._require().push_to_user(str(user_id), payload)

    def presence(self, channel: str) -> list[Member]:
        """The members of a presence channel: ``[{"id", "info", "connected_at"}]``, in arrival order.

        With ``redis_url``, the whole cluster's members (``ConnectionError`` while Redis is unreachable).
        """
        return self._require().presence(channel)

    def connection_count(self) -> int:
        """Open WebSocket connections on this node."""
        return self._require().connection_count()

    def channels(self) -> list[ChannelInfo]:
        """Every channel with at least one subscriber: ``[{"name", "subscribers", "type"}]``, sorted by name.

        Presence channels also have ``"members"`` (distinct users). With ``redis_url`` the counts are the whole
        cluster's (``ConnectionError`` while Redis is unreachable).
        """
        return self._require().channels()

    def channel_stats(self, name: str) -> ChannelInfo:
        """``{"name", "subscribers", "type"}`` of one channel (0 subscribers when nobody is subscribed).

        Presence channels also have ``"members"`` (distinct users). With ``redis_url``, cluster-wide.
        """
        return self._require().channel_stats(name)


def _target() -> Server | Client:
    from fastws.client import current_target

    return current_target()


class ChannelTarget:
    """What ``to_channel(name)`` returns."""

    def __init__(self, server: Server | Client | None, name: str) -> None:
        self._server, self.name = server, name

    def push(self, payload: Any, *, exclude: str | None = None) -> int:
        """Same as ``push(name, payload, exclude=...)``."""
        return (self._server or _target()).push(self.name, payload, exclude=exclude)


class UserTarget:
    """What ``to_user(user_id)`` returns."""

    def __init__(self, server: Server | Client | None, user_id: str) -> None:
        self._server, self.user_id = server, user_id

    def push(self, payload: Any) -> int:
        """Send ``payload`` to every connection of this user; returns how many connections it is queued for.

        Connections get a user through authentication (JWT or an authenticate hook); in open mode none has one.
        """
        return (self._server or _target()).push_to_user(self.user_id, payload)


async def _as_coroutine(awaitable: Awaitable[None]) -> None:
    await awaitable
