"""The settings model of a fastws server: names, types, defaults, validation, and where values come from.

Every setting is at once a keyword of ``fastws.Server(...)``, a key of a flat ``fastws.toml``, an environment
variable ``FASTWS_<NAME>`` and a ``fastws serve --<name>`` flag (the command line is generated from ``SETTINGS``).
Later sources win: built-in default < ``Server(...)`` keywords < ``fastws.toml`` < environment < command line.

Each value is converted and checked where it is read, so a bad value is reported with the source it came from,
in one line, even when a later source overrides it.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from fastws.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

__all__ = [
    "SETTINGS",
    "SettingSpec",
    "Settings",
    "check_keyword_names",
    "describe_mode",
    "resolve_settings",
    "validate_sources",
]

Kind = Literal["str", "int", "float", "bool", "list"]
Check = Callable[[Any], Any]


@dataclass(frozen=True)
class Settings:
    """The resolved settings of one server. Build it with :func:`resolve_settings`; times are in seconds."""

    host: str
    port: int
    workers: int
    max_connections: int
    max_message_size: int
    max_channels_per_connection: int
    client_publish: tuple[str, ...]
    heartbeat_interval: float
    idle_timeout: float
    allowed_origins: tuple[str, ...]
    api_key: str | None = field(repr=False)
    jwt_secret: str | None = field(repr=False)
    jwt_public_key: str | None
    jwt_algorithms: tuple[str, ...]
    jwt_audience: str | None
    jwt_issuer: str | None
    jwt_leeway: float
    jwt_user_claim: str
    rate_limit: float
    rate_burst: int
    handshake_timeout: float
    max_pending_handshakes: int
    backlog: int
    hook_timeout: float
    send_queue_bytes: int
    redis_url: str | None
    redis_prefix: str
    node_ttl: float
    demo: bool
    log_level: str
    log_format: str

    def as_dict(self) -> dict[str, Any]:
        """The settings by name, with lists as Python lists (to hand to the native core, or dump as JSON)."""
        result: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            result[f.name] = list(value) if isinstance(value, tuple) else value
        return result


@dataclass(frozen=True)
class SettingSpec:
    """One setting: its name, kind of value, built-in default and one-line help, plus how to check a value.

    ``check`` receives a value already converted to the kind and returns it (possibly normalised) or raises
    ``_Invalid``. ``nullable`` settings may be None, written as an empty string in text sources.
    """

    name: str
    kind: Kind
    default: Any
    help: str
    nullable: bool = False
    choices: tuple[str, ...] = ()
    check: Check | None = None
    secret: bool = False  # never echoed in error messages
    default_text: str | None = None  # shown instead of the default when that depends on the machine
    aliases: tuple[str, ...] = ()  # extra command-line flags, e.g. --redis for --redis-url

    @property
    def env_var(self) -> str:
        return f"FASTWS_{self.name.upper()}"

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def describe_default(self) -> str:
        """The default as shown in ``--help``."""
        if self.default_text is not None:
            return self.default_text
        if self.default is None or self.default == ():
            return "none"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        if isinstance(self.default, float):
            return f"{self.default:g}"  # 60 rather than 60.0: seconds read better whole
        return str(self.default)


class _Invalid(Exception):
    """A value failed a check; the message is the reason, which the caller completes into a ConfigError."""


def _between(low: int, high: int) -> Check:
    def check(value: Any) -> Any:
        if not low <= value <= high:
            raise _Invalid(f"must be between {low} and {high}")
        return value

    return check


def _at_least(low: int) -> Check:
    def check(value: Any) -> Any:
        if value < low:
            raise _Invalid(f"must be at least {low}")
        return value

    return check


def _not_negative(value: float) -> float:
    if value < 0:
        raise _Invalid("must not be negative (0 disables it)")
    return value


def _positive(value: float) -> float:
    if value <= 0:
        raise _Invalid("must be greater than 0")
    return value


def _non_empty(value: str) -> str:
    if not value:
        raise _Invalid("must not be empty")
    return value


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _redis_url(value: str) -> str:
    if not value.startswith(_REDIS_SCHEMES):
        raise _Invalid("must start with " + ", ".join(_REDIS_SCHEMES[:-1]) + f" or {_REDIS_SCHEMES[-1]}")
    return value


def _redis_prefix(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", value):
        raise _Invalid("must be non-empty and use only letters, digits and _ . : -")
    return value


# ES512 is absent: the Rust verifier (jsonwebtoken) does not implement it, so accepting it here would fail later.
_JWT_ALGORITHMS = tuple("HS256 HS384 HS512 RS256 RS384 RS512 ES256 ES384 PS256 PS384 PS512 EdDSA".split())
_PUBLIC_KEY_ALGORITHMS = tuple(name for name in _JWT_ALGORITHMS if not name.startswith("HS"))
_JWT_ALGORITHM_BY_UPPER = {name.upper(): name for name in _JWT_ALGORITHMS}


def _jwt_algorithms(value: tuple[str, ...]) -> tuple[str, ...]:
    names: list[str] = []
    for item in value:
        if item.lower() == "none":
            raise _Invalid("the 'none' algorithm accepts unsigned tokens and is refused")
        name = _JWT_ALGORITHM_BY_UPPER.get(item.upper())
        if name is None:
            raise _Invalid(f"unknown algorithm {item!r} (known: {', '.join(_JWT_ALGORITHMS)})")
        if name not in names:
            names.append(name)
    return tuple(names)


SETTINGS: dict[str, SettingSpec] = {
    spec.name: spec
    for spec in (
        SettingSpec("host", "str", "0.0.0.0", "Interface to listen on.", check=_non_empty),
        SettingSpec("port", "int", 9501, "TCP port to listen on.", check=_between(0, 65535)),
        SettingSpec(
            "workers",
            "int",
            os.cpu_count() or 1,
            "Worker threads of the async runtime.",
            check=_at_least(1),
            default_text="number of CPUs",
        ),
        SettingSpec("max_connections", "int", 100_000, "Most connections open at once.", check=_at_least(1)),
        SettingSpec(
            "max_message_size", "int", 65_536, "Largest client message, in bytes.", check=_between(1, 4_294_967_295)
        ),
        SettingSpec(
            "max_channels_per_connection",
            "int",
            100,
            "Most channels one connection may subscribe to.",
            check=_at_least(1),
        ),
        SettingSpec("client_publish", "list", (), "Glob patterns of channels clients may publish to."),
        SettingSpec(
            "heartbeat_interval", "float", 60.0, "Seconds between pings to a client; 0 disables.", check=_not_negative
        ),
        SettingSpec(
            "idle_timeout",
            "float",
            600.0,
            "Seconds of silence before a client is dropped; 0 disables.",
            check=_not_negative,
        ),
        SettingSpec(
            "allowed_origins", "list", (), "Origin glob patterns allowed to connect, or '*'; none means same-origin."
        ),
        SettingSpec("api_key", "str", None, "Secret key of trusted server-side callers.", nullable=True, secret=True),
        SettingSpec("jwt_secret", "str", None, "HMAC secret verifying client JWTs (HS*).", nullable=True, secret=True),
        SettingSpec(
            "jwt_public_key", "str", None, "Public key verifying client JWTs: PEM text or a PEM file.", nullable=True
        ),
        SettingSpec(
            "jwt_algorithms",
            "list",
            (),
            "Accepted JWT algorithms; none means chosen by the key.",
            check=_jwt_algorithms,
        ),
        SettingSpec("jwt_audience", "str", None, "Required JWT 'aud' claim.", nullable=True),
        SettingSpec("jwt_issuer", "str", None, "Required JWT 'iss' claim.", nullable=True),
        SettingSpec("jwt_leeway", "float", 0.0, "Seconds of clock skew allowed on JWT times.", check=_not_negative),
        SettingSpec("jwt_user_claim", "str", "sub", "JWT claim holding the user id.", check=_non_empty),
        SettingSpec(
            "rate_limit",
            "float",
            100.0,
            "Messages per second a connection may send (0: no limit).",
            check=_not_negative,
        ),
        SettingSpec("rate_burst", "int", 200, "Messages a connection may send in a burst.", check=_at_least(1)),
        SettingSpec("handshake_timeout", "float", 10.0, "Seconds allowed for the handshake.", check=_positive),
        SettingSpec(
            "max_pending_handshakes",
            "int",
            1024,
            "TCP connections still in their HTTP upgrade at once; more are dropped (slowloris).",
            check=_at_least(1),
        ),
        SettingSpec(
            "backlog",
            "int",
            2048,
            "Connections the kernel queues before the server accepts them (capped by net.core.somaxconn).",
            check=_at_least(1),
        ),
        SettingSpec("hook_timeout", "float", 5.0, "Seconds a Python hook may take.", check=_positive),
        SettingSpec(
            "send_queue_bytes",
            "int",
            1_048_576,
            "Bytes queued for a slow client before it is dropped.",
            check=_at_least(1024),
        ),
        SettingSpec(
            "redis_url",
            "str",
            None,
            "Redis URL joining the nodes that share it into one cluster (docs/scaling.md).",
            nullable=True,
            check=_redis_url,
            aliases=("--redis",),
        ),
        SettingSpec(
            "redis_prefix", "str", "fastws", "Prefix of every fastws key and channel in Redis.", check=_redis_prefix
        ),
        SettingSpec(
            "node_ttl",
            "float",
            15.0,
            "Seconds before a node that stopped refreshing its Redis key counts as gone (its members are removed).",
            check=_positive,
        ),
        SettingSpec(
            "demo",
            "bool",
            False,
            "Serve the demo chat page at / (also client publish on demo.*, anonymous presence-demo.*); "
            "`fastws serve` without an APP turns it on.",
        ),
        SettingSpec("log_level", "str", "info", "Log level.", choices=("debug", "info", "warning", "error")),
        SettingSpec("log_format", "str", "text", "Log format.", choices=("text", "json")),
    )
}


@dataclass(frozen=True)
class _Source:
    """Where values come from, named as error messages name it."""

    label: str
    strict: bool = False  # Server(...) keywords must have the right Python type; other sources may be text
    text: bool = False  # values are typed text (environment, command line): shown unquoted in messages
    base_dir: Path | None = None  # relative key file paths in fastws.toml are relative to the file

    def invalid(self, spec: SettingSpec, raw: Any, reason: str) -> ConfigError:
        if spec.secret:
            shown = "***"
        elif self.text and isinstance(raw, str) and raw.isprintable():
            shown = raw
        else:
            shown = repr(raw)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return ConfigError(f"invalid setting {spec.name} = {shown} (from {self.label}): {reason}")


_DEFAULT = _Source("default")


@dataclass(frozen=True)
class _Given:
    """The winning value of a setting, kept with its raw form and source for errors found later."""

    spec: SettingSpec
    value: Any
    raw: Any
    source: _Source

    def invalid(self, reason: str) -> ConfigError:
        return self.source.invalid(self.spec, self.raw, reason)


# (setting, value as written, source) triples, as sources yield them
_Values = Iterator[tuple[SettingSpec, Any, _Source]]

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_KIND_TEXT = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}


def _parse_text(kind: Kind, text: str) -> Any:
    stripped = text.strip()
    if kind == "bool":
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise _Invalid("must be true or false (also 1/0, yes/no, on/off)")
    try:
        return int(stripped) if kind == "int" else float(stripped)
    except ValueError:
        raise _Invalid(f"must be {_KIND_TEXT[kind]}") from None


def _coerce_list(raw: Any) -> tuple[str, ...]:
    # A single string is a comma-separated list in every source, so `Server(allowed_origins="*")` works too.
    if isinstance(raw, str):
        items: list[str] = raw.split(",")
    elif isinstance(raw, (list, tuple)) and all(isinstance(item, str) for item in raw):
        items = list(raw)
    else:
        raise _Invalid(f"must be a list of strings or a comma-separated string, not {type(raw).__name__}")
    return tuple(item.strip() for item in items if item.strip())


def _coerce_str(spec: SettingSpec, raw: str) -> str | None:
    if spec.nullable and raw == "":
        return None  # lets a later source unset a value, e.g. FASTWS_REDIS_URL=
    if spec.choices:
        if raw.lower() not in spec.choices:
            raise _Invalid(f"must be one of {', '.join(spec.choices)}")
        return raw.lower()
    return raw


def _coerce(spec: SettingSpec, raw: Any, source: _Source) -> Any:
    """Convert ``raw`` to the setting's kind; text is parsed unless the source is strict."""
    kind = spec.kind
    if kind == "list":
        return _coerce_list(raw)
    if kind == "str" and isinstance(raw, str):
        return _coerce_str(spec, raw)
    if isinstance(raw, str) and not source.strict:
        raw = _parse_text(kind, raw)
    # bool is an int subclass, but True is not a port
    is_number = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    if kind == "bool" and isinstance(raw, bool):
        return raw
    if kind == "int" and is_number and isinstance(raw, int):
        return raw
    if kind == "float" and is_number:
        if not math.isfinite(raw):
            raise _Invalid("must be a finite number")
        return float(raw)
    raise _Invalid(f"must be {_KIND_TEXT[kind]}, not {type(raw).__name__}")


