"""The ``fastws`` command line: ``fastws serve [APP]`` runs a server, ``fastws token`` signs a development JWT,
``fastws stats`` and ``fastws push`` talk to a running server over its HTTP endpoints (``fastws push --redis``
publishes straight into a cluster's Redis instead), ``fastws version`` prints the version.

``serve`` has one option per setting, generated from :data:`fastws.config.SETTINGS`. Options default to None
so that only the flags actually given reach :func:`fastws.config.resolve_settings`, which layers them over
the app's ``Server(...)`` keywords, ``fastws.toml`` and the environment.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from click.core import ParameterSource

from fastws._http import DEFAULT_URL, OpsError, normalize_url, request_json
from fastws.config import SETTINGS, SettingSpec, validate_sources
from fastws.errors import ConfigError

if TYPE_CHECKING:
    # The ignore covers checkouts where fastws.app is not written yet; "unused-ignore" keeps it quiet otherwise.
    from fastws.app import Server  # type: ignore[import-not-found, unused-ignore]

__all__ = ["format_stats", "load_app", "main"]

F = TypeVar("F", bound=Callable[..., Any])

_METAVARS = {"int": "INTEGER", "float": "FLOAT", "str": "TEXT", "list": "LIST"}


def _setting_option(spec: SettingSpec) -> Callable[[F], F]:
    # The help shows the real default and variable; click's own default/envvar stay unused because reading
    # the environment is resolve_settings' job, with its precedence and error messages.
    notes = [spec.help]
    if spec.kind == "list":
        notes.append("Comma-separated.")
    if spec.secret:
        notes.append("Prefer the env variable: flags show in `ps`.")
    help_text = " ".join([*notes, f"[default: {spec.describe_default()}; env: {spec.env_var}]"])
    if spec.kind == "bool":
        return click.option(f"{spec.flag}/--no-{spec.flag[2:]}", spec.name, default=None, help=help_text)
    metavar = "[" + "|".join(spec.choices) + "]" if spec.choices else _METAVARS[spec.kind]
    # Values stay text: resolve_settings parses them, so `--port abc` gets the same one-line error as
    # FASTWS_PORT=abc rather than click's usage message.
    flags = (spec.flag, *spec.aliases)
    return click.option(*flags, spec.name, type=str, default=None, metavar=metavar, help=help_text)


def _setting_options(command: F) -> F:
    # click lists options in the reverse order of their decorators
    for spec in reversed(SETTINGS.values()):
        command = _setting_option(spec)(command)
    return command


def _server_class() -> type[Server]:
    # Imported late: fastws.app loads the native core, which the command line must not need to report errors.
    server_class: type[Server] = importlib.import_module("fastws.app").Server
    return server_class


def load_app(spec: str) -> Server:
    """Return the ``fastws.Server`` named by ``module:attribute`` (the attribute may be dotted), like uvicorn.

    Raises ConfigError when the spec is malformed, the module or attribute is missing, or the object found is
    not a Server. An ImportError raised from inside the app's own code propagates with its traceback.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ConfigError(f"APP must look like 'module:attribute', not {spec!r}")
    # An installed console script does not have the current directory on sys.path; `python -m` has.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name != missing and not module_name.startswith(missing + "."):
            raise  # the app imports something missing: its bug, shown with the traceback
        raise ConfigError(f"cannot import APP module {module_name!r}: no module named {missing!r}") from None
    obj: Any = module
    for attr in attr_path.split("."):
        if not hasattr(obj, attr):
            raise ConfigError(f"APP module {module_name!r} has no attribute {attr_path!r}")
        obj = getattr(obj, attr)
    server_class = _server_class()
    if not isinstance(obj, server_class):
        raise ConfigError(f"APP {spec!r} is a {type(obj).__name__}, not a fastws.Server")
    return obj


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
def main() -> None:
    """fastws: real-time WebSocket server for Python applications, with a Rust core."""


