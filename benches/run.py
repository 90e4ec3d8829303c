#!/usr/bin/env python3
"""fastws benchmark harness: installs the peers, builds the load generator, runs every scenario × server, writes
benches/results/<date>[-quick].json and regenerates docs/benchmarks.md (through benches/report.py).

    python3 benches/run.py            # the full run (make bench): every scenario × server, twice
    python3 benches/run.py --quick    # fanout S=1000 W=16 for 3 s, fastws + websockets (make bench-quick)
    python3 benches/run.py --servers fastws,node-ws --scenarios fanout-1k,idle-10k --repeat 1 --seconds 5

Runs with the system python3 and the standard library only; the bench venv (benches/.venv) holds fastws (a release
build of this tree, `pip install .`), the Python peers and matplotlib. Every server listens on 127.0.0.1 on a port
below the ephemeral range; the generator only connects to 127.0.0.0/8. Each server is pinned to core 0 and the
generator to core 1 (`taskset`), except `fastws-2w` (two workers, nothing pinned). Every run is bounded in time:
the generator stops by itself and is killed past a timeout; every server started here is stopped by its PID.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benches"
VENV = BENCH / ".venv"
VPY = VENV / "bin" / "python"
PEERS = BENCH / "peers"
LOADGEN_DIR = BENCH / "loadgen"
LOADGEN = LOADGEN_DIR / "target" / "release" / "loadgen"
FLOOR = LOADGEN_DIR / "target" / "release" / "floor"
RESULTS = BENCH / "results"
LOGS = RESULTS / "tmp"  # gitignored: server logs of the last run
SERVER_CPU, LOADGEN_CPU = "0", "1"
SRC_IPS = "127.0.0.1-16"
# A run during which other processes used more than this much CPU (in cores) is marked noisy and run again.
NOISY = 0.5
JWT_SECRET = "fastws-bench-secret-not-for-production"
FASTWS_INSTALL_STAMP = VENV / ".fastws-source-hash"

# Python packages of the bench venv, pinned so runs stay comparable. Each peer installs on its own: one that fails
# is recorded as unavailable and the rest of the run goes on.
CORE_PACKAGES = ["matplotlib==3.11.2", "PyJWT==2.15.1", "orjson==3.13.0", "uvloop==0.23.0"]
PEER_PACKAGES = {
    "websockets": ["websockets==17.4"],
    "picows": ["picows==2.3.1"],
    "aiohttp": ["aiohttp==3.14.5"],
    "socketify": ["socketify==0.0.31"],
}


def rel(path: Path | str) -> str:
    """A path as written into results and docs: relative to the repository, never this machine's absolute path."""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def scrub(text: str) -> str:
    """Remove this machine's absolute paths from text that goes into a results file."""
    text = text.replace(str(ROOT) + "/", "").replace(str(ROOT), ".")
    home = str(Path.home())
    return text.replace(home, "~") if home not in ("/", "") else text


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------------
# Servers


@dataclass
class ServerSpec:
    name: str
    description: str
    pinned: bool = True
    # Filled in by setup: why it cannot run, if it cannot.
    unavailable: str | None = None
    version: str | None = None

    def command(self, port: int, extra: list[str] | None = None) -> list[str]:
        venv_bin = rel(VENV / "bin")
        fastws_flags = [
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--client-publish",
            "bench*",
            "--log-level",
            "warning",
            "--max-connections",
            "100000",
            "--idle-timeout",
            "0",
            "--heartbeat-interval",
            "0",
            # The default rate limit (100 messages/s per connection) would throttle a publisher at full speed.
            "--rate-limit",
            "10000000",
            "--rate-burst",
            "10000000",
        ]
        if self.name == "fastws":
            cmd = [f"{venv_bin}/fastws", *fastws_flags, "--workers", "1"]
        elif self.name == "fastws-2w":
            cmd = [f"{venv_bin}/fastws", *fastws_flags, "--workers", "2"]
        elif self.name in FLOOR_SERVERS:
            writers = "2" if self.name == "floor-2w" else "1"
            cmd = [rel(FLOOR), "--host", "127.0.0.1", "--port", str(port), "--writers", writers]
        elif self.name == "node-ws":
            cmd = ["node", rel(PEERS / "node_ws.js"), "--host", "127.0.0.1", "--port", str(port)]
        else:
            script = {
                "websockets": "py_websockets.py",
                "picows": "py_picows.py",
                "aiohttp": "py_aiohttp.py",
                "socketify": "py_socketify.py",
            }[self.name]
            cmd = [f"{venv_bin}/python", rel(PEERS / script), "--host", "127.0.0.1", "--port", str(port)]
        cmd += extra or []
        return (["taskset", "-c", SERVER_CPU] if self.pinned else []) + cmd