def _convert(spec: SettingSpec, raw: Any, source: _Source) -> _Given:
    try:
        value = _coerce(spec, raw, source)
        if spec.check is not None and value is not None:
            value = spec.check(value)
    except _Invalid as exc:
        raise source.invalid(spec, raw, str(exc)) from None
    return _Given(spec, value, raw, source)


def _unknown(phrase: str, name: str) -> ConfigError:
    matches = difflib.get_close_matches(name, SETTINGS, n=1)
    hint = f"did you mean {matches[0]!r}?" if matches else "not a fastws setting (see fastws serve --help)"
    return ConfigError(f"{phrase}: {hint}")


def check_keyword_names(kwargs: Mapping[str, Any]) -> None:
    """Raise ConfigError for the first keyword that is not a setting, suggesting the closest name."""
    for name in kwargs:
        if name not in SETTINGS:
            raise _unknown(f"unknown keyword {name!r} in Server({name}=...)", name)


def _read_toml(path: str | os.PathLike[str], named_by: str) -> _Values:
    where = f"fastws.toml ({os.fspath(path)})"
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read {where}{named_by}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid TOML in {where}: {exc}") from None
    source = _Source(where, base_dir=Path(path).parent)
    for key, raw in data.items():
        if isinstance(raw, dict):
            raise ConfigError(f"table {key!r} in {where}: the file is flat, write each setting as a top-level key")
        if key not in SETTINGS:
            raise _unknown(f"unknown key {key!r} in {where}", key)
        yield SETTINGS[key], raw, source