@main.command()
@click.argument("app", required=False)
@click.option("--config", metavar="PATH", default=None, help="Flat TOML file of settings. [env: FASTWS_CONFIG]")
@_setting_options
def serve(app: str | None, config: str | None, **options: Any) -> None:
    """Run a fastws server.

    APP is `module:attribute` naming a configured fastws.Server; without it a Server with default settings runs.
    Settings from later sources win: Server(...) keywords < --config file < FASTWS_* environment < options.
    """
    cli_values = {name: value for name, value in options.items() if value is not None}
    try:
        # Check the operator's sources before importing the app or the native core, so a typo fails fast.
        validate_sources(config_path=config, cli=cli_values)
        # Without an app the demo page is on (a newcomer sees fastws work in the browser); settings can turn it off.
        server = load_app(app) if app is not None else _server_class()(demo=True)
        server.run(config_path=config, cli=cli_values)
    except ConfigError as exc:
        click.echo(f"fastws: error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # the address is in use or not ours to bind: an operator error, not a crash
        click.echo(f"fastws: error: {exc}", err=True)
        sys.exit(1)


@main.command()
@click.argument("app", required=False)
@click.option("--user", "user_id", required=True, help="The user id (the jwt_user_claim claim, `sub` by default).")
@click.option("--claim", "claims", multiple=True, metavar="NAME=VALUE", help="An extra claim; repeatable.")
@click.option("--ttl", type=float, default=3600.0, show_default=True, help="Seconds until the token expires.")
@click.option("--config", metavar="PATH", default=None, help="Flat TOML file of settings. [env: FASTWS_CONFIG]")
@click.option("--jwt-secret", default=None, help="The HMAC secret. [env: FASTWS_JWT_SECRET]")
def token(
    app: str | None, user_id: str, claims: tuple[str, ...], ttl: float, config: str | None, jwt_secret: str | None
) -> None:
    """Print a signed JWT for development: `ws://host:9501/?token=<it>`.

    The secret, algorithm, audience and issuer come from the same settings `fastws serve` uses (APP's
    Server(...) keywords, --config, FASTWS_* environment, --jwt-secret), so the server accepts the token.
    """
    import jwt

    cli_values = {"jwt_secret": jwt_secret} if jwt_secret is not None else {}
    try:
        server = load_app(app) if app is not None else _server_class()()
        settings = server.resolve_settings(config_path=config, cli=cli_values)
        if not settings.jwt_secret:
            raise ConfigError("fastws token signs with jwt_secret: set FASTWS_JWT_SECRET, --jwt-secret or --config")
        payload: dict[str, Any] = {}
        for claim in claims:
            name, sep, value = claim.partition("=")
            if not sep or not name:
                raise ConfigError(f"--claim must look like NAME=VALUE, not {claim!r}")
            payload[name] = value
        now = int(time.time())
        payload.update({settings.jwt_user_claim: user_id, "iat": now, "exp": now + int(ttl)})
        if settings.jwt_audience:
            payload["aud"] = settings.jwt_audience
        if settings.jwt_issuer:
            payload["iss"] = settings.jwt_issuer
    except ConfigError as exc:
        click.echo(f"fastws: error: {exc}", err=True)
        sys.exit(2)
    algorithm = next((name for name in settings.jwt_algorithms if name.startswith("HS")), "HS256")
    click.echo(jwt.encode(payload, settings.jwt_secret, algorithm=algorithm))


@main.command()
def version() -> None:
    """Print the installed fastws version."""
    try:
        installed = importlib.metadata.version("fastws")
    except importlib.metadata.PackageNotFoundError:
        installed = "unknown"
    click.echo(f"fastws {installed}")


# -- talking to a running server: `fastws stats`, `fastws push` ---------------------------------------------------


def _url_option(command: F) -> F:
    return click.option(
        "--url",
        metavar="URL",
        envvar="FASTWS_URL",
        default=DEFAULT_URL,
        show_default=True,
        help="The server's address (ws:// and wss:// work too). [env: FASTWS_URL]",
    )(command)


def _api_key_option(command: F) -> F:
    return click.option(
        "--api-key",
        metavar="KEY",
        envvar="FASTWS_API_KEY",
        default=None,
        help="Sent as `Authorization: Bearer KEY`; needed when the server sets api_key. "
        "Prefer the env variable: flags show in `ps`. [env: FASTWS_API_KEY]",
    )(command)


def _base_url(url: str) -> str:
    try:
        return normalize_url(url)
    except ValueError as exc:
        click.echo(f"fastws: error: {exc}", err=True)
        sys.exit(2)


def _fail(exc: OpsError) -> NoReturn:
    click.echo(f"fastws: error: {exc}", err=True)
    sys.exit(1)


def _fetch_stats(base_url: str, api_key: str | None) -> dict[str, Any]:
    stats = request_json(base_url, "/stats", api_key=api_key)
    if not isinstance(stats, dict) or not isinstance(stats.get("channels", []), list):
        raise OpsError(f"{base_url}/stats did not answer a statistics document; is it a fastws server?")
    return stats


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{seconds:.1f}s" if seconds < 10 else f"{secs}s"


def format_stats(stats: Mapping[str, Any], limit: int = 0) -> str:
    """The ``/stats`` document as the report ``fastws stats`` prints; ``limit`` > 0 keeps the busiest channels."""
    channels: list[Mapping[str, Any]] = [c for c in stats.get("channels", []) if isinstance(c, Mapping)]
    totals = [
        ("Total Connections:", f"{int(stats.get('connections', 0)):,}"),
        ("Total Channels:", f"{len(channels):,}"),
        ("Messages In:", f"{int(stats.get('messages_in', 0)):,}"),
        ("Messages Out:", f"{int(stats.get('messages_out', 0)):,}"),
        ("Uptime:", _duration(float(stats.get("uptime_s", 0)))),
    ]
    label_width = max(len(label) for label, _ in totals)
    lines = ["WebSocket Server Statistics", ""]
    lines += [f"{label:<{label_width}} {value}" for label, value in totals]
    lines.append("")
    lines += _format_nodes(stats)
    if not channels:
        lines.append("Active Channels: none")
        return "\n".join(lines)
    # Busiest first, then by name, so the order holds still between refreshes of --watch.
    channels.sort(key=lambda c: (-int(c.get("subscribers", 0)), str(c.get("name", ""))))
    shown = channels[:limit] if limit > 0 else channels
    names = [f"{c.get('name', '?')} ({c.get('type', '?')}):" for c in shown]
    subscribers = [f"{int(c.get('subscribers', 0)):,}" for c in shown]
    name_width = max(len(name) for name in names)
    number_width = max(len(number) for number in subscribers)
    lines.append("Active Channels:")
    for channel, name, number in zip(shown, names, subscribers):
        noun = "subscriber" if int(channel.get("subscribers", 0)) == 1 else "subscribers"
        line = f"  {name:<{name_width}} {number:>{number_width}} {noun}"
        if "members" in channel:
            line += ", " + _count(int(channel["members"]), "member")
        lines.append(line)
    if len(shown) < len(channels):
        lines.append(f"  ... and {len(channels) - len(shown):,} more (--limit 0 shows all)")
    return "\n".join(lines)


def _format_nodes(stats: Mapping[str, Any]) -> list[str]:
    """The ``Nodes:`` section of a cluster's report (nothing for a single node)."""
    nodes: list[Mapping[str, Any]] = [n for n in stats.get("nodes", []) or [] if isinstance(n, Mapping)]
    if stats.get("broker") != "redis" and len(nodes) < 2:
        return []
    lines = [f"Nodes: {len(nodes)}"]
    if nodes:
        ids = [str(node.get("id", "?")) for node in nodes]
        addresses = [str(node.get("address", "")) for node in nodes]
        counts = [f"{int(node.get('connections', 0)):,}" for node in nodes]
        id_width, address_width = max(map(len, ids)), max(map(len, addresses))
        count_width = max(map(len, counts))
        for node_id, address, count in zip(ids, addresses, counts):
            noun = "connection" if count == "1" else "connections"
            lines.append(f"  {node_id:<{id_width}}  {address:<{address_width}}  {count:>{count_width}} {noun}")
    if stats.get("broker_error"):
        lines.append(f"  (Redis unreachable, this node's figures only: {stats['broker_error']})")
    lines.append("")
    return lines


def _pause(seconds: float) -> None:
    """Wait between refreshes of ``stats --watch`` (a function of its own so tests can replace it)."""
    time.sleep(seconds)


@main.command()
@_url_option
@_api_key_option
@click.option("--json", "as_json", is_flag=True, help="Print the raw /stats JSON on one line, for scripts.")
@click.option("--limit", type=click.IntRange(min=0), default=0, metavar="N", help="Show only the N busiest channels.")
@click.option("--watch", is_flag=True, help="Clear the screen and refresh until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Seconds between refreshes of --watch. [default: 2]",
)
@click.option(
    "--count",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Stop --watch after N refreshes (for scripts and tests). [default: until Ctrl-C]",
)
def stats(
    url: str,
    api_key: str | None,
    as_json: bool,
    limit: int,
    watch: bool,
    interval: float | None,
    count: int | None,
) -> None:
    """Show a running server's statistics: connections, channels, messages and uptime.

    Reads GET /stats, which answers clients on the server's machine, or anyone sending the server's api_key.
    With --json and --watch, one JSON line is printed per refresh.
    """
    base_url = _base_url(url)
    if not watch and (interval is not None or count is not None):
        raise click.UsageError("--interval and --count need --watch")

    def show() -> None:
        document = _fetch_stats(base_url, api_key or None)
        if as_json:
            click.echo(json.dumps(document, separators=(",", ":")))
        elif watch:
            header = f"Every {interval or 2:g}s: {base_url}    {time.strftime('%Y-%m-%d %H:%M:%S')}"
            click.clear()  # does nothing when stdout is not a terminal: the reports then follow each other
            click.echo(f"{header}\n\n{format_stats(document, limit)}\n")
        else:
            click.echo(format_stats(document, limit))

    try:
        show()
    except OpsError as exc:
        _fail(exc)
    if not watch:
        return
    shown = 1
    try:
        while count is None or shown < count:
            _pause(interval or 2.0)
            try:
                show()
            except OpsError as exc:
                # The first answer proved the address right: keep watching through a restart, as watch(1) does.
                click.echo(f"fastws: error: {exc}", err=True)
            shown += 1
    except KeyboardInterrupt:
        pass  # Ctrl-C is how --watch ends


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _publish_body(target: str, payload: str | None, user_id: str | None, exclude: str | None) -> bytes:
    """The POST /api/publish body for `fastws push`'s arguments; a usage error exits 2."""
    fields, text = _publish_request(target, payload, user_id, exclude)
    # The payload goes through as typed, not re-encoded: numbers and key order stay exactly the user's.
    return (json.dumps(fields)[:-1] + ', "payload": ' + text + "}").encode("utf-8")


def _publish_request(
    target: str, payload: str | None, user_id: str | None, exclude: str | None
) -> tuple[dict[str, str], str]:
    """`fastws push`'s arguments as ({"channel"|"user", "exclude"?}, checked JSON payload text); errors exit 2."""
    fields: dict[str, str] = {}
    if user_id is not None:
        if payload is not None:
            raise click.UsageError("with --user, give only the JSON payload, not a CHANNEL")
        if exclude is not None:
            raise click.UsageError("--exclude applies to channel pushes, not to --user")
        if not user_id:
            raise click.UsageError("--user must not be empty")
        text, fields["user"] = target, user_id
    else:
        if payload is None:
            raise click.UsageError("missing JSON payload: fastws push CHANNEL JSON (or --user ID JSON)")
        text, fields["channel"] = payload, target
        if exclude is not None:
            fields["exclude"] = exclude
    if text == "-":
        text = sys.stdin.read()
    try:
        json.loads(text, parse_constant=_refuse_constant)
        text.encode("utf-8")
    except ValueError as exc:  # UnicodeEncodeError included: bytes that were not UTF-8 in the arguments
        click.echo(f"fastws: error: the payload is not valid JSON: {exc}", err=True)
        sys.exit(2)
    return fields, text.strip()


@main.command()
@click.argument("target", metavar="[CHANNEL]")
@click.argument("payload", metavar="JSON", required=False)
@_url_option
@_api_key_option
@click.option("--user", "user_id", metavar="ID", default=None, help="Push to this user's connections, not a channel.")
@click.option("--exclude", metavar="SOCKET_ID", default=None, help="Leave out this connection (a channel push only).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's JSON answer instead of a sentence.")
@click.option(
    "--redis",
    "redis_url",
    metavar="URL",
    envvar="FASTWS_REDIS_URL",
    default=None,
    help="Publish straight into the cluster's Redis (the nodes' redis_url) instead of a node's HTTP API. "
    "[env: FASTWS_REDIS_URL]",
)
@click.option(
    "--redis-prefix",
    metavar="PREFIX",
    envvar="FASTWS_REDIS_PREFIX",
    default="fastws",
    show_default=True,
    help="The nodes' redis_prefix. [env: FASTWS_REDIS_PREFIX]",
)
def push(
    target: str,
    payload: str | None,
    url: str,
    api_key: str | None,
    user_id: str | None,
    exclude: str | None,
    as_json: bool,
    redis_url: str | None,
    redis_prefix: str,
) -> None:
    """Publish JSON to a channel of a running server, or push it to a user's connections.

    \b
      fastws push chat.room.1 '{"event": "new-message", "data": {"text": "hi"}}'
      fastws push --user 123 '{"event": "notification", "data": {"unread": 3}}'
      fastws push --redis redis://localhost:6379/0 chat.room.1 '{"text": "hi"}'

    JSON is the payload text; `-` reads it from stdin. It is delivered as the fastws.push() payload would be.
    With --redis (or FASTWS_REDIS_URL, unless --url is given) it is published into the cluster's Redis and
    reaches every node; the count printed is of nodes. Otherwise it uses POST /api/publish, which answers clients
    on the server's machine, or anyone sending the api_key; the count is of that node's connections.
    """
    context = click.get_current_context()
    from_command_line = ParameterSource.COMMANDLINE
    url_given = context.get_parameter_source("url") == from_command_line
    redis_given = context.get_parameter_source("redis_url") == from_command_line
    if redis_url and (redis_given or not url_given):
        _push_through_redis(redis_url, redis_prefix, _publish_request(target, payload, user_id, exclude), as_json)
        return
    body = _publish_body(target, payload, user_id, exclude)
    base_url = _base_url(url)
    try:
        answer = request_json(base_url, "/api/publish", api_key=api_key or None, body=body)
    except OpsError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(answer, separators=(",", ":")))
        return
    delivered = answer.get("delivered") if isinstance(answer, dict) else None
    if not isinstance(delivered, int):
        _fail(OpsError(f"{base_url}/api/publish answered {json.dumps(answer)[:200]}, not a delivery count"))
    click.echo(f"delivered to {_count(delivered, 'connection')}")


def _push_through_redis(redis_url: str, prefix: str, request: tuple[dict[str, str], str], as_json: bool) -> None:
    """`fastws push --redis`: publish with the native publisher; prints the number of nodes reached."""
    fields, text = request
    from fastws.client import Client  # loads the native core, which only this route needs

    try:
        client = Client(redis_url=redis_url, redis_prefix=prefix)
        data = text.encode("utf-8")
        if "user" in fields:
            nodes = client.push_to_user(fields["user"], data)
        else:
            nodes = client.push(fields["channel"], data, exclude=fields.get("exclude"))
    except ValueError as exc:
        click.echo(f"fastws: error: {exc}", err=True)
        sys.exit(2)
    except ConnectionError as exc:
        click.echo(f"fastws: error: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps({"nodes": nodes}, separators=(",", ":")))
    else:
        click.echo(f"published to {_count(nodes, 'node')}")
