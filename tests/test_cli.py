"""The ``fastws`` command line, up to the point where it would start the native server."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fastws.cli import load_app, main
from fastws.errors import ConfigError

# click 8.2 keeps stderr apart by default and dropped mix_stderr, which click 8.1 needs to do so
SEPARATE_STDERR: dict[str, Any] = (
    {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner).parameters else {}
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own FASTWS_* variables must not leak into these tests."""
    for name in list(os.environ):
        if name.startswith("FASTWS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def app_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A current directory for app modules; load_app puts it on sys.path, restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        del sys.modules[name]


def serve(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner(**SEPARATE_STDERR).invoke(main, ["serve", *args], env=env)


def assert_one_line_error(result: Result, *parts: str) -> None:
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("fastws: error: ")
    assert result.stderr.count("\n") == 1
    for part in parts:
        assert part in result.stderr


def test_help_shows_defaults_and_environment_variables() -> None:
    result = serve("--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())  # undo click's wrapping
    assert "--port INTEGER TCP port to listen on. [default: 9501; env: FASTWS_PORT]" in text
    assert "[default: 100000; env: FASTWS_MAX_CONNECTIONS]" in text
    assert "[default: 60; env: FASTWS_HEARTBEAT_INTERVAL]" in text
    assert "--client-publish LIST" in text and "env: FASTWS_CLIENT_PUBLISH]" in text
    assert "--demo / --no-demo" in text and "[default: false; env: FASTWS_DEMO]" in text
    assert "--log-level [debug|info|warning|error]" in text
    assert "--config PATH" in text and "FASTWS_CONFIG" in text


def test_bad_flag_value() -> None:
    result = serve("--port", "70000")
    assert_one_line_error(result, "port = 70000", "command line --port", "must be between 0 and 65535")


def test_unparsable_flag_value_gets_the_same_one_line_error() -> None:
    assert_one_line_error(serve("--rate-burst", "lots"), "rate_burst = lots", "command line --rate-burst")


def test_bad_environment_value() -> None:
    result = serve(env={"FASTWS_IDLE_TIMEOUT": "-1"})
    assert_one_line_error(result, "idle_timeout = -1", "environment variable FASTWS_IDLE_TIMEOUT")


def test_unknown_key_in_config_file(tmp_path: Path) -> None:
    path = tmp_path / "fastws.toml"
    path.write_text("max_conections = 5\n", encoding="utf-8")
    result = serve("--config", str(path))
    assert_one_line_error(result, f"unknown key 'max_conections' in fastws.toml ({path})", "'max_connections'")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_one_line_error(serve("--config", str(tmp_path / "nope.toml")), "cannot read fastws.toml")


def test_unknown_app_module(app_dir: Path) -> None:
    result = serve("no_such_module_here:server")
    assert_one_line_error(result, "cannot import APP module 'no_such_module_here'")


def test_app_spec_needs_a_colon(app_dir: Path) -> None:
    assert_one_line_error(serve("myapp"), "APP must look like 'module:attribute'")


def test_missing_app_attribute(app_dir: Path) -> None:
    (app_dir / "fastws_test_app_attr.py").write_text("other = 1\n", encoding="utf-8")
    assert_one_line_error(serve("fastws_test_app_attr:server"), "has no attribute 'server'")


def test_missing_import_inside_the_app_keeps_its_traceback(app_dir: Path) -> None:
    (app_dir / "fastws_test_app_broken.py").write_text("import no_such_dependency_here\n", encoding="utf-8")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_here"):
        load_app("fastws_test_app_broken:server")


def test_load_app_raises_config_error(app_dir: Path) -> None:
    with pytest.raises(ConfigError, match="no module named 'no_such_module_here'"):
        load_app("no_such_module_here:server")


def test_version() -> None:
    result = CliRunner(**SEPARATE_STDERR).invoke(main, ["version"])
    assert result.exit_code == 0
    assert result.output.startswith("fastws ")


def test_python_dash_m_reports_a_bad_port() -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("FASTWS_")}
    completed = subprocess.run(
        [sys.executable, "-m", "fastws", "serve", "--port", "70000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stdout == ""
    assert completed.stderr == (
        "fastws: error: invalid setting port = 70000 (from command line --port): must be between 0 and 65535\n"
    )


def test_redis_is_an_alias_of_redis_url() -> None:
    text = " ".join(serve("--help").output.split())
    assert "--redis-url, --redis TEXT" in text and "env: FASTWS_REDIS_URL]" in text
    # A bad value through the alias names the setting's own flag.
    assert_one_line_error(serve("--redis", "http://nope"), "redis_url = http://nope", "command line --redis-url")
