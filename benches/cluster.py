#!/usr/bin/env python3
"""Cross-node fan-out benchmark: one channel, 10,000 subscribers, on one fastws node and on three nodes behind one
Redis; deliveries/s, latency, loss, and what Redis itself spends per publication.

    python3 benches/cluster.py                        # make bench-cluster: every configuration, twice (~8 min)
    python3 benches/cluster.py --repeat 1 --seconds 5 --configs 1-node,3-nodes
    python3 benches/cluster.py --fastws path/to/venv/bin/fastws

Configurations (each node is `fastws serve --workers 1`, a fresh set of nodes per configuration and repetition):

- `1-node`: one node, no Redis: the single-node figure.
- `1-node-redis`: the same node with `--redis`: what the broker adds when nothing has to cross nodes (Redis sends
  each publication back to its one subscribed node, which skips its own copy).
- `3-nodes`: three nodes sharing one Redis; the subscribers are spread round robin (3,334 / 3,333 / 3,333) and the
  publisher is on node 1, so two thirds of the deliveries go through Redis.

Each configuration runs four generator invocations (fresh subscriber connections each): `fanout` with windows of 4
and 16 outstanding messages, and `latency` at two fixed rates (`--rates`, default 5/s and 20/s, i.e. 50,000 and
200,000 deliveries/s: at a low rate each delivery is a write of its own, so one node with 10,000 subscribers is
already near one busy core at 20/s). Redis' cost is read from Redis itself around each invocation: PUBLISH calls from
`INFO commandstats`, its CPU from `INFO cpu`, and the messages it sent from `INFO stats` (total_net_output_bytes,
less the replies to commands, divided by the size of one pub/sub message, measured by a short-lived subscriber that
reads one). `PUBSUB NUMSUB` on the prefixed channel shows how many subscribers Redis has: the nodes, not the
clients.

Placement, as in benches/run.py: every fastws node and Redis share core 0 (`taskset -c 0`), the generator runs on
core 1. So the three nodes together get the same one core as the single node: the comparison is at equal server
CPU, and it shows what splitting the work costs, not what more machines would add.

Standard library only. fastws comes from `--fastws` (default: benches/.venv/bin/fastws, installed by `make bench`,
else `fastws` on PATH); the generator is built with cargo. redis-server must be installed (Debian: redis-server).
Everything listens on 127.0.0.1 and is started and stopped here, by PID; every generator run is bounded in time.
Writes benches/results/<date>-cluster.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# benches/run.py: the same helpers as the main harness.
from run import (
    LOADGEN,
    LOADGEN_DIR,
    RESULTS,
    ROOT,
    ManagedProcess,
    free_port,
    git_state,
    machine,
    rel,
    run_generator,
    run_header,
    scrub,
    wait_quiet,
)

SERVER_CPU, LOADGEN_CPU = "0", "1"
SRC_IPS = "127.0.0.1-16"
CHANNEL = "bench"
PREFIX = "fastws"  # redis_prefix, left at its default
LOGS = RESULTS / "tmp"
CONFIGS = {"1-node": (1, False), "1-node-redis": (1, True), "3-nodes": (3, True)}


def log(message: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------------
# Redis: a minimal RESP client (no redis-py: standard library only)


class Resp:
    """One connection to Redis. Counts every byte it receives, since those bytes are part of Redis' output."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        self.received = 0
        self.commands = 0

    def send(self, *args: str) -> None:
        out = [f"*{len(args)}\r\n".encode()]
        for a in args:
            b = a.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        self.sock.sendall(b"".join(out))
        self.commands += 1

    def read(self) -> Any:
        line = self.file.readline()
        if not line:
            raise ConnectionError("Redis closed the connection")
        self.received += len(line)
        kind, rest = line[:1], line[1:-2]
        if kind in (b"+", b"-"):
            if kind == b"-":
                raise RuntimeError(rest.decode())
            return rest.decode()
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.file.read(n + 2)
            self.received += len(data)
            return data[:-2]
        if kind == b"*":
            return [self.read() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected RESP reply {line!r}")

    def call(self, *args: str) -> Any:
        self.send(*args)
        return self.read()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def parse_info(text: bytes) -> dict[str, str]:
    info = {}
    for line in text.decode().splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            info[k] = v
    return info


def redis_snapshot(conn: Resp) -> dict[str, float]:
    """The counters of one moment. Redis counts a reply's bytes when it writes them, so this call's own reply is in
    the next snapshot's total_net_output_bytes: its size is returned as `own_bytes` to be taken off."""
    before = conn.received
    info = parse_info(conn.call("INFO", "everything"))
    publish = info.get("cmdstat_publish", "")
    calls = next((int(p.split("=")[1]) for p in publish.split(",") if p.startswith("calls=")), 0)
    return {
        "t": time.monotonic(),
        "publish_calls": calls,
        "commands": int(info["total_commands_processed"]),
        "net_out": int(info["total_net_output_bytes"]),
        "net_in": int(info["total_net_input_bytes"]),
        "cpu_s": float(info["used_cpu_user"]) + float(info["used_cpu_sys"]),
        "own_bytes": conn.received - before,
    }


class Probe(threading.Thread):
    """Watches the benchmark channel in Redis: the largest PUBSUB NUMSUB seen, then (once publications flow) the
    size of one pub/sub message as Redis sends it, read by subscribing for a single message. Its own traffic is
    counted, so it can be taken off Redis' totals."""

    def __init__(self, port: int, deadline: float) -> None:
        super().__init__(daemon=True)
        self.port, self.deadline = port, deadline
        self.numsub = 0
        self.message_bytes: int | None = None
        self.envelope: str | None = None
        self.received = 0
        self.commands = 0
        self.messages = 0
        self.error: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            self._run()
        except Exception as error:  # a probe failure must not stop the benchmark; it is reported
            self.error = repr(error)

    def _run(self) -> None:
        key = f"{PREFIX}:ch:{CHANNEL}"
        conn = Resp(self.port)
        try:
            # NUMSUB until the subscribers have settled (the same count for 1 s), then subscribe for one message.
            stable_since, last = time.monotonic(), -1
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                n = int(conn.call("PUBSUB", "NUMSUB", key)[1])
                self.numsub = max(self.numsub, n)
                if n != last:
                    stable_since, last = time.monotonic(), n
                elif n > 0 and time.monotonic() - stable_since > 1.0:
                    break
                time.sleep(0.1)
            if self.numsub == 0 or self.stop.is_set():
                return
            conn.sock.settimeout(max(1.0, self.deadline - time.monotonic()))
            conn.send("SUBSCRIBE", key)
            conn.read()  # ["subscribe", key, 1]
            start = conn.received
            reply = conn.read()  # ["message", key, envelope]
            self.message_bytes = conn.received - start
            self.messages = 1
            self.envelope = reply[2].decode(errors="replace")[:400]
            conn.send("UNSUBSCRIBE", key)
            # Publications that arrive before the UNSUBSCRIBE reply are Redis output too: counted, then dropped.
            while True:
                reply = conn.read()
                if reply[0] == b"message":
                    self.messages += 1
                    continue
                break
        finally:
            self.received, self.commands = conn.received, conn.commands
            conn.close()


def redis_cost(
    before: dict[str, float], after: dict[str, float], probe: Probe, publications: int, nodes: int
) -> dict[str, Any]:
    """Redis' work for `publications` publications, from its own counters."""
    publish = int(after["publish_calls"] - before["publish_calls"])
    # Commands other than the nodes' PUBLISH: heartbeats, per-channel counts, SUBSCRIBE; and ours (INFO, NUMSUB).
    ours = 1 + probe.commands
    other = int(after["commands"] - before["commands"]) - publish - ours
    out = int(after["net_out"] - before["net_out"])
    # What is not a message to a node: replies to PUBLISH (":3\r\n", 4 bytes each while fewer than 10 nodes listen),
    # about 5 bytes per other command (+OK, :0, a short SUBSCRIBE reply), our own snapshot and the probe's traffic.
    replies = publish * (3 + len(str(max(probe.numsub, 1)))) + other * 5
    to_nodes = out - replies - before["own_bytes"] - probe.received
    messages = to_nodes / probe.message_bytes if probe.message_bytes else None
    cpu = after["cpu_s"] - before["cpu_s"]
    seconds = after["t"] - before["t"]
    return {
        "nodes": nodes,
        "publications": publications,
        "publish_calls": publish,
        "publish_calls_per_publication": round(publish / publications, 4) if publications else None,
        "numsub_max": probe.numsub,
        "message_bytes": probe.message_bytes,
        "net_output_bytes": out,
        "output_bytes_per_publication": round(out / publications, 1) if publications else None,
        "messages_to_nodes": round(messages) if messages is not None else None,
        "messages_per_publication": (
            round(messages / publications, 3) if messages is not None and publications else None
        ),
        "other_commands": other,
        "cpu_s": round(cpu, 3),
        "cpu_us_per_publication": round(cpu * 1e6 / publications, 2) if publications else None,
        "cpu_util": round(cpu / seconds, 3) if seconds > 0 else None,
        "seconds": round(seconds, 2),
        "probe_messages": probe.messages,
        "probe_error": probe.error,
        "envelope_sample": probe.envelope,
    }


# ------------------------------------------------------------------------------------------------------------------
# Processes


def node_command(fastws: str, port: int, redis_url: str | None) -> list[str]:
    cmd = ["taskset", "-c", SERVER_CPU, fastws, "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--client-publish", "bench*", "--rate-limit", "0", "--log-level", "warning"]
    cmd += ["--max-connections", "100000", "--idle-timeout", "0", "--heartbeat-interval", "0"]
    return cmd + (["--redis", redis_url] if redis_url else [])


def row_of(line: dict[str, Any]) -> str:
    if line.get("scenario") == "fanout":
        return f"fanout S={line.get('subscribers_requested')} W={line.get('window')}"
    return f"latency S={line.get('subscribers_requested')} {line.get('rate'):g}/s"


def summarize(line: dict[str, Any], redis: dict[str, Any] | None) -> str:
    lat = line.get("latency_ms") or {}
    load = f"W={line.get('window')}" if line.get("scenario") == "fanout" else f"{line.get('rate')}/s"
    text = (
        f"{line.get('scenario')} S={line.get('subscribers')} {load}: {line.get('delivered_per_s')} deliveries/s, "
        f"{line.get('published_per_s')} pub/s, loss {line.get('loss')}, p50 {lat.get('p50')} p99 {lat.get('p99')} ms, "
        f"servers cpu {line.get('server_cpu_util')} {line.get('server_cpu_util_each') or ''}"
    )
    if redis:
        text += (
            f"; Redis: {redis['publish_calls_per_publication']} PUBLISH and {redis['messages_per_publication']} "
            f"messages per publication, NUMSUB {redis['numsub_max']}, {redis['cpu_us_per_publication']} µs CPU"
        )
    return text


# ------------------------------------------------------------------------------------------------------------------


def main() -> int:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--repeat", type=int, default=2, help="runs of every configuration (default 2)")
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run (default 10)")
    parser.add_argument("--windows", default="4,16", help="fanout windows, one run each (default 4,16)")
    parser.add_argument("--rates", default="5,20", help="latency rates in publications/s, one run each")
    parser.add_argument("--fastws", help="the fastws executable (default: benches/.venv/bin/fastws, else PATH)")
    parser.add_argument("--quiet-wait", type=float, default=30.0, help="wait up to this long for idle CPUs per run")
    parser.add_argument("--out", help="results file (default benches/results/<date>-cluster.json)")
    args = parser.parse_args()

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}")
    fastws = args.fastws or next(
        (str(p) for p in [ROOT / "benches" / ".venv" / "bin" / "fastws"] if p.exists()), shutil.which("fastws")
    )
    if not fastws:
        parser.error("no fastws executable: pass --fastws, or run `make bench` once to create benches/.venv")
    redis_server = shutil.which("redis-server")
    if not redis_server:
        parser.error("redis-server is not installed (Debian: apt-get install redis-server)")
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        parser.error("this benchmark needs 2 cores and taskset (util-linux) to pin servers and generator apart")

    # 10,000 subscriber sockets in the generator, 10,000 server sides in the single node: raise the open-file limit
    # to the hard limit, for this process and everything it starts.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.subscribers + 1000:
        log(f"warning: the hard open-file limit is {hard}; {args.subscribers} subscribers need more")

    log("building the load generator (cargo build --release)")
    subprocess.run(["cargo", "build", "--release", "--locked", "--quiet"], cwd=LOADGEN_DIR, check=True)

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    out = Path(args.out) if args.out else RESULTS / f"{started.strftime('%Y-%m-%d')}-cluster.json"
    if not args.out and out.exists():  # a second run the same day keeps the first one
        out = RESULTS / f"{started.strftime('%Y-%m-%d-%H%M')}-cluster.json"
    command = os.environ.get("BENCH_COMMAND") or "python3 " + " ".join([rel(sys.argv[0]), *sys.argv[1:]])
    if os.environ.get("BENCH_COMMAND") and sys.argv[1:]:
        command += " BENCH_ARGS='" + scrub(" ".join(sys.argv[1:])) + "'"
    s = f"{args.seconds:g}"
    invocations: list[tuple[str, list[str]]] = [
        (f"fanout W={w}", ["fanout", "--window", w, "--seconds", s, "--warmup", "0.5"]) for w in args.windows.split(",")
    ] + [(f"latency {r}/s", ["latency", "--rate", r, "--seconds", s]) for r in args.rates.split(",")]
    timeout = 90 + 2 * args.seconds + args.subscribers / 200

    def version(cmd: list[str]) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.TimeoutExpired):
            return None

    # The fastws executable is a console script of a venv: that venv's Python knows the installed version.
    version_code = "from importlib.metadata import version; print(version('fastws'))"
    versions = {
        "fastws": version([str(Path(fastws).parent / "python"), "-c", version_code]),
        "fastws_source": git_state(),
        "redis": version([redis_server, "--version"]),
        "rustc": version(["rustc", "--version"]),
        "python": platform.python_version(),
    }
    runs: list[dict[str, Any]] = []

    def save(complete: bool) -> None:
        result = {
            **run_header("cluster", complete, command, started, t0),
            "config": {
                "repeat": args.repeat,
                "subscribers": args.subscribers,
                "seconds": args.seconds,
                "server_cpu": SERVER_CPU,
                "loadgen_cpu": LOADGEN_CPU,
                "src_ips": SRC_IPS,
                "node": " ".join(node_command("fastws", 0, "redis://127.0.0.1:REDIS/0")).replace(
                    "--port 0", "--port PORT"
                ),
                "redis": f"taskset -c {SERVER_CPU} redis-server --port REDIS --save '' --appendonly no",
                "generator": [
                    f"[taskset -c {LOADGEN_CPU}] {rel(LOADGEN)} {' '.join(a)} --subscribers {args.subscribers} "
                    f"--url ws://127.0.0.1:PORT1/[,ws://127.0.0.1:PORT2/,...] --publish-url ws://127.0.0.1:PORT1/ "
                    f"--server-pid PID1[,PID2,...] --src-ips {SRC_IPS}"
                    for _, a in invocations
                ],
                "configs": {c: {"nodes": CONFIGS[c][0], "redis": CONFIGS[c][1]} for c in configs},
            },
            "machine": machine(),
            "versions": versions,
            "servers": {c: {"description": c} for c in configs},
            "runs": runs,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    def stop_on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop_on_signal)

    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    redis = ManagedProcess(
        "redis-server",
        ["taskset", "-c", SERVER_CPU, redis_server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
        + ["--appendonly", "no", "--daemonize", "no"],
        "cluster-redis.log",
    )
    try:
        if not redis.wait_port(redis_port):
            log("redis-server did not start:\n" + redis.log_tail())
            return 1
        control = Resp(redis_port)
        log(f"redis-server PID {redis.pid} on port {redis_port}")
        for rep in range(1, args.repeat + 1):
            for config in configs:
                n_nodes, with_redis = CONFIGS[config]
                label = f"{config}-r{rep}"
                log(f"rep {rep}/{args.repeat} · {config}")
                ports = [free_port() for _ in range(n_nodes)]
                nodes = [
                    ManagedProcess(
                        f"node {i + 1}",
                        node_command(fastws, port, redis_url if with_redis else None),
                        f"cluster-{label}-node{i + 1}.log",
                    )
                    for i, port in enumerate(ports)
                ]
                base = {"server": config, "rep": rep, "nodes": n_nodes, "redis": with_redis}
                try:
                    if not all(n.wait_port(p) for n, p in zip(nodes, ports)):
                        runs.append(
                            {**base, "row": "start", "ok": False, "error": "a node did not start"}
                            | {"server_logs": [n.log_tail() for n in nodes]}
                        )
                        continue
                    time.sleep(0.5)  # start-up work (imports, Redis registration) settles before measuring
                    urls = [f"ws://127.0.0.1:{p}/" for p in ports]
                    for name, gen_args in invocations:
                        load = wait_quiet(args.quiet_wait)
                        cmd = ["taskset", "-c", LOADGEN_CPU, rel(LOADGEN), *gen_args]
                        cmd += ["--subscribers", str(args.subscribers), "--url", ",".join(urls)]
                        cmd += ["--publish-url", urls[0], "--server-pid", ",".join(str(n.pid) for n in nodes)]
                        cmd += ["--src-ips", SRC_IPS, "--channel", CHANNEL, "--tag", f"{config} {name}"]
                        probe = None
                        before = None
                        if with_redis:
                            before = redis_snapshot(control)
                            probe = Probe(redis_port, time.monotonic() + timeout)
                            probe.start()
                        lines, error = run_generator(cmd, timeout, summarize_lines=False)
                        redis_data = None
                        if probe is not None and before is not None:
                            probe.stop.set()
                            probe.join(timeout=10)
                            after = redis_snapshot(control)
                            published = max((int(line.get("published_total") or 0) for line in lines), default=0)
                            redis_data = redis_cost(before, after, probe, published, n_nodes)
                        for line in lines:
                            problems = []
                            if line.get("loss") or line.get("subscribers_lost") or not line.get("drained", True):
                                problems.append("loss or dropped connections")
                            if line.get("subscribe_failures") or line.get("publisher_errors"):
                                problems.append("subscribe failures or publisher errors")
                            if redis_data and (redis_data["publish_calls_per_publication"] or 0) > 1.01:
                                problems.append("more than one PUBLISH per publication")
                            log("  " + summarize(line, redis_data))
                            runs.append(
                                {
                                    **base,
                                    "row": row_of(line),
                                    "ok": not problems and error is None,
                                    "problems": problems,
                                    "machine_load": load,
                                    "data": line,
                                    "redis_cost": redis_data,
                                }
                            )
                        if error or not lines:
                            log(f"  {name} failed: {error or 'no output'}")
                            runs.append({**base, "row": name, "ok": False, "error": error or "no output"})
                        save(complete=False)
                finally:
                    for node in nodes:
                        crashed = node.stop()
                        if crashed is not None:
                            log(f"{node.name} of {config} exited during the run (status {crashed})")
                            runs.append(
                                {**base, "row": node.name, "ok": False, "error": f"exited with status {crashed}"}
                                | {"server_log": node.log_tail()}
                            )
                    # Anything a node logged at warning level or above is worth seeing next to the figures.
                    for node in nodes:
                        text = node.log_tail(4000).strip()
                        if text:
                            runs.append(
                                {**base, "row": f"{node.name} log", "ok": True, "server_log": text}
                                | {"problems": ["the node logged warnings or errors"]}
                            )
        control.close()
    except KeyboardInterrupt as stop:
        save(complete=False)
        log(f"stopped ({stop}); kept {len(runs)} results in {rel(out)}")
        return 130
    finally:
        redis.stop()
    save(complete=True)
    failed = [r for r in runs if not r.get("ok")]
    log(f"wrote {rel(out)} ({len(runs)} results, {time.monotonic() - t0:.0f} s; {len(failed)} failed or lost data)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
