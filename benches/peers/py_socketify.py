"""Peer: `socketify` (uWebSockets under Python through cffi), fan-out with uWS's native pub/sub (`app.publish`).

uWS topics do the fan-out in C++: a subscribe calls `ws.subscribe(channel)`, a publish calls `app.publish` once.
socketify's `ws.publish` is the same call as `app.publish` (it would include the sender if the sender were
subscribed; the bench publisher never is). Backpressure is set to 1 MiB, as fastws's send_queue_bytes.
"""

from __future__ import annotations

from importlib.metadata import version

from common import MAX_MESSAGE, parse, parse_args, publication, ready, subscribed
from socketify import App, AppListenOptions, CompressOptions, OpCode

args = parse_args("socketify")
app = App()


def on_message(ws, message, opcode) -> None:  # type: ignore[no-untyped-def]
    event, channel, payload = parse(message)
    if not isinstance(channel, str):
        return
    if event == "subscribe":
        ws.subscribe(channel)
        ws.send(subscribed(channel), OpCode.TEXT)
    elif event == "publish":
        app.publish(channel, publication(channel, payload), OpCode.TEXT)


app.ws(
    "/*",
    {
        "compression": CompressOptions.DISABLED,
        "max_payload_length": MAX_MESSAGE,
        "idle_timeout": 0,
        "max_backpressure": 1024 * 1024,
        "close_on_backpressure_limit": False,
        "send_pings_automatically": False,
        "message": on_message,
    },
)
app.listen(
    AppListenOptions(port=args.port, host=args.host),
    lambda config: ready("socketify", args.host, args.port, f"(socketify {version('socketify')})"),
)
app.run()
