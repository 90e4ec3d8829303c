"""The ``fastws`` command line: ``fastws serve [APP]`` runs a server, ``fastws version`` prints the version.

``serve`` has one option per setting, generated from :data:`fastws.config.SETTINGS`. Options default to None
so that only the flags actually given reach :func:`fastws.config.resolve_settings`, which layers them over
the app's ``Server(...)`` keywords, ``fastws.toml`` and the environment.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from fastws.config import SETTINGS, SettingSpec, validate_sources
from fastws.errors import ConfigError

if TYPE_CHECKING:
    # The ignore covers checkouts where fastws.app is not written yet; "unused-ignore" keeps it quiet otherwise.
    from fastws.app import Server  # type: ignore[import-not-found, unused-ignore]

__all__ = ["load_app", "main"]

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
    return click.option(spec.flag, spec.name, type=str, default=None, metavar=metavar, help=help_text)


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
