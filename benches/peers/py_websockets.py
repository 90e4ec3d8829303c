"""Peer: Python `websockets` (asyncio implementation), fan-out with `websockets.broadcast`."""

from __future__ import annotations

import asyncio

import websockets
from common import BACKLOG, MAX_MESSAGE, install_uvloop, parse, parse_args, publication, ready, subscribed
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

channels: dict[str, set[ServerConnection]] = {}


async def handler(ws: ServerConnection) -> None:  # noqa: C901
    joined: list[str] = []
    try:
        async for message in ws:
            event, channel, payload = parse(message)
            if not isinstance(channel, str):
                continue
            if event == "subscribe":
                members = channels.setdefault(channel, set())
                if ws not in members:
                    members.add(ws)
                    joined.append(channel)
                await ws.send(subscribed(channel).decode())
            elif event == "publish":
                members = channels.get(channel)
                if members:
                    # One encoded frame, written to every other member without waiting on any of them.
                    broadcast([m for m in members if m is not ws], publication(channel, payload).decode())
    except ConnectionClosed:
        pass  # the load generator drops its connections without a closing handshake at the end of a run
    finally:
        for channel in joined:
            members = channels.get(channel)
            if members is not None:
                members.discard(ws)
                if not members:
                    del channels[channel]


async def main() -> None:
    args = parse_args("websockets")
    async with serve(
        handler,
        args.host,
        args.port,
        compression=None,
        ping_interval=None,
        max_size=MAX_MESSAGE,
        backlog=BACKLOG,
    ) as server:
        ready("websockets", args.host, args.port, f"(websockets {websockets.__version__})")
        await server.serve_forever()


if __name__ == "__main__":
    install_uvloop()
    asyncio.run(main())
