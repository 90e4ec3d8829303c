"""The settings model: defaults, the four sources and their precedence, parsing, validation and error messages."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from fastws.config import SETTINGS, Settings, check_keyword_names, describe_mode, resolve_settings, validate_sources
from fastws.errors import ConfigError

PEM = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fastws.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(**sources: Any) -> str:
    """Resolve with the given sources (no process environment), expecting a ConfigError; return its message."""
    sources.setdefault("env", {})
    with pytest.raises(ConfigError) as info:
        resolve_settings(**sources)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_settings_fields_match_the_specs() -> None:
    assert [f.name for f in dataclasses.fields(Settings)] == list(SETTINGS)


def test_defaults() -> None:
    s = resolve_settings(env={})
    assert (s.host, s.port, s.workers) == ("0.0.0.0", 9501, os.cpu_count() or 1)
    assert (s.max_connections, s.max_message_size, s.max_channels_per_connection) == (100_000, 65_536, 100)
    assert s.client_publish == () and s.allowed_origins == ()
    assert (s.heartbeat_interval, s.idle_timeout) == (60.0, 600.0)
    assert s.api_key is s.jwt_secret is s.jwt_public_key is s.jwt_audience is s.jwt_issuer is None
    assert (s.jwt_algorithms, s.jwt_leeway, s.jwt_user_claim) == ((), 0.0, "sub")
    assert (s.rate_limit, s.rate_burst) == (100.0, 200)
    assert (s.handshake_timeout, s.hook_timeout, s.send_queue_bytes) == (10.0, 5.0, 1_048_576)
    assert (s.redis_url, s.redis_prefix, s.node_ttl) == (None, "fastws", 15.0)
    assert (s.demo, s.log_level, s.log_format) == (False, "info", "text")
    assert describe_mode(s) == "open mode: no authentication"


def test_keywords() -> None:
    s = resolve_settings({"port": 8000, "heartbeat_interval": 5, "client_publish": ["chat.*"], "demo": True}, env={})
    assert (s.port, s.heartbeat_interval, s.client_publish, s.demo) == (8000, 5.0, ("chat.*",), True)
    assert isinstance(s.heartbeat_interval, float)


def test_keywords_set_to_none_count_as_not_given() -> None:
    assert resolve_settings({"port": None, "redis_url": None}, env={}).port == 9501


def test_single_string_keyword_for_a_list_is_comma_separated() -> None:
    assert resolve_settings({"allowed_origins": "https://a.test, https://*.b.test"}, env={}).allowed_origins == (
        "https://a.test",
        "https://*.b.test",
    )


def test_toml_file(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path, 'port = 8001\nidle_timeout = 1.5\nallowed_origins = ["*"]\ndemo = true\nlog_level = "DEBUG"\n'
    )
    s = resolve_settings(config_path=path, env={})
    assert (s.port, s.idle_timeout, s.allowed_origins, s.demo, s.log_level) == (8001, 1.5, ("*",), True, "debug")


def test_toml_file_named_by_fastws_config(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = 8002\n")
    assert resolve_settings(env={"FASTWS_CONFIG": str(path)}).port == 8002
    other = tmp_path / "other.toml"
    other.write_text("port = 8003\n", encoding="utf-8")
    assert resolve_settings(config_path=other, env={"FASTWS_CONFIG": str(path)}).port == 8003


def test_environment() -> None:
    env = {"FASTWS_PORT": "8004", "FASTWS_RATE_LIMIT": "2.5", "FASTWS_REDIS_URL": "redis://r:6379/0", "OTHER": "x"}
    s = resolve_settings(env=env)
    assert (s.port, s.rate_limit, s.redis_url) == (8004, 2.5, "redis://r:6379/0")


def test_command_line_values() -> None:
    s = resolve_settings(env={}, cli={"port": "8005", "demo": True, "client_publish": "a,b", "host": None})
    assert (s.port, s.demo, s.client_publish, s.host) == (8005, True, ("a", "b"), "0.0.0.0")


def test_precedence_chain(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = 3\n")
    kwargs, env, cli = {"port": 2}, {"FASTWS_PORT": "4"}, {"port": "5"}
    assert resolve_settings(kwargs, config_path=path, env=env, cli=cli).port == 5
    assert resolve_settings(kwargs, config_path=path, env=env).port == 4
    assert resolve_settings(kwargs, config_path=path, env={}).port == 3
    assert resolve_settings(kwargs, env={}).port == 2
    assert resolve_settings(env={}).port == 9501


def test_an_empty_string_unsets_an_optional_setting(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'redis_url = "redis://localhost"\n')
    assert resolve_settings(config_path=path, env={"FASTWS_REDIS_URL": ""}).redis_url is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("a.*,b", ("a.*", "b")), (" a.* , , b ,", ("a.*", "b")), ("", ()), ("single", ("single",))],
)
def test_lists_from_the_environment(text: str, expected: tuple[str, ...]) -> None:
    assert resolve_settings(env={"FASTWS_CLIENT_PUBLISH": text}).client_publish == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("On", True)]
    + [("false", False), ("0", False), ("No", False), ("off", False), (" off ", False)],
)
def test_booleans_from_text(text: str, expected: bool) -> None:
    assert resolve_settings(env={"FASTWS_DEMO": text}).demo is expected


def test_bad_boolean() -> None:
    message = config_error(env={"FASTWS_DEMO": "maybe"})
    assert message.startswith("invalid setting demo = maybe (from environment variable FASTWS_DEMO): ")


def test_port_out_of_range_message() -> None:
    assert config_error(env={"FASTWS_PORT": "70000"}) == (
        "invalid setting port = 70000 (from environment variable FASTWS_PORT): must be between 0 and 65535"
    )


def test_max_message_size_fits_the_native_field() -> None:
    # The connection keeps it as a u32 (rust/conn/wire.rs): a larger value is refused, not silently cut.
    assert config_error(env={"FASTWS_MAX_MESSAGE_SIZE": "4294967296"}).endswith("must be between 1 and 4294967295")
    assert resolve_settings(env={"FASTWS_MAX_MESSAGE_SIZE": "4294967295"}).max_message_size == 4_294_967_295


def test_port_zero_is_allowed() -> None:
    assert resolve_settings({"port": 0}, env={}).port == 0


@pytest.mark.parametrize("name", ["heartbeat_interval", "idle_timeout", "jwt_leeway"])
def test_negative_time_is_refused_and_zero_allowed(name: str) -> None:
    env_var = f"FASTWS_{name.upper()}"
    assert f"invalid setting {name} = -1 (from environment variable {env_var})" in config_error(env={env_var: "-1"})
    assert getattr(resolve_settings(env={env_var: "0"}), name) == 0.0


@pytest.mark.parametrize(
    ("sources", "source_text"),
    [
        ({"app_kwargs": {"max_connections": 0}}, "(from Server(max_connections=...))"),
        ({"env": {"FASTWS_MAX_CONNECTIONS": "0"}}, "(from environment variable FASTWS_MAX_CONNECTIONS)"),
        ({"cli": {"max_connections": "0"}}, "(from command line --max-connections)"),
    ],
)
def test_errors_name_the_key_and_the_source(sources: dict[str, Any], source_text: str) -> None:
    message = config_error(**sources)
    assert message.startswith("invalid setting max_connections = 0 ")
    assert source_text in message
    assert message.endswith("must be at least 1")


def test_toml_errors_name_the_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "max_connections = 0\n")
    assert config_error(config_path=path) == (
        f"invalid setting max_connections = 0 (from fastws.toml ({path})): must be at least 1"
    )


def test_a_bad_value_is_reported_even_when_overridden() -> None:
    message = config_error(env={"FASTWS_PORT": "abc"}, cli={"port": "9000"})
    assert message == "invalid setting port = abc (from environment variable FASTWS_PORT): must be an integer"


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"port": "9501"}, "must be an integer, not str"),
        ({"port": True}, "must be an integer, not bool"),
        ({"port": 9501.0}, "must be an integer, not float"),
        ({"rate_limit": "10"}, "must be a number, not str"),
        ({"demo": 1}, "must be true or false, not int"),
        ({"host": 1}, "must be a string, not int"),
        ({"client_publish": [1]}, "must be a list of strings or a comma-separated string, not list"),
    ],
)
def test_keywords_need_the_right_python_type(kwargs: dict[str, Any], reason: str) -> None:
    name = next(iter(kwargs))
    message = config_error(app_kwargs=kwargs)
    assert f"(from Server({name}=...))" in message
    assert message.endswith(reason)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_times_must_be_finite(text: str) -> None:
    assert config_error(env={"FASTWS_NODE_TTL": text}).endswith("must be a finite number")


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"FASTWS_WORKERS": "0"}, "must be at least 1"),
        ({"FASTWS_SEND_QUEUE_BYTES": "1023"}, "must be at least 1024"),
        ({"FASTWS_RATE_LIMIT": "-1"}, "must not be negative (0 disables it)"),
        ({"FASTWS_HOOK_TIMEOUT": "0"}, "must be greater than 0"),
        ({"FASTWS_JWT_USER_CLAIM": ""}, "must not be empty"),
        ({"FASTWS_REDIS_URL": "http://localhost"}, "must start with redis://, rediss:// or unix://"),
        ({"FASTWS_REDIS_PREFIX": "a b"}, "must be non-empty and use only letters, digits and _ . : -"),
        ({"FASTWS_LOG_LEVEL": "verbose"}, "must be one of debug, info, warning, error"),
        ({"FASTWS_LOG_FORMAT": "xml"}, "must be one of text, json"),
    ],
)
def test_value_checks(env: dict[str, str], reason: str) -> None:
    assert config_error(env=env).endswith(reason)


def test_secrets_are_not_echoed() -> None:
    message = config_error(app_kwargs={"api_key": 12345})
    assert message.startswith("invalid setting api_key = *** ")
    assert "12345" not in message
    assert "hunter2" not in repr(resolve_settings({"jwt_secret": "hunter2"}, env={}))


def test_unknown_toml_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "prot = 1\n")
    assert config_error(config_path=path) == f"unknown key 'prot' in fastws.toml ({path}): did you mean 'port'?"


def test_unknown_toml_key_without_a_close_match(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "zzz = 1\n")
    assert config_error(config_path=path).startswith(f"unknown key 'zzz' in fastws.toml ({path}): not a ")


def test_toml_must_be_flat(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nport = 1\n")
    message = config_error(config_path=path)
    assert message.startswith(f"table 'server' in fastws.toml ({path}): ")


def test_invalid_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "port = \n")
    assert config_error(config_path=path).startswith(f"invalid TOML in fastws.toml ({path}): ")


def test_missing_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"
    assert config_error(config_path=path) == f"cannot read fastws.toml ({path}): No such file or directory"
    assert config_error(env={"FASTWS_CONFIG": str(path)}) == (
        f"cannot read fastws.toml ({path}) (named by environment variable FASTWS_CONFIG): No such file or directory"
    )


def test_public_key_as_pem_text() -> None:
    s = resolve_settings(env={"FASTWS_JWT_PUBLIC_KEY": PEM})
    assert s.jwt_public_key == PEM
    assert s.jwt_algorithms == ("RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "PS384", "PS512", "EdDSA")


def test_public_key_from_a_file(tmp_path: Path) -> None:
    key = tmp_path / "public.pem"
    key.write_text(PEM, encoding="utf-8")
    assert resolve_settings({"jwt_public_key": str(key)}, env={}).jwt_public_key == PEM


def test_relative_key_path_in_toml_is_relative_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "public.pem").write_text(PEM, encoding="utf-8")
    path = write_toml(tmp_path, 'jwt_public_key = "keys/public.pem"\n')
    assert resolve_settings(config_path=path, env={}).jwt_public_key == PEM


def test_unreadable_key_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    message = config_error(env={"FASTWS_JWT_PUBLIC_KEY": str(missing)})
    assert message.startswith(
        f"invalid setting jwt_public_key = {missing} (from environment variable FASTWS_JWT_PUBLIC_KEY): "
    )
    assert message.endswith(f"cannot read key file {missing}: No such file or directory")


def test_key_file_without_pem(tmp_path: Path) -> None:
    key = tmp_path / "public.der"
    key.write_bytes(b"\x30\x82\xff\x00")
    assert config_error(app_kwargs={"jwt_public_key": str(key)}).endswith(f"key file {key} is not PEM text")


@pytest.mark.parametrize("name", ["none", "None", "NONE"])
def test_none_algorithm_is_refused(name: str) -> None:
    message = config_error(env={"FASTWS_JWT_SECRET": "s", "FASTWS_JWT_ALGORITHMS": f"HS256,{name}"})
    assert message.startswith(f"invalid setting jwt_algorithms = HS256,{name} (from environment variable")
    assert "'none' algorithm" in message


def test_unknown_algorithm() -> None:
    assert "unknown algorithm 'HS1'" in config_error(app_kwargs={"jwt_secret": "s", "jwt_algorithms": ["HS1"]})


def test_algorithm_names_are_normalised() -> None:
    s = resolve_settings({"jwt_public_key": PEM, "jwt_algorithms": ["eddsa", "es384", "ES384"]}, env={})
    assert s.jwt_algorithms == ("EdDSA", "ES384")


def test_hmac_algorithm_with_only_a_public_key_is_refused() -> None:
    message = config_error(app_kwargs={"jwt_public_key": PEM}, cli={"jwt_algorithms": "RS256,HS256"})
    assert message.startswith("invalid setting jwt_algorithms = RS256,HS256 (from command line --jwt-algorithms): ")
    assert "HS256 needs jwt_secret" in message and "algorithm confusion" in message


def test_public_key_algorithm_with_only_a_secret_is_refused() -> None:
    message = config_error(env={"FASTWS_JWT_SECRET": "s", "FASTWS_JWT_ALGORITHMS": "ES256"})
    assert "ES256 needs jwt_public_key" in message and "algorithm confusion" in message


def test_algorithms_without_any_key_are_refused() -> None:
    assert "needs jwt_secret or jwt_public_key" in config_error(app_kwargs={"jwt_algorithms": ["HS256"]})


def test_automatic_algorithms_and_mode() -> None:
    secret = resolve_settings({"jwt_secret": "s"}, env={})
    assert secret.jwt_algorithms == ("HS256",)
    assert describe_mode(secret) == "JWT auth (HS256)"
    both = resolve_settings({"jwt_secret": "s", "jwt_public_key": PEM}, env={})
    assert both.jwt_algorithms[:3] == ("HS256", "RS256", "RS384") and "EdDSA" in both.jwt_algorithms
    # The core reports which of them match the key; the start-up line shows those.
    assert describe_mode(both, accepted=["HS256", "RS256"]) == "JWT auth (HS256, RS256)"
    assert describe_mode(both, has_auth_hook=True) == "auth hook (JWT settings unused)"
    assert describe_mode(resolve_settings(env={}), has_auth_hook=True) == "auth hook"


def test_unknown_keyword_with_suggestion() -> None:
    with pytest.raises(ConfigError, match=r"^unknown keyword 'max_conections' in Server\(max_conections=\.\.\.\): "):
        check_keyword_names({"port": 1, "max_conections": 5})
    assert config_error(app_kwargs={"max_conections": 5}).endswith("did you mean 'max_connections'?")


def test_unknown_command_line_setting() -> None:
    assert config_error(cli={"prot": "1"}) == "unknown command-line setting 'prot': did you mean 'port'?"


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        resolve_settings({"port": -1}, env={})


def test_as_dict() -> None:
    d = resolve_settings({"client_publish": ("a", "b")}, env={}).as_dict()
    assert list(d) == list(SETTINGS)
    assert d["client_publish"] == ["a", "b"] and d["port"] == 9501


def test_validate_sources_checks_values_but_not_rules_between_settings() -> None:
    # The app's Server(jwt_secret=...) may supply the key the command line's algorithms need
    validate_sources(env={}, cli={"jwt_algorithms": "HS256"})
    with pytest.raises(ConfigError, match="command line --port"):
        validate_sources(env={}, cli={"port": "70000"})