SERVERS: dict[str, ServerSpec] = {
    s.name: s
    for s in [
        ServerSpec("fastws", "fastws serve, 1 worker, pinned to one core"),
        ServerSpec(
            "fastws-2w", "fastws serve, 2 workers, nothing pinned (server and generator share both cores)", pinned=False
        ),
        ServerSpec("websockets", "Python websockets (asyncio API) on uvloop, fan-out with websockets.broadcast"),
        ServerSpec("picows", "Python picows (Cython frames on asyncio transports) on uvloop"),
        ServerSpec("aiohttp", "Python aiohttp WebSocketResponse on uvloop, await send_str per subscriber"),
        ServerSpec("node-ws", "Node ws (npm) with bufferutil, one pre-encoded Buffer sent to each subscriber"),
        ServerSpec("socketify", "Python socketify (uWebSockets via cffi), native pub/sub app.publish"),
        ServerSpec(
            "floor",
            "not a server to use: benches/loadgen's `floor`, one blocking write() per subscriber and nothing else, "
            "pinned to one core (the least any server can do per delivery; latency cases only)",
        ),
        ServerSpec(
            "floor-2w",
            "`floor` with two writer threads, each writing to half the subscribers, nothing pinned (latency only)",
            pinned=False,
        ),
    ]
}
# Reference points, not peers: run only in the cases that list them (Case.floor).
FLOOR_SERVERS = ("floor", "floor-2w")


