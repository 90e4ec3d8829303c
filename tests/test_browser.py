"""The built-in pages in headless Chromium: the demo chat (`GET /` with `demo` on) and the live dashboard."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import StartServer
from playwright.sync_api import Browser, Page, Request, Route, expect, sync_playwright
from websockets.sync.client import ClientConnection, connect

import fastws

ARTIFACTS = Path(__file__).parent / "artifacts"
WAIT_MS = 10_000
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

NewPage = Callable[[], Page]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    expect.set_options(timeout=WAIT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def new_page(browser: Browser) -> Iterator[NewPage]:
    """Open a page in a fresh browser context (its own storage, like a separate user); all closed after the test."""
    with ExitStack() as stack:

        def open_page() -> Page:
            context = browser.new_context(viewport={"width": 1100, "height": 720})
            stack.callback(context.close)
            context.set_default_timeout(WAIT_MS)
            return context.new_page()

        yield open_page


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


def join_chat(page: Page, url: str, name: str, room: str = "lobby") -> None:
    page.goto(url)
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    page.fill("#name", name)
    page.fill("#room", room)
    page.click("#join")
    expect(page.locator("#members")).to_contain_text(name)


def say(page: Page, text: str) -> None:
    page.fill("#message", text)
    page.click("#send")


def members(page: Page) -> list[str]:
    return page.locator("#members .member-name").all_inner_texts()


def test_demo_chat_between_two_browsers(start_server: StartServer, new_page: NewPage) -> None:
    server = start_server(demo=True)
    url = f"http://127.0.0.1:{server.port}/"
    ana, bob = new_page(), new_page()
    join_chat(ana, url, "Ana")
    join_chat(bob, url, "Bob")

    # Presence: each sees both members (Bob from Ana's member_added, Ana from Bob's subscribed reply).
    expect(ana.locator("#members li")).to_have_count(2)
    expect(bob.locator("#members li")).to_have_count(2)
    assert sorted(members(ana)) == sorted(members(bob)) == ["Ana", "Bob"]
    expect(ana.locator("#members li", has_text="Ana")).to_contain_text("(you)")
    expect(ana.locator("#members-count")).to_have_text("2")

    # A message reaches the other member, and the sender shows its own (the server does not echo it).
    say(ana, "Olá, Bob!")
    from_ana = bob.locator("#messages .msg", has_text="Olá, Bob!")
    expect(from_ana).to_have_count(1)
    expect(from_ana.locator(".who")).to_contain_text("Ana")
    expect(ana.locator("#messages .msg.mine", has_text="Olá, Bob!")).to_have_count(1)

    # User text is shown as text, never parsed as HTML.
    say(bob, "<b>bold</b> & <img src=x onerror=alert(1)>")
    bubble = ana.locator("#messages .msg .bubble", has_text="<b>bold</b>")
    expect(bubble).to_have_text("<b>bold</b> & <img src=x onerror=alert(1)>")
    assert bubble.locator("b, img").count() == 0

    # A push from Python (an "event" payload is delivered as-is) shows in both pages.
    payload = {"event": "client-message", "data": {"name": "server", "text": "hi from Python"}}
    assert fastws.push("demo.lobby", payload) == 2
    for page in (ana, bob):
        expect(page.locator("#messages .msg.server", has_text="hi from Python")).to_have_count(1)
    expect(ana.locator("#push-example")).to_contain_text('fastws.push("demo.lobby"')
    screenshot(ana, "demo-chat.png")

    # Bob leaves by closing his page: Ana gets member_removed.
    bob.close()
    expect(ana.locator("#members li")).to_have_count(1)
    assert members(ana) == ["Ana"]
    expect(ana.locator("#messages")).to_contain_text("Bob left")


def test_demo_page_shows_error_frames_and_raw_publications(start_server: StartServer, new_page: NewPage) -> None:
    # One channel per connection: the page's second subscription (presence) gets a real error 4005.
    server = start_server(demo=True, max_channels_per_connection=1)
    page = new_page()
    page.goto(f"http://127.0.0.1:{server.port}/")
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    page.fill("#name", "Ana")
    page.click("#join")
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("4005")
    expect(page.locator("#error")).to_contain_text("presence-demo.lobby")
    expect(page.locator("#messages .note.error")).to_contain_text("4005")

    # A publication without an "event" of its own arrives wrapped as "message": shown as raw JSON.
    with connect(f"ws://127.0.0.1:{server.port}/") as ws:
        assert json.loads(ws.recv(5))["event"] == "connected"
        ws.send(json.dumps({"event": "publish", "data": {"channel": "demo.lobby", "payload": {"x": "<i>1</i>"}}}))
        expect(page.locator("#messages .msg.server .bubble")).to_have_text('{"x":"<i>1</i>"}')


def test_demo_page_reconnects_and_rejoins_after_a_restart(start_server: StartServer, new_page: NewPage) -> None:
    server = start_server(demo=True)
    port = server.port
    page = new_page()
    join_chat(page, f"http://127.0.0.1:{port}/", "Ana", room="restart")
    server.stop()  # every client gets 1001 "going away": reconnect with backoff
    expect(page.locator("#status")).to_have_attribute("data-state", re.compile("closed|connecting"))
    expect(page.locator("#members li")).to_have_count(0)
    start_server(demo=True, port=port)
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    expect(page.locator("#members li")).to_have_count(1)
    assert members(page) == ["Ana"]
    assert fastws.channel_stats("presence-demo.restart")["members"] == 1


def test_dashboard_follows_connections_channels_and_rates(start_server: StartServer, new_page: NewPage) -> None:
    server = start_server()
    page = new_page()
    page.goto(f"http://127.0.0.1:{server.port}/dashboard")
    expect(page.locator("#connections")).to_have_text(re.compile(r"^\d+$"))
    before = int(page.inner_text("#connections"))

    with ExitStack() as stack:
        clients: list[ClientConnection] = []
        for _ in range(3):
            # Nobody reads the ticks below: an unbounded receive buffer lets each client close at once.
            ws = stack.enter_context(connect(f"ws://127.0.0.1:{server.port}/", max_queue=None))
            assert json.loads(ws.recv(5))["event"] == "connected"
            ws.send(json.dumps({"event": "subscribe", "data": {"channel": "dash.room"}}))
            assert json.loads(ws.recv(5)) == {"event": "subscribed", "channel": "dash.room"}
            clients.append(ws)

        page.wait_for_function(
            f"Number(document.getElementById('connections').textContent) >= {before + 3}", timeout=WAIT_MS
        )
        row = page.locator("#channels-table tbody tr", has_text="dash.room")
        expect(row).to_contain_text("public")
        expect(row.locator("td").nth(2)).to_have_text("3")
        expect(page.locator("#channels-count")).not_to_have_text(re.compile(r"^[–0]$"))

        # Traffic both ways while the page polls: the rates it derives from the counters rise above 0.
        stop = threading.Event()

        def traffic() -> None:
            while not stop.wait(0.05):
                fastws.push("dash.room", {"event": "tick", "data": {}})
                clients[0].send(json.dumps({"event": "ping"}))

        pusher = threading.Thread(target=traffic, daemon=True)
        pusher.start()
        try:
            for rate in ("#rate-in", "#rate-out"):
                page.wait_for_function(
                    f"Number(document.querySelector('{rate}').textContent.replace(/,/g, '')) > 0", timeout=WAIT_MS
                )
            page.wait_for_timeout(2_000)  # a few more points on the charts for the screenshot
            screenshot(page, "dashboard.png")
        finally:
            stop.set()
            pusher.join(5)
    expect(page.locator("#auth-error")).to_be_hidden()


def test_dashboard_with_api_key_sends_it_as_a_bearer_header(start_server: StartServer, new_page: NewPage) -> None:
    server = start_server(api_key="k")
    url = f"http://127.0.0.1:{server.port}/dashboard?api_key=k"
    page = new_page()
    stats_requests: list[Request] = []

    def record(request: Request) -> None:
        if "/stats" in request.url:
            stats_requests.append(request)

    page.on("request", record)
    page.goto(url)
    expect(page.locator("#connections")).to_have_text(re.compile(r"^\d+$"))
    expect(page.locator("#uptime")).not_to_have_text("–")
    assert stats_requests
    for request in stats_requests:
        assert request.url.endswith("/stats"), "the key travels in a header, not in the URL"
        assert request.all_headers().get("authorization") == "Bearer k"

    # The same page whose fetches lose the header gets the server's 401 and says so.
    refused = new_page()

    def strip_key(route: Route) -> None:
        route.continue_(headers={k: v for k, v in route.request.headers.items() if k.lower() != "authorization"})

    refused.route("**/stats", strip_key)
    refused.goto(url)
    expect(refused.locator("#auth-error")).to_be_visible()
    expect(refused.locator("#auth-error")).to_contain_text("401")
    expect(refused.locator("#auth-error")).to_contain_text("api_key")
    expect(refused.locator("#connections")).to_have_text("–")


def test_dashboard_explains_a_403_for_non_local_clients(start_server: StartServer, new_page: NewPage) -> None:
    server = start_server()
    page = new_page()

    def via_proxy(route: Route) -> None:
        route.continue_(headers={**route.request.headers, "x-forwarded-for": "203.0.113.7"})

    page.route("**/stats", via_proxy)
    page.goto(f"http://127.0.0.1:{server.port}/dashboard")
    expect(page.locator("#auth-error")).to_be_visible()
    expect(page.locator("#auth-error")).to_contain_text("403")
    expect(page.locator("#auth-error")).to_contain_text("only local clients")