def _keyword_values(app_kwargs: Mapping[str, Any]) -> _Values:
    check_keyword_names(app_kwargs)
    for name, raw in app_kwargs.items():
        if raw is not None:  # None is what an unset keyword looks like; the default is None for nullables
            yield SETTINGS[name], raw, _Source(f"Server({name}=...)", strict=True)


def _cli_values(cli: Mapping[str, Any]) -> _Values:
    for name, raw in cli.items():
        if raw is None:
            continue
        if name not in SETTINGS:
            raise _unknown(f"unknown command-line setting {name!r}", name)
        spec = SETTINGS[name]
        yield spec, raw, _Source(f"command line {spec.flag}", text=True)


def _given_values(
    app_kwargs: Mapping[str, Any] | None,
    config_path: str | os.PathLike[str] | None,
    env: Mapping[str, str],
    cli: Mapping[str, Any] | None,
) -> _Values:
    """Yield every value given by a source, lowest precedence first."""
    yield from _keyword_values(app_kwargs or {})
    if config_path is not None:
        yield from _read_toml(config_path, "")
    elif env.get("FASTWS_CONFIG"):
        yield from _read_toml(env["FASTWS_CONFIG"], " (named by environment variable FASTWS_CONFIG)")
    for spec in SETTINGS.values():
        if spec.env_var in env:
            yield spec, env[spec.env_var], _Source(f"environment variable {spec.env_var}", text=True)
    yield from _cli_values(cli or {})