class ManagedProcess:
    """A process started here (no shell) and stopped by its PID: SIGTERM, then SIGKILL after 10 s. Its output goes
    to a log file under benches/results/tmp. Also used by benches/cluster.py for Redis and the nodes."""

    def __init__(self, name: str, cmd: list[str], log_name: str) -> None:
        LOGS.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = LOGS / log_name
        self.log_file = open(self.log_path, "w")
        # Popen without a shell: taskset execs the server, so this PID is the server's own (CPU, RSS, and stop).
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self.log_file, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True
        )
        self.pid = self.proc.pid

    def wait_port(self, port: int, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """Returns the exit status if the process had already exited on its own (a crash), else None."""
        crashed = self.proc.poll()
        if crashed is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log(f"{self.name} did not stop within 10 s of SIGTERM; killing PID {self.pid}")
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log_file.close()
        return crashed

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return scrub(self.log_path.read_text(errors="replace")[-chars:])
        except OSError:
            return ""


class RunningServer(ManagedProcess):
    def __init__(self, spec: ServerSpec, extra: list[str] | None, label: str) -> None:
        self.spec = spec
        self.port = free_port()
        self.command = spec.command(self.port, extra)
        super().__init__(spec.name, self.command, f"{spec.name}-{label}.log")
        self.url = f"ws://127.0.0.1:{self.port}/"

    def wait_ready(self, timeout: float = 20.0) -> bool:
        return self.wait_port(self.port, timeout)


def server_env() -> dict[str, str]:
    # FASTWS_* variables would override the flags' defaults for embedded servers: a bench runs with none of them.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def free_port() -> int:
    """A free TCP port on 127.0.0.1 below the ephemeral range, so no client connection can take it first."""
    low, _high = ephemeral_range()
    for port in range(18000, min(low, 30000)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            if port not in _used_ports:
                _used_ports.add(port)
                return port
    raise RuntimeError("no free port below the ephemeral range")


_used_ports: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except OSError:
        return 32768, 60999


# ------------------------------------------------------------------------------------------------------------------
# Scenarios


@dataclass
class Case:
    """One generator invocation against one fresh server; it may produce several result lines (e.g. windows)."""

    id: str
    scenario: str
    args: list[str]
    servers: list[str] | None = None  # None: every server
    server_extra: list[str] = field(default_factory=list)
    timeout: float = 180.0
    token: bool = False
    push: bool = False
    # Also run the `floor` reference servers (FLOOR_SERVERS).
    floor: bool = False


def cases(seconds: float, quick: bool) -> list[Case]:
    s = f"{seconds:g}"
    if quick:
        return [
            Case(
                "fanout-1k",
                "fanout",
                ["fanout", "--subscribers", "1000", "--window", "16", "--seconds", s, "--warmup", "0.5"],
            )
        ]
    lat = f"{min(seconds, 5):g}"
    return [
        Case(
            "fanout-1k",
            "fanout",
            ["fanout", "--subscribers", "1000", "--window", "4,16,64", "--seconds", s, "--warmup", "0.5"],
        ),
        Case(
            "fanout-10k",
            "fanout",
            ["fanout", "--subscribers", "10000", "--window", "16", "--seconds", s, "--warmup", "0.5"],
        ),
        Case(
            "latency-1k",
            "latency",
            ["latency", "--subscribers", "1000", "--rate", "100,20", "--seconds", lat],
            floor=True,
        ),
        Case(
            "latency-room",
            "latency",
            ["latency", "--subscribers", "10", "--rate", "1000", "--seconds", lat],
            floor=True,
        ),
        Case(
            "idle-10k",
            "idle",
            ["idle", "--connections", "10000", "--channels", "100", "--settle", "1", "--hold", "1"],
            servers=[n for n in SERVERS if n != "fastws-2w"],
        ),
        Case(
            "idle-19k",
            "idle",
            ["idle", "--connections", "19000", "--channels", "100", "--settle", "1", "--hold", "1"],
            servers=[n for n in SERVERS if n != "fastws-2w"],
            timeout=240,
        ),
        Case("connect", "connect", ["connect", "--connections", "20000", "--concurrency", "200"], timeout=240),
        Case(
            "connect-jwt",
            "connect",
            ["connect", "--connections", "20000", "--concurrency", "200"],
            servers=["fastws", "fastws-2w"],
            server_extra=["--jwt-secret", JWT_SECRET],
            token=True,
            timeout=240,
        ),
        Case("push-1k", "push", [], servers=["fastws", "fastws-2w"], push=True, timeout=180),
    ]


def case_command(case: Case) -> str:
    """How a case is run, for the docs (ports and PIDs are filled in at run time)."""
    if case.push:
        return (
            "benches/.venv/bin/python benches/push_bench.py --loadgen benches/loadgen/target/release/loadgen "
            "--port PORT --subscribers 1000 --pushes 5000 [--server-cpu 0 --loadgen-cpu 1 --workers 1 | --workers 2]"
        )
    extra = " --token <HS256 JWT signed with PyJWT>" if case.token else ""
    server = f" (server also started with {' '.join(case.server_extra[:1])} ...)" if case.server_extra else ""
    return (
        f"[taskset -c 1] benches/loadgen/target/release/loadgen {' '.join(case.args)} --url ws://127.0.0.1:PORT/ "
        f"--server-pid PID --src-ips {SRC_IPS}{extra}{server}"
    )


def row_case(case: Case, line: dict[str, Any]) -> str:
    """The table row a result line belongs to."""
    sc = line.get("scenario")
    if sc == "fanout":
        return f"fanout S={line.get('subscribers_requested')} W={line.get('window')}"
    if sc == "latency":
        return f"latency S={line.get('subscribers_requested')} {line.get('rate'):g}/s"
    if sc == "idle":
        return f"idle N={line.get('connections_requested')}"
    if sc == "connect":
        return "connect JWT" if line.get("jwt") else "connect"
    if sc == "push":
        return f"push S={case.id.split('-')[-1].replace('k', '000')}"
    return case.id


def cores_busy(interval: float = 1.0) -> float:
    """CPU in use on the whole machine over `interval` seconds, in cores (0 = idle, 2 = both cores busy)."""

    def snap() -> list[int]:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
        return [int(f) for f in fields]

    a = snap()
    time.sleep(interval)
    b = snap()
    d = [y - x for x, y in zip(a, b)]
    total = sum(d) or 1
    return (total - d[3] - d[4]) / total * (os.cpu_count() or 1)


def wait_quiet(limit: float) -> dict[str, Any]:
    """The machine may be shared (builds, tests): wait up to `limit` s until less than 0.15 core is busy, and say
    how busy it was when the run started."""
    started = time.monotonic()
    busy = cores_busy(0.5)
    while busy > 0.15 and time.monotonic() - started < limit:
        time.sleep(1.0)
        busy = cores_busy(0.5)
    waited = time.monotonic() - started
    if busy > 0.15:
        log(f"the machine is still busy ({busy:.2f} cores in use by other processes) after {waited:.0f} s; running")
    return {"busy_cores_before": round(busy, 3), "quiet_wait_s": round(waited, 1)}


def run_case(case: Case, spec: ServerSpec, rep: int, token: str | None, quiet_limit: float) -> list[dict[str, Any]]:  # noqa: C901
    label = f"{case.id}-r{rep}"
    base = {"case_id": case.id, "scenario": case.scenario, "server": spec.name, "rep": rep}
    base["machine_load"] = wait_quiet(quiet_limit)
    if case.push:
        return [run_push(case, spec, rep, base)]
    server = RunningServer(spec, case.server_extra, label)
    records: list[dict[str, Any]] = []
    try:
        if not server.wait_ready():
            return [
                {
                    **base,
                    "row": case.id,
                    "ok": False,
                    "error": "the server did not start",
                    "server_log": server.log_tail(),
                }
            ]
        time.sleep(0.3)  # let the server's start-up work (imports, JIT, GC) settle before measuring its RSS
        cmd = [rel(LOADGEN), *case.args, "--url", server.url, "--server-pid", str(server.pid), "--src-ips", SRC_IPS]
        if case.token and token:
            cmd += ["--token", token]
        if spec.pinned:
            cmd = ["taskset", "-c", LOADGEN_CPU, *cmd]
        lines, error = run_generator(cmd, case.timeout)
        for line in lines:
            ok = True
            problems = []
            if line.get("subscribers_lost") or line.get("missed_push") or (line.get("loss") or 0) > 0:
                problems.append("loss or dropped connections")
            if line.get("failures") or line.get("subscribe_failures") or line.get("connect_failures"):
                problems.append("connection failures")
            records.append({**base, "row": row_case(case, line), "ok": ok, "problems": problems, "data": line})
        if error:
            records.append({**base, "row": case.id, "ok": False, "error": error})
    finally:
        crashed = server.stop()
        if crashed is not None:
            for r in records:
                r["ok"] = False
            records.append(
                {
                    **base,
                    "row": case.id,
                    "ok": False,
                    "error": f"the server exited during the run (status {crashed})",
                    "server_log": server.log_tail(),
                }
            )
        elif any(not r["ok"] for r in records):
            for r in records:
                if not r["ok"]:
                    r["server_log"] = server.log_tail()
    return records


def run_header(kind: str, complete: bool, command: str, started: dt.datetime, t0: float) -> dict[str, Any]:
    """The fields every results file starts with (benches/report.py reads them); also used by cluster.py."""
    return {
        "schema": 1,
        "kind": kind,
        "complete": complete,
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - t0, 1),
    }


def run_generator(
    cmd: list[str], timeout: float, summarize_lines: bool = True
) -> tuple[list[dict[str, Any]], str | None]:
    """Run the generator to the end (bounded by `timeout`); its JSON lines, and an error text when it failed.
    benches/cluster.py passes summarize_lines=False and logs its own summaries."""
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # our own child, by its handle
        out, err = proc.communicate()
        return parse_lines(out), f"the generator ran past its {timeout:.0f} s limit and was killed; " + tail(err)
    except BaseException:  # stopped (SIGTERM, Ctrl-C): take the generator down too
        proc.kill()
        proc.wait()
        raise
    lines = parse_lines(out)
    for line in lines if summarize_lines else []:
        log("  " + summarize(line))
    if proc.returncode != 0:
        return lines, f"the generator exited with status {proc.returncode}: " + tail(err)
    return lines, None


def run_push(case: Case, spec: ServerSpec, rep: int, base: dict[str, Any]) -> dict[str, Any]:
    port = free_port()
    cmd = [
        rel(VPY),
        rel(BENCH / "push_bench.py"),
        "--loadgen",
        rel(LOADGEN),
        "--port",
        str(port),
        "--subscribers",
        "1000",
        "--pushes",
        "5000",
        "--src-ips",
        SRC_IPS,
    ]
    if spec.pinned:
        cmd += ["--server-cpu", SERVER_CPU, "--loadgen-cpu", LOADGEN_CPU, "--workers", "1"]
    else:
        cmd += ["--workers", "2"]
    lines, error = run_generator(cmd, case.timeout)
    if not lines:
        return {**base, "row": "push S=1000", "ok": False, "error": error or "no output"}
    line = lines[-1]
    problems = [] if line.get("all_delivered") else ["not every push was delivered"]
    return {
        **base,
        "row": "push S=1000",
        "ok": error is None,
        "problems": problems,
        "data": line,
        **({"error": error} if error else {}),
    }


def parse_lines(out: str) -> list[dict[str, Any]]:
    lines = []
    for raw in out.splitlines():
        raw = raw.strip()
        if raw.startswith("{"):
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                pass
    return lines


def tail(text: str, chars: int = 800) -> str:
    return scrub((text or "")[-chars:].strip())


def summarize(line: dict[str, Any]) -> str:
    sc = line.get("scenario")
    if sc in ("fanout", "latency"):
        lat = line.get("latency_ms") or {}
        load = f"W={line.get('window')}" if sc == "fanout" else f"{line.get('rate')}/s"
        return (
            f"{sc} S={line.get('subscribers')} {load}: {line.get('delivered_per_s')} deliveries/s, "
            f"{line.get('published_per_s')} pub/s, loss {line.get('loss')}, "
            f"p50 {lat.get('p50')} p99 {lat.get('p99')} ms, server cpu {line.get('server_cpu_util')}"
        )
    if sc == "idle":
        return (
            f"idle {line.get('connections')}/{line.get('connections_requested')}: "
            f"{line.get('bytes_per_connection')} B/conn, answered {line.get('answered_push')}"
        )
    if sc == "connect":
        return (
            f"connect jwt={line.get('jwt')}: {line.get('handshakes_per_s')} handshakes/s, "
            f"{line.get('handshakes')} ok, failures {line.get('failures')}"
        )
    if sc == "push":
        return f"push: {line.get('calls_per_s')} calls/s, all delivered {line.get('all_delivered')}"
    return json.dumps(line)[:200]


# ------------------------------------------------------------------------------------------------------------------
# Setup


def sh(cmd: list[str], cwd: Path = ROOT, check: bool = True, quiet: bool = True) -> subprocess.CompletedProcess[str]:
    log("$ " + " ".join(scrub(c) for c in cmd))
    result = subprocess.run(cmd, cwd=cwd, text=True, capture_output=quiet)
    if check and result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{tail(result.stdout)}\n{tail(result.stderr)}"
        )
    return result


