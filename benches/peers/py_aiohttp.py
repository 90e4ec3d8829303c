"""Peer: `aiohttp` web server with WebSocketResponse, fan-out by awaiting send_str on each member in turn."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import WSMsgType, web
from common import BACKLOG, MAX_MESSAGE, install_uvloop, parse, parse_args, publication, ready, subscribed

channels: dict[str, set[web.WebSocketResponse]] = {}


async def handler(request: web.Request) -> web.WebSocketResponse:  # noqa: C901
    ws = web.WebSocketResponse(heartbeat=None, max_msg_size=MAX_MESSAGE, compress=False)
    await ws.prepare(request)
    joined: list[str] = []
    try:
        async for message in ws:
            if message.type != WSMsgType.TEXT:
                continue
            event, channel, payload = parse(message.data)
            if not isinstance(channel, str):
                continue
            if event == "subscribe":
                members = channels.setdefault(channel, set())
                if ws not in members:
                    members.add(ws)
                    joined.append(channel)
                await ws.send_str(subscribed(channel).decode())
            elif event == "publish":
                members = channels.get(channel)
                if members:
                    out = publication(channel, payload).decode()
                    for member in list(members):
                        if member is not ws and not member.closed:
                            await member.send_str(out)
    finally:
        for channel in joined:
            members = channels.get(channel)
            if members is not None:
                members.discard(ws)
                if not members:
                    del channels[channel]
    return ws


async def main() -> None:
    args = parse_args("aiohttp")
    app = web.Application()
    app.router.add_get("/", handler)
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=BACKLOG)
    await site.start()
    ready("aiohttp", args.host, args.port, f"(aiohttp {aiohttp.__version__})")
    await asyncio.Event().wait()


if __name__ == "__main__":
    install_uvloop()
    asyncio.run(main())
