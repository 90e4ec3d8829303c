"""push scenario: calls/s of `fastws.Server.push()` from one Python thread, and whether every delivery arrived.

Starts a `fastws.Server` in this process, has the load generator (`loadgen subscribe`, a subprocess) connect and
subscribe S clients to one channel, then times N back-to-back `push()` calls of a small dict from the main thread.
`push()` serialises the payload and queues one shared frame per subscriber; it never waits on a socket, so the calls/s
figure is the cost of the call itself. The generator then reports how many of the N × S frames arrived and over what
span (end-to-end deliveries/s). Prints one JSON line.

With --server-cpu, this whole process (the Python thread and the server's tokio workers) is pinned to that core;
the generator is pinned to --loadgen-cpu. Run by benches/run.py; by hand:

    benches/.venv/bin/python benches/push_bench.py --loadgen benches/loadgen/target/release/loadgen --port 18999
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loadgen", required=True, help="path of the loadgen binary")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--pushes", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--server-cpu", type=int, default=None, help="pin this process to one core")
    parser.add_argument("--loadgen-cpu", type=int, default=None, help="pin the generator to one core")
    parser.add_argument("--src-ips", default="127.0.0.1")
    parser.add_argument("--tag", default=None)
    args = parser.parse_args()

    # Pin before the server starts, so its runtime threads inherit the affinity.
    if args.server_cpu is not None:
        os.sched_setaffinity(0, {args.server_cpu})
    import fastws

    channel = "bench.push"
    server = fastws.Server(
        host="127.0.0.1",
        port=args.port,
        workers=args.workers,
        log_level="warning",
        idle_timeout=0,
        heartbeat_interval=0,
        max_connections=100_000,
    )
    server.start()
    generator = None
    try:
        command = [args.loadgen, "subscribe", "--url", f"ws://127.0.0.1:{args.port}/", "--channel", channel]
        command += ["--subscribers", str(args.subscribers), "--expect", str(args.pushes), "--timeout", "60"]
        command += ["--src-ips", args.src_ips]
        if args.loadgen_cpu is not None:
            command = ["taskset", "-c", str(args.loadgen_cpu), *command]
        generator = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert generator.stdout is not None
        ready = json.loads(generator.stdout.readline() or "{}")
        if not ready.get("ready"):
            raise RuntimeError(f"the generator did not get ready: {ready}")

        payload = {"event": "tick", "data": {"user": "ana", "text": "hello", "n": 0}}
        for i in range(100):  # warm the call path on a channel nobody is subscribed to
            server.push("bench.warmup", {"n": i})
        usage0 = resource.getrusage(resource.RUSAGE_SELF)
        started, thread_cpu0 = time.perf_counter(), time.thread_time()
        queued = 0
        for i in range(args.pushes):
            payload["data"]["n"] = i  # type: ignore[index]
            queued += server.push(channel, payload)
        elapsed, thread_cpu = time.perf_counter() - started, time.thread_time() - thread_cpu0
        usage1 = resource.getrusage(resource.RUSAGE_SELF)

        # The generator prints its counts when every subscriber got every push, or at its timeout.
        result_holder: list[str] = []
        reader = threading.Thread(target=lambda: result_holder.append(generator.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout=90)
        delivered = json.loads(result_holder[0]) if result_holder and result_holder[0] else {}
        usage2 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_calls = (usage1.ru_utime + usage1.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
        cpu_total = (usage2.ru_utime + usage2.ru_stime) - (usage0.ru_utime + usage0.ru_stime)
        expected = args.pushes * args.subscribers
        line = {
            "scenario": "push",
            **({"tag": args.tag} if args.tag else {}),
            "workers": args.workers,
            "pinned": args.server_cpu is not None,
            "subscribers": ready.get("subscribers"),
            "pushes": args.pushes,
            "seconds": round(elapsed, 4),
            "calls_per_s": round(args.pushes / elapsed, 1),
            "us_per_call": round(elapsed * 1e6 / args.pushes, 2),
            # The calling thread's CPU alone: the call's cost, without the waits for a core the others had.
            "caller_cpu_us_per_call": round(thread_cpu * 1e6 / args.pushes, 2),
            "queued": queued,
            "expected": expected,
            "delivered": delivered.get("delivered"),
            "all_delivered": bool(delivered.get("all_delivered")) and queued == expected,
            "loss": expected - int(delivered.get("delivered") or 0),
            "delivered_per_s": delivered.get("delivered_per_s"),
            "delivery_span_seconds": delivered.get("delivery_span_seconds"),
            "subscriber_endings": delivered.get("subscriber_endings"),
            "process_cpu_s_during_calls": round(cpu_calls, 3),
            "process_cpu_s_total": round(cpu_total, 3),
            "server_cpu_us_per_delivery": round(cpu_total * 1e6 / max(1, int(delivered.get("delivered") or 0)), 4),
            "server_rss_bytes": rss_bytes(),
        }
        print(json.dumps(line), flush=True)
        return 0
    finally:
        if generator is not None and generator.poll() is None:
            generator.terminate()
            try:
                generator.wait(timeout=5)
            except subprocess.TimeoutExpired:
                generator.kill()
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