def _load_pem(given: _Given) -> str:
    """Return jwt_public_key's PEM text: the value itself, or the content of the file it names."""
    value: str = given.value
    if value.lstrip().startswith("-----BEGIN"):
        return value
    path = Path(value).expanduser()
    if given.source.base_dir is not None:
        path = given.source.base_dir / path  # an absolute path stays as it is
    try:
        pem = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise given.invalid(f"cannot read key file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise given.invalid(f"key file {path} is not PEM text") from None
    if not pem.lstrip().startswith("-----BEGIN"):
        raise given.invalid(f"key file {path} is not PEM text (no '-----BEGIN' line)")
    return pem


def _collect(
    app_kwargs: Mapping[str, Any] | None,
    config_path: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None,
    cli: Mapping[str, Any] | None,
) -> dict[str, _Given]:
    """Check every given value and return the winner of each setting (defaults included)."""
    won = {name: _Given(spec, spec.default, spec.default, _DEFAULT) for name, spec in SETTINGS.items()}
    for spec, raw, source in _given_values(app_kwargs, config_path, os.environ if env is None else env, cli):
        won[spec.name] = _convert(spec, raw, source)
    key = won["jwt_public_key"]
    if key.value is not None:
        won["jwt_public_key"] = _Given(key.spec, _load_pem(key), key.raw, key.source)
    return won


def _jwt_algorithms_for(won: Mapping[str, _Given]) -> tuple[str, ...]:
    """Resolve jwt_algorithms against the keys: pick them when left empty, refuse algorithm confusion."""
    has_secret = won["jwt_secret"].value is not None
    has_public_key = won["jwt_public_key"].value is not None
    given = won["jwt_algorithms"]
    chosen: tuple[str, ...] = given.value
    if not chosen:
        # Every public-key algorithm: the core keeps those whose family matches the key (RSA, EC or Ed25519).
        return (("HS256",) if has_secret else ()) + (_PUBLIC_KEY_ALGORITHMS if has_public_key else ())
    if not has_secret and not has_public_key:
        raise given.invalid("needs jwt_secret or jwt_public_key as well")
    for name in chosen:
        # Verifying an HMAC token with a public key (or the reverse) is the classic JWT forgery
        if name.startswith("HS") and not has_secret:
            raise given.invalid(f"{name} needs jwt_secret; only jwt_public_key is set (algorithm confusion)")
        if not name.startswith("HS") and not has_public_key:
            raise given.invalid(f"{name} needs jwt_public_key; only jwt_secret is set (algorithm confusion)")
    return chosen


def validate_sources(
    app_kwargs: Mapping[str, Any] | None = None,
    *,
    config_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> None:
    """Check each value the given sources set, as resolve_settings would, without the rules between settings.

    For checking some sources before the others are known: ``fastws serve`` checks the operator's file,
    environment and flags before importing the app, whose ``Server(...)`` keywords may supply, say, the key
    that the command line's ``--jwt-algorithms`` needs. Arguments are those of :func:`resolve_settings`.
    """
    _collect(app_kwargs, config_path, env, cli)


def resolve_settings(
    app_kwargs: Mapping[str, Any] | None = None,
    *,
    config_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    cli: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge every source into Settings; later wins: default < app_kwargs < fastws.toml < env < cli.

    ``app_kwargs`` are ``Server(...)`` keywords (None values count as not given). The toml file is
    ``config_path``, else the one named by ``FASTWS_CONFIG`` in ``env``, which defaults to ``os.environ``.
    ``cli`` maps setting names to flag values; None values count as not given. Raises ConfigError.
    """
    won = _collect(app_kwargs, config_path, env, cli)
    values = {name: given.value for name, given in won.items()}
    values["jwt_algorithms"] = _jwt_algorithms_for(won)
    return Settings(**values)


def describe_mode(s: Settings, has_auth_hook: bool = False, accepted: Sequence[str] | None = None) -> str:
    """How clients are authenticated, in words for the startup log.

    ``accepted`` is the list of algorithms the core actually accepts (those matching the key), when known.
    An authenticate hook decides alone, so JWT settings beside it are reported as unused.
    """
    if has_auth_hook:
        return "auth hook (JWT settings unused)" if s.jwt_algorithms else "auth hook"
    if s.jwt_algorithms:
        return f"JWT auth ({', '.join(s.jwt_algorithms if accepted is None else accepted)})"
    return "open mode: no authentication"
