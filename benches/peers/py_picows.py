"""Peer: `picows` (Cython WebSocket frames on asyncio transports), fan-out by writing one encoded frame per member."""

from __future__ import annotations

import asyncio

import picows
from common import BACKLOG, install_uvloop, parse, parse_args, publication, ready, subscribed
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

channels: dict[str, dict[int, WSTransport]] = {}


class Peer(WSListener):
    def __init__(self) -> None:
        self.joined: list[str] = []

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.TEXT:
            event, channel, payload = parse(frame.get_payload_as_bytes())
            if not isinstance(channel, str):
                return
            if event == "subscribe":
                members = channels.setdefault(channel, {})
                if id(transport) not in members:
                    members[id(transport)] = transport
                    self.joined.append(channel)
                transport.send(WSMsgType.TEXT, subscribed(channel))
            elif event == "publish":
                members = channels.get(channel)
                if members:
                    out = publication(channel, payload)
                    me = id(transport)
                    for key, member in members.items():
                        if key != me:
                            member.send(WSMsgType.TEXT, out)
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for channel in self.joined:
            members = channels.get(channel)
            if members is not None:
                members.pop(id(transport), None)
                if not members:
                    del channels[channel]


def factory(_request: WSUpgradeRequest) -> Peer:
    return Peer()


async def main() -> None:
    args = parse_args("picows")
    server = await ws_create_server(factory, args.host, args.port, backlog=BACKLOG, max_frame_size=65536)
    ready("picows", args.host, args.port, f"(picows {picows.__version__})")
    await server.serve_forever()


if __name__ == "__main__":
    install_uvloop()
    asyncio.run(main())