def source_hash() -> str:
    digest = hashlib.sha256()
    files = [ROOT / "Cargo.toml", ROOT / "Cargo.lock", ROOT / "pyproject.toml", ROOT / "README.md"]
    for folder in ("rust", "python"):
        files += sorted(
            p
            for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith((".so", ".pyc"))
        )
    for path in files:
        if path.exists():
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()
        except OSError:
            return ""

    paths = ["rust", "python", "Cargo.toml", "Cargo.lock", "pyproject.toml"]
    return {
        "commit": git("rev-parse", "--short", "HEAD") or None,
        "uncommitted_changes": bool(git("status", "--porcelain", "--", *paths)),
    }


def installed_build() -> dict[str, Any]:
    """What the bench venv's fastws was built from (written by setup after each successful build)."""
    try:
        data = json.loads(FASTWS_INSTALL_STAMP.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def setup(servers: list[str], skip_install: bool) -> dict[str, Any]:  # noqa: C901
    notes: dict[str, Any] = {}
    if not VPY.exists():
        sh([sys.executable, "-m", "venv", str(VENV)])
        sh([str(VPY), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    if not skip_install:
        sh([str(VPY), "-m", "pip", "install", "-q", *CORE_PACKAGES])
        # fastws: a release build of this tree (maturin's default for `pip install .`), rebuilt when the source changed.
        wanted = source_hash()
        have = installed_build().get("source_hash", "")
        if wanted != have:
            log("building and installing fastws from this tree (release build; a few minutes)")
            # pip always rebuilds a local project directory, so this replaces any older build.
            provenance = git_state()  # taken before the build: the tree may change while it compiles
            result = sh([str(VPY), "-m", "pip", "install", "-q", str(ROOT)], check=False)
            if result.returncode == 0:
                built = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
                FASTWS_INSTALL_STAMP.write_text(json.dumps({"source_hash": wanted, "built": built, **provenance}))
            elif have:
                # The tree may be mid-edit: measure the last build that worked, and say so.
                notes["fastws_build"] = "the build of the current tree failed; measured the previous build"
                log(
                    "fastws failed to build from this tree; using the build already in the bench venv:\n"
                    + tail(result.stderr, 1500)
                )
            else:
                raise RuntimeError("fastws failed to build:\n" + tail(result.stderr, 3000))
        else:
            log("fastws is already installed from this exact source tree")
        for name, packages in PEER_PACKAGES.items():
            if name not in servers:
                continue
            result = sh([str(VPY), "-m", "pip", "install", "-q", *packages], check=False)
            if result.returncode != 0:
                SERVERS[name].unavailable = "pip install failed: " + tail(result.stderr, 400)
        if "node-ws" in servers:
            if shutil.which("node") is None or shutil.which("npm") is None:
                SERVERS["node-ws"].unavailable = "node/npm not found"
            else:
                result = sh(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=PEERS, check=False)
                if result.returncode != 0:
                    SERVERS["node-ws"].unavailable = "npm ci failed: " + tail(result.stderr, 400)
    sh(["cargo", "build", "--release", "--locked", "--quiet"], cwd=LOADGEN_DIR)
    # Import check: a peer that installed but cannot load (a wheel for another glibc, say) is unavailable too.
    imports = {"websockets": "websockets", "picows": "picows", "aiohttp": "aiohttp", "socketify": "socketify"}
    for name, module in imports.items():
        if name in servers and SERVERS[name].unavailable is None:
            result = sh([str(VPY), "-c", f"import {module}"], check=False)
            if result.returncode != 0:
                SERVERS[name].unavailable = "import failed: " + tail(result.stderr, 400)
    if "node-ws" in servers and SERVERS["node-ws"].unavailable is None:
        if not (PEERS / "node_modules" / "ws").exists():
            SERVERS["node-ws"].unavailable = "benches/peers/node_modules/ws is missing (npm ci not run)"
    return notes


def versions() -> dict[str, Any]:
    def pip_version(package: str) -> str | None:
        result = subprocess.run(
            [str(VPY), "-c", f"from importlib.metadata import version; print(version({package!r}))"],
            capture_output=True,
            text=True,
        )
        return result.stdout.strip() or None

    def run(cmd: list[str], cwd: Path = ROOT) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd).stdout.strip() or None
        except OSError:
            return None

    build = installed_build()
    ws_version = None
    ws_pkg = PEERS / "node_modules" / "ws" / "package.json"
    if ws_pkg.exists():
        ws_version = json.loads(ws_pkg.read_text()).get("version")
    return {
        "fastws": {
            "version": pip_version("fastws"),
            "commit": build.get("commit"),
            "uncommitted_changes": build.get("uncommitted_changes"),
            "built": build.get("built"),
            "build": "release wheel (pip install .)",
        },
        "python": run([str(VPY), "-c", "import platform; print(platform.python_version())"]),
        "websockets": pip_version("websockets"),
        "picows": pip_version("picows"),
        "aiohttp": pip_version("aiohttp"),
        "socketify": pip_version("socketify"),
        "uvloop": pip_version("uvloop"),
        "orjson": pip_version("orjson"),
        "node": run(["node", "--version"]),
        "ws": ws_version,
        "rustc": run(["rustc", "--version"]),
        "floor": "benches/loadgen/src/bin/floor.rs (built with the generator)",
    }


def machine() -> dict[str, Any]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    os_name = None
    try:
        m = re.search(r'^PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text(), re.M)
        os_name = m.group(1) if m else None
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "memory_gb": mem_gb,
        "os": os_name,
        "fd_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "ephemeral_ports": "-".join(map(str, ephemeral_range())),
    }


def sign_token() -> str | None:
    code = (
        "import jwt, time; print(jwt.encode({'sub': 'bench', 'exp': int(time.time()) + 86400}, "
        f"{JWT_SECRET!r}, algorithm='HS256'))"
    )
    result = subprocess.run([str(VPY), "-c", code], capture_output=True, text=True)
    return result.stdout.strip() or None


def smoke(skip_install: bool) -> int:
    """Every generator scenario in miniature against one fastws server, and a latency run against the floor: a
    check of the harness, not a benchmark."""
    setup(["fastws"], skip_install)
    ok = True
    for name, args in [
        ("fastws", ["smoke"]),
        # --busy-poll: the generator option is checked here too (it spins for this one second).
        ("floor", ["latency", "--subscribers", "50", "--rate", "100", "--seconds", "1", "--busy-poll", "1"]),
    ]:
        server = RunningServer(SERVERS[name], None, "smoke")
        try:
            if not server.wait_ready():
                log(f"{name} did not start:\n" + server.log_tail())
                return 1
            cmd = [rel(LOADGEN), *args, "--url", server.url, "--server-pid", str(server.pid)]
            lines, error = run_generator(cmd, 60)
        finally:
            crashed = server.stop()
        if name == "floor":  # every publication to every subscriber, with latency samples, busy-polled
            checked = all(
                line.get("loss") == 0 and (line.get("latency_ms") or {}).get("p99") and line.get("busy_poll")
                for line in lines
            )
        else:
            checked = any(line.get("ok") for line in lines)
        passed = checked and bool(lines) and error is None and crashed is None
        why = error or ("server exited" if crashed is not None else json.dumps(lines)[:300])
        log(f"smoke ({name}): " + ("passed" if passed else f"FAILED ({why})"))
        ok = ok and passed
    return 0 if ok else 1


# ------------------------------------------------------------------------------------------------------------------


def main() -> int:  # noqa: C901
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fanout S=1000 W=16 only, 3 s, fastws + websockets")
    parser.add_argument("--servers", help="comma-separated subset of: " + ", ".join(SERVERS))
    parser.add_argument(
        "--scenarios",
        help="comma-separated case ids (fanout-1k, fanout-10k, latency-1k, "
        "latency-room, idle-10k, idle-19k, connect, connect-jwt, push-1k)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="runs of every case × server (default 2)")
    parser.add_argument("--seconds", type=float, help="measured seconds per fanout run (default 10; quick: 3)")
    parser.add_argument("--out", help="results file (default benches/results/<date>[-quick].json)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each run, wait up to this many seconds for other processes to leave the CPUs",
    )
    parser.add_argument(
        "--retry-budget",
        type=float,
        default=30.0,
        help="repeat a run that another process disturbed, until the harness has run this many minutes",
    )
    parser.add_argument("--skip-install", action="store_true", help="do not pip/npm install (the venv must exist)")
    parser.add_argument("--no-docs", action="store_true", help="do not regenerate docs/benchmarks.md")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="only build fastws + the generator and run `loadgen smoke` against one fastws server",
    )
    args = parser.parse_args()

    # Raise the open-file limit to the hard limit; every server and generator started below inherits it.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 20_000:
        log(f"warning: the hard open-file limit is {hard}; idle-19k needs about 19,100 per process")

    quick = args.quick
    names = args.servers.split(",") if args.servers else (["fastws", "websockets"] if quick else list(SERVERS))
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        parser.error(f"unknown servers: {unknown}")
    seconds = args.seconds or (3.0 if quick else 10.0)
    all_cases = cases(seconds, quick)
    if args.scenarios:
        wanted = args.scenarios.split(",")
        all_cases = [c for c in all_cases if c.id in wanted]
        if not all_cases:
            parser.error(f"no case matches {wanted}")
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        parser.error("this harness needs 2 cores and taskset (util-linux) to pin server and generator apart")

    if args.smoke:
        return smoke(args.skip_install)

    started = dt.datetime.now(dt.timezone.utc)
    t0 = time.monotonic()
    notes = setup(names, args.skip_install)
    token = sign_token() if any(c.token for c in all_cases) else None

    kind = "quick" if quick else ("full" if not (args.servers or args.scenarios) else "partial")
    suffix = {"quick": "-quick", "partial": "-partial"}.get(kind, "")
    out = Path(args.out) if args.out else RESULTS / f"{started.strftime('%Y-%m-%d')}{suffix}.json"
    if not args.out and out.exists():  # a second run the same day keeps the first one
        out = RESULTS / f"{started.strftime('%Y-%m-%d-%H%M')}{suffix}.json"
    command = os.environ.get("BENCH_COMMAND") or "python3 " + " ".join([rel(sys.argv[0]), *sys.argv[1:]])
    the_machine, the_versions = machine(), versions()

    def save(complete: bool) -> None:
        """Written after every case, so a run that is stopped half-way keeps what it measured."""
        result = {
            **run_header(kind, complete, command, started, t0),
            "config": {
                "repeat": args.repeat,
                "quiet_wait_s": args.quiet_wait,
                "fanout_seconds": seconds,
                "server_cpu": SERVER_CPU,
                "loadgen_cpu": LOADGEN_CPU,
                "src_ips": SRC_IPS,
                "cases": {c.id: case_command(c) for c in all_cases},
            },
            "machine": the_machine,
            "versions": the_versions,
            "notes": notes,
            "servers": {
                n: {
                    "description": SERVERS[n].description,
                    "pinned": SERVERS[n].pinned,
                    "command": " ".join(SERVERS[n].command(0)).replace("--port 0", "--port PORT"),
                    "available": SERVERS[n].unavailable is None,
                    "unavailable": SERVERS[n].unavailable,
                }
                for n in names
            },
            "runs": runs,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")

    runs: list[dict[str, Any]] = []

    def stop_on_signal(signum: int, _frame: Any) -> None:
        # SIGTERM (or Ctrl-C): unwind, so run_case stops its server by PID and what was measured is saved.
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop_on_signal)
    # Noisy runs are repeated while the whole harness has run for less than this (seconds since start).
    retry_budget = args.retry_budget * 60
    try:
        for rep in range(1, args.repeat + 1):
            for case in all_cases:
                for name in names:
                    spec = SERVERS[name]
                    if case.servers is not None and name not in case.servers:
                        continue
                    if name in FLOOR_SERVERS and not case.floor:
                        continue
                    if spec.unavailable:
                        continue
                    for attempt in range(1, 4):
                        log(
                            f"rep {rep}/{args.repeat} · {case.id} · {name}"
                            + (f" · attempt {attempt}" if attempt > 1 else "")
                        )
                        try:
                            records = run_case(case, spec, rep, token, args.quiet_wait)
                        except Exception as error:  # a harness bug must not lose the runs so far
                            records = [
                                {
                                    "case_id": case.id,
                                    "scenario": case.scenario,
                                    "server": name,
                                    "rep": rep,
                                    "row": case.id,
                                    "ok": False,
                                    "error": scrub(f"harness error: {error!r}"),
                                }
                            ]
                        noise = max((r.get("data") or {}).get("unattributed_cpu_util") or 0 for r in records)
                        for r in records:
                            r["attempt"] = attempt
                        time.sleep(0.5)
                        if noise > NOISY and retry_budget > time.monotonic() - t0 and attempt < 3:
                            # Another process took CPU during the run: keep it (marked) and run the case again.
                            log(f"noisy run ({noise:.2f} core used by other processes); running it again")
                            for r in records:
                                r["noisy"] = True
                            runs.extend(records)
                            continue
                        if noise > NOISY:
                            for r in records:
                                r["noisy"] = True
                        runs.extend(records)
                        break
                    save(complete=False)
    except KeyboardInterrupt as stop:
        save(complete=False)
        log(f"stopped ({stop}); kept {len(runs)} results in {rel(out)}")
        return 130

    save(complete=True)
    log(f"wrote {rel(out)} ({len(runs)} results, {time.monotonic() - t0:.0f} s)")
    if not args.no_docs:
        sh([str(VPY), str(BENCH / "report.py")], quiet=False)
    failed = [r for r in runs if not r.get("ok")]
    if failed:
        log(f"{len(failed)} runs failed or lost data; see {rel(out)} and docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
