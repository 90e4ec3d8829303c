"""`fastws serve app:server` as a user runs it: a subprocess, the seed's clients, and a clean SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

# The seed document's app: pushes `new-message` to chat.room.1 from a timer in the server process.
APP = """
import fastws

server = fastws.Server()

@server.every(0.1)
def announce():
    fastws.to_channel("chat.room.1").push({
        "event": "new-message",
        "data": {"user": "João", "message": "Olá a todos!", "timestamp": 1732291200},
    })
"""

# The seed's JavaScript quick start, verbatim but for the port; console.log is captured into the page.
SEED_PAGE = """<!doctype html>
<html><body><pre id="log"></pre>
<script>
console.log = (...args) => { document.getElementById('log').textContent += JSON.stringify(args) + '\\n'; };
</script>
<script>
const ws = new WebSocket('ws://localhost:PORT?token=YOUR_JWT_TOKEN');

ws.onopen = () => {
    // Subscrever a um canal
    ws.send(JSON.stringify({
        event: 'subscribe',
        data: { channel: 'chat.room.1' }
    }));
};

ws.onmessage = (event) => {
    const data = JSON.parse(event.data);
    console.log('Mensagem recebida:', data);
};
</script></body></html>
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Served:
    def __init__(self, process: subprocess.Popen[str], port: int, first_line: str) -> None:
        self.process, self.port, self.first_line = process, port, first_line


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    port = free_port()
    # The browser test's page is a file:// page, whose Origin is "null": a cross-origin page, refused by default.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FASTWS_ALLOWED_ORIGINS": "null"}
    process = subprocess.Popen(
        [sys.executable, "-m", "fastws", "serve", "app:server", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = process.stderr.readline()
        assert "listening on ws://0.0.0.0:" in line, line
        yield Served(process, port, line)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        if process.stderr:
            process.stderr.close()


def test_startup_line_names_address_and_mode(served: Served) -> None:
    assert f"ws://0.0.0.0:{served.port}" in served.first_line
    assert "open mode: no authentication" in served.first_line


async def test_seed_client_receives_the_apps_pushes_and_sigterm_closes_cleanly(served: Served) -> None:
    async with connect(f"ws://localhost:{served.port}?token=YOUR_JWT_TOKEN") as ws:
        assert json.loads(await ws.recv())["event"] == "connected"
        await ws.send(json.dumps({"event": "subscribe", "data": {"channel": "chat.room.1"}}))
        assert json.loads(await ws.recv()) == {"event": "subscribed", "channel": "chat.room.1"}
        message = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert message["event"] == "new-message"
        assert message["channel"] == "chat.room.1"
        assert message["data"]["message"] == "Olá a todos!"

        served.process.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1001, "going away")
    assert await asyncio.to_thread(served.process.wait, 10) == 0


def test_ctrl_c_stops_with_exit_code_0(served: Served) -> None:
    served.process.send_signal(signal.SIGINT)
    assert served.process.wait(10) == 0


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_seed_javascript_quick_start_in_a_real_browser(served: Served, tmp_path: Path) -> None:
    """The seed's browser snippet, unmodified but for the port, receives `new-message` in headless Chromium."""
    executable = chromium_path()
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    playwright = pytest.importorskip("playwright.sync_api")
    page_file = tmp_path / "seed.html"
    page_file.write_text(SEED_PAGE.replace("PORT", str(served.port)))
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page()
            page.goto(page_file.as_uri())
            page.wait_for_function("document.getElementById('log').textContent.includes('new-message')", timeout=10_000)
            lines = page.inner_text("#log").splitlines()
            artifacts = Path(__file__).parent / "artifacts"
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / "seed-quick-start.png"))
        finally:
            browser.close()
    logged = [json.loads(line) for line in lines]
    assert ["Mensagem recebida:", {"event": "subscribed", "channel": "chat.room.1"}] in logged
    received = [data for label, data in logged if data.get("event") == "new-message"]
    assert received and received[0]["channel"] == "chat.room.1"
    assert received[0]["data"]["user"] == "João"


def test_bad_setting_stops_startup_with_exit_code_2(tmp_path: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "fastws", "serve", "--port", "70000"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "port" in result.stderr and "--port" in result.stderr
    assert time.monotonic() - started < 30


def test_port_in_use_is_one_line_and_exit_code_1(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "fastws", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
