#!/usr/bin/env python3
"""Where each server's CPU goes in the fan-out case: `perf` on the server while the generator runs, per delivery.

    python3 benches/profile.py                      # fastws and socketify, 1,000 subscribers, W=16, twice
    python3 benches/profile.py --servers fastws,node-ws --window 64 --repeat 1

For each server (pinned to core 0, the generator to core 1, as in benches/run.py) it runs `loadgen fanout` and,
in the middle of the measured window, for `--record` seconds:
- `perf record -F 4000` on the server's PID: CPU samples by symbol, turned into nanoseconds of CPU per delivery
  (samples / 4,000 Hz / deliveries in the window), so two servers compare per unit of work, not per second;
- `perf stat` on the send-side system calls (write, writev, sendto, sendmsg): frames per system call.

Writes benches/results/<date>-profile.json; benches/report.py turns the latest one into a section of
docs/benchmarks.md. Needs `perf` (Debian: `apt-get install linux-perf`) and the permission to profile another
process (root, or kernel.perf_event_paranoid <= 1). Standard library only, like run.py, whose servers, generator
and venv it uses.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # benches/run.py: servers, generator, venv

FREQUENCY = 4000
SEND_CALLS = ["write", "writev", "sendto", "sendmsg"]


def perf_symbols(data: Path) -> collections.Counter[tuple[str, str]]:
    """Samples per (dso, symbol) in a perf.data file."""
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "-n", "--sort", "dso,sym", "--stdio"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    samples: collections.Counter[tuple[str, str]] = collections.Counter()
    for line in report.splitlines():
        # "    12.34%  1234  [kernel.kallsyms]  [k] tcp_sendmsg_locked"
        parts = line.split(None, 3)
        if len(parts) < 4 or line.startswith("#") or not parts[0].endswith("%"):
            continue
        dso, sym = parts[2], parts[3]
        samples[(dso, sym.split("] ", 1)[-1].strip())] += int(parts[1])
    return samples


def send_calls(stat_csv: str) -> dict[str, int]:
    """System call counts from `perf stat -x , -e syscalls:sys_enter_*` output (count,unit,event,...)."""
    counts = {}
    for line in stat_csv.splitlines():
        fields = line.split(",")
        if len(fields) >= 3 and fields[2].startswith("syscalls:sys_enter_") and fields[0].isdigit():
            counts[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0])
    return counts


def dso_kind(dso: str) -> str:
    if dso == "[kernel.kallsyms]":
        return "kernel"
    if dso.startswith("libc.so") or dso.startswith("ld-linux"):
        return "libc"
    if dso.startswith("libpython") or dso == "python3" or dso.startswith("python"):
        return "python"
    return "server"


def profile_one(spec: run.ServerSpec, args: argparse.Namespace, rep: int) -> dict[str, Any]:
    label = f"profile-r{rep}"
    record: dict[str, Any] = {"server": spec.name, "rep": rep}
    record["machine_load"] = run.wait_quiet(args.quiet_wait)
    server = run.RunningServer(spec, None, label)
    data = run.LOGS / f"perf-{spec.name}-r{rep}.data"
    generator: subprocess.Popen[str] | None = None
    try:
        if not server.wait_ready():
            return {**record, "ok": False, "error": "the server did not start", "server_log": server.log_tail()}
        time.sleep(0.3)
        cmd = [run.rel(run.LOADGEN), "fanout", "--subscribers", str(args.subscribers), "--window", str(args.window)]
        cmd += ["--seconds", str(args.seconds), "--warmup", "0.5", "--url", server.url, "--server-pid", str(server.pid)]
        cmd = ["taskset", "-c", run.LOADGEN_CPU, *cmd]
        run.log("$ " + " ".join(cmd))
        generator = subprocess.Popen(cmd, cwd=run.ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The subscribers connect in well under a second; start recording inside the measured window.
        time.sleep(1.5 + (args.seconds - args.record) / 2)
        pid = str(server.pid)
        events = ",".join(f"syscalls:sys_enter_{call}" for call in SEND_CALLS)
        perf_record = subprocess.Popen(
            ["perf", "record", "-q", "-F", str(FREQUENCY), "-p", pid, "-o", str(data), "--", "sleep", str(args.record)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        perf_stat = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-e", events, "-p", pid, "--", "sleep", str(args.record)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, stat_err = perf_stat.communicate(timeout=args.record + 30)
        perf_record.wait(timeout=args.record + 30)
        out, err = generator.communicate(timeout=args.seconds + 60)
    except subprocess.TimeoutExpired as timeout:
        return {**record, "ok": False, "error": f"{timeout.cmd[0]} ran past its time limit and was stopped"}
    finally:
        if generator is not None and generator.poll() is None:
            generator.kill()  # our own child, by its handle
            generator.wait()
        crashed = server.stop()
    lines = run.parse_lines(out)
    if crashed is not None or not lines or generator.returncode != 0:
        return {**record, "ok": False, "error": f"server exit {crashed}, generator: {run.tail(err)}"}
    line = lines[-1]
    deliveries = float(line["delivered_per_s"]) * args.record
    try:
        samples = perf_symbols(data)
    except (OSError, subprocess.CalledProcessError) as error:
        # perf not permitted to profile another process (kernel.perf_event_paranoid), or no samples written.
        return {**record, "ok": False, "error": f"perf report failed: {error}"}
    ns = {key: count / FREQUENCY / deliveries * 1e9 for key, count in samples.items()}
    by_kind: collections.Counter[str] = collections.Counter()
    for (dso, _), value in ns.items():
        by_kind[dso_kind(dso)] += value
    calls = {k: v for k, v in send_calls(stat_err).items() if v}
    top = sorted(ns.items(), key=lambda item: -item[1])[: args.keep]
    return {
        **record,
        "ok": (line.get("loss") or 0) == 0,
        "delivered_per_s": line["delivered_per_s"],
        "server_cpu_us_per_delivery": line.get("server_cpu_us_per_delivery"),
        "sampled_ns_per_delivery": round(sum(ns.values()), 1),
        "ns_per_delivery_by_kind": {k: round(v, 1) for k, v in by_kind.most_common()},
        "send_syscalls": calls,
        "frames_per_send_syscall": round(deliveries / sum(calls.values()), 1) if calls else None,
        "symbols": [[dso, sym, round(value, 2)] for (dso, sym), value in top],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", default="fastws,socketify", help="comma-separated, from benches/run.py")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--window", type=int, default=16, help="publications in flight (default 16)")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds of each fan-out run")
    parser.add_argument("--record", type=float, default=3.0, help="seconds profiled, inside the measured ones")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--keep", type=int, default=60, help="symbols kept per run in the results file")
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="wait up to this long for an idle machine")
    parser.add_argument("--skip-install", action="store_true", help="use the bench venv as it is")
    parser.add_argument("--no-docs", action="store_true", help="do not regenerate docs/benchmarks.md")
    args = parser.parse_args()
    if args.record >= args.seconds:
        parser.error("--record must be shorter than --seconds")
    if shutil.which("perf") is None:
        print("perf is not installed (Debian: apt-get install linux-perf)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.servers.split(",") if n.strip()]
    unknown = [n for n in names if n not in run.SERVERS or not run.SERVERS[n].pinned]
    if unknown:
        parser.error(f"not a pinned server of benches/run.py: {', '.join(unknown)}")
    started, t0 = dt.datetime.now(dt.timezone.utc), time.monotonic()
    notes = run.setup(names, args.skip_install)
    runs: list[dict[str, Any]] = []
    for rep in range(1, args.repeat + 1):
        for name in names:
            spec = run.SERVERS[name]
            if spec.unavailable:
                continue
            run.log(f"rep {rep}/{args.repeat} · profile · {name}")
            result = profile_one(spec, args, rep)
            if result.get("ok"):
                run.log(
                    f"  {result['delivered_per_s'] / 1e6:.2f} M deliveries/s, sampled "
                    f"{result['sampled_ns_per_delivery']:.0f} ns/delivery, "
                    f"{result['frames_per_send_syscall']} frames per send call"
                )
            runs.append(result)
    command = "python3 benches/profile.py " + " ".join(sys.argv[1:])
    doc = {
        **run.run_header("profile", True, command.strip(), started, t0),
        "settings": {k: getattr(args, k) for k in ("subscribers", "window", "seconds", "record", "repeat")},
        "frequency_hz": FREQUENCY,
        "machine": run.machine(),
        "versions": run.versions(),
        "notes": notes,
        "runs": runs,
    }
    run.RESULTS.mkdir(parents=True, exist_ok=True)
    out = run.RESULTS / f"{started.strftime('%Y-%m-%d-%H%M')}-profile.json"
    out.write_text(json.dumps(doc, indent=1) + "\n")
    run.log(f"wrote {run.rel(out)}")
    if not args.no_docs:
        run.sh([str(run.VPY), str(run.BENCH / "report.py")], quiet=False)
    return 0 if all(r.get("ok") for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
