"""Regenerate docs/benchmarks.md and docs/img/bench-*.png from the JSON files in benches/results/.

    benches/.venv/bin/python benches/report.py        # (make bench-docs) the latest full run and the latest quick run

It also shows the latest cluster run (benches/cluster.py, `make bench-cluster`), when one is committed.

Each figure is the better of the repeated runs of a case (highest throughput, lowest latency or memory), and the
other run is shown beside it as a spread. Ratios are always this server's figure divided by fastws's (1 worker,
pinned). Needs matplotlib for the charts (the bench venv has it); without it the page is written without charts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benches" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
IMG = ROOT / "docs" / "img"

SERVER_ORDER = ["fastws", "fastws-2w", "websockets", "picows", "aiohttp", "node-ws", "socketify", "floor", "floor-2w"]
# Reference points (benches/loadgen/src/bin/floor.rs), not peers: shown in the latency tables only, never as a loss.
FLOOR_SERVERS = ("floor", "floor-2w")

# scenario -> (headline key path, higher is better, unit label)
HEADLINE: dict[str, tuple[str, bool, str]] = {
    "fanout": ("delivered_per_s", True, "deliveries/s"),
    "latency": ("latency_ms.p99", False, "p99 latency"),
    "idle": ("bytes_per_connection", False, "bytes per idle connection"),
    "connect": ("handshakes_per_s", True, "handshakes/s"),
    "push": ("calls_per_s", True, "push() calls/s"),
}


def get(data: dict[str, Any] | None, path: str) -> Any:
    value: Any = data
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def row_order(row: str) -> tuple[int, int, float]:
    kinds = ["fanout", "latency", "idle", "connect", "push"]
    head = row.split()[0]
    import re

    numbers = [float(n) for n in re.findall(r"[\d.]+", row)]
    return (kinds.index(head) if head in kinds else 9, int("JWT" in row), *(numbers or [0.0]))  # type: ignore[return-value]


def si(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    for limit, suffix in ((1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(value) >= limit * 0.9995:
            return f"{value / limit:.{digits}g}{suffix}"
    return f"{value:.1f}" if abs(value) < 100 else f"{value:.0f}"


def kib(value: float | None) -> str:
    return "—" if value is None else f"{value / 1024:.1f} KiB"


def mib(value: float | None) -> str:
    return "—" if value is None else f"{value / 1024 / 1024:.0f} MiB"


def ms(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def pct(value: float | None) -> str:
    return "—" if value is None else f"{value * 100:.0f}%"


class Run:
    """The runs of one results file, grouped by table row and server."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.doc: dict[str, Any] = json.loads(path.read_text())
        self.groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for record in self.doc.get("runs", []):
            self.groups.setdefault((record["row"], record["server"]), []).append(record)
        self.servers = [s for s in SERVER_ORDER if s in self.doc.get("servers", {})]
        self.rows = sorted({row for row, _ in self.groups}, key=row_order)

    def scenario(self, row: str) -> str:
        return row.split()[0]

    def best(self, row: str, server: str) -> tuple[dict[str, Any] | None, list[float]]:
        """The data of the best rep and the headline of every rep with data."""
        records = [r for r in self.groups.get((row, server), []) if r.get("data")]
        if not records:
            return None, []
        key, higher, _ = HEADLINE.get(self.scenario(row), ("", True, ""))
        scored = [(get(r["data"], key), r["data"]) for r in records]
        scored = [(v, d) for v, d in scored if isinstance(v, (int, float))]
        if not scored:
            return records[0]["data"], []
        scored.sort(key=lambda vd: vd[0], reverse=higher)
        return scored[0][1], [v for v, _ in scored]

    def headline(self, row: str, server: str) -> float | None:
        data, _ = self.best(row, server)
        key = HEADLINE.get(self.scenario(row), ("",))[0]
        value = get(data, key)
        return float(value) if isinstance(value, (int, float)) else None

    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.doc.get("runs", []) if not r.get("ok") or r.get("problems")]


def lossy(run: Run, row: str, server: str) -> bool:
    for r in run.groups.get((row, server), []):
        d = r.get("data") or {}
        if (
            (d.get("loss") or 0) > 0
            or d.get("missed_push")
            or d.get("subscribers_lost")
            or d.get("failures")
            or d.get("connect_failures")
            or d.get("subscribe_failures")
            or d.get("all_delivered") is False
        ):
            return True
        if not r.get("ok"):
            return True
    return False


def other_cpu(d: dict[str, Any]) -> str:
    """CPU busy during the measurement but spent neither by the server nor by the generator, in % of one core."""
    value = d.get("unattributed_cpu_util")
    if not isinstance(value, (int, float)):
        return "—"
    return f"{value * 100:.0f}%" + (" ⚠" if value > NOISY else "")


NOISY = 0.5


def fmt_headline(scenario: str, value: float | None) -> str:
    if value is None:
        return "—"
    if scenario == "latency":
        return f"{ms(value)} ms"
    if scenario == "idle":
        return kib(value)
    return si(value)


def summary_table(run: Run) -> list[str]:
    servers = [s for s in run.servers if s not in FLOOR_SERVERS]
    out = ["| case | metric | " + " | ".join(servers) + " |", "|---|---|" + "---:|" * len(servers)]
    for row in run.rows:
        scenario = run.scenario(row)
        _, higher, label = HEADLINE.get(scenario, ("", True, ""))
        base = run.headline(row, "fastws")
        cells = []
        for server in servers:
            value = run.headline(row, server)
            if value is None:
                spec = run.doc["servers"].get(server, {})
                cells.append("n/a" if spec.get("available", True) else "not installed")
                continue
            text = fmt_headline(scenario, value)
            if server != "fastws" and base:
                text += f" ({value / base:.2f}×)"
            if lossy(run, row, server):
                text += " ⚠"
            cells.append(text)
        direction = "higher is better" if higher else "lower is better"
        out.append(f"| {row} | {label} ({direction}) | " + " | ".join(cells) + " |")
    return out


def detail_tables(run: Run) -> list[str]:  # noqa: C901
    out: list[str] = []
    for scenario in ["fanout", "latency", "idle", "connect", "push"]:
        rows = [r for r in run.rows if run.scenario(r) == scenario]
        if not rows:
            continue
        out += ["", f"### {scenario}", ""]
        if scenario == "fanout":
            out += [
                "| case | server | deliveries/s (other run) | × fastws | published/s | loss "
                "| latency p50 / p99 / p999 ms "
                "| server CPU µs/delivery | server CPU use | server RSS | generator CPU use | other CPU |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
        elif scenario == "latency":
            out += [
                "| case | server | p50 / p99 / p999 / max ms (other run's p99) | p99 × fastws | published/s | loss "
                "| server CPU use | server RSS | other CPU |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
        elif scenario == "idle":
            out += [
                "| case | server | per connection (other run) | × fastws | connected | answered the final push "
                "| set-up s | RSS before → after |",
                "|---|---|---:|---:|---:|---:|---:|---:|",
            ]
        elif scenario == "connect":
            out += [
                "| case | server | handshakes/s (other run) | × fastws | ok / failed | clean closes "
                "| handshake p50 / p99 ms | server CPU µs/handshake | server CPU use | other CPU |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
            ]
        else:
            out += [
                "| case | server | calls/s (other run) | µs/call | caller's CPU µs/call | all delivered "
                "| end-to-end deliveries/s | process CPU µs/delivery | RSS |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|",
            ]
        for row in rows:
            base = run.headline(row, "fastws")
            for server in run.servers:
                d, values = run.best(row, server)
                if d is None:
                    continue
                head = run.headline(row, server)
                ratio = f"{head / base:.2f}×" if head is not None and base else "—"
                other = values[1] if len(values) > 1 else None
                lat = d.get("latency_ms") or {}
                if scenario == "fanout":
                    out.append(
                        f"| {row} | {server} | {si(d.get('delivered_per_s'))} ({si(other)}) | {ratio} "
                        f"| {si(d.get('published_per_s'))} | {d.get('loss')} "
                        f"| {ms(lat.get('p50'))} / {ms(lat.get('p99'))} / {ms(lat.get('p999'))} "
                        f"| {d.get('server_cpu_us_per_delivery', '—')} | {pct(d.get('server_cpu_util'))} "
                        f"| {mib(d.get('server_rss_bytes'))} | {pct(d.get('generator_cpu_util'))} | {other_cpu(d)} |"
                    )
                elif scenario == "latency":
                    out.append(
                        f"| {row} | {server} | {ms(lat.get('p50'))} / {ms(lat.get('p99'))} / {ms(lat.get('p999'))} / "
                        f"{ms(lat.get('max'))} ({ms(other)}) | {ratio} | {si(d.get('published_per_s'))} "
                        f"| {d.get('loss')} | {pct(d.get('server_cpu_util'))} | {mib(d.get('server_rss_bytes'))} "
                        f"| {other_cpu(d)} |"
                    )
                elif scenario == "idle":
                    out.append(
                        f"| {row} | {server} | {kib(d.get('bytes_per_connection'))} ({kib(other)}) | {ratio} "
                        f"| {d.get('connections')} / {d.get('connections_requested')} "
                        f"| {d.get('answered_push')} / {d.get('still_connected_before_push')} "
                        f"| {d.get('connect_seconds')} | {mib(d.get('server_rss_before_bytes'))} → "
                        f"{mib(d.get('server_rss_after_bytes'))} |"
                    )
                elif scenario == "connect":
                    failed = sum((d.get("failures") or {}).values())
                    hs = d.get("handshake_ms") or {}
                    out.append(
                        f"| {row} | {server} | {si(d.get('handshakes_per_s'))} ({si(other)}) | {ratio} "
                        f"| {d.get('handshakes')} / {failed} | {d.get('clean_closes')} "
                        f"| {ms(hs.get('p50'))} / {ms(hs.get('p99'))} | {d.get('server_cpu_us_per_handshake')} "
                        f"| {pct(d.get('server_cpu_util'))} | {other_cpu(d)} |"
                    )
                else:
                    out.append(
                        f"| {row} | {server} | {si(d.get('calls_per_s'))} ({si(other)}) | {d.get('us_per_call')} "
                        f"| {d.get('caller_cpu_us_per_call', '–')} | {d.get('all_delivered')} "
                        f"| {si(d.get('delivered_per_s'))} "
                        f"| {d.get('server_cpu_us_per_delivery')} | {mib(d.get('server_rss_bytes'))} |"
                    )
        if scenario == "idle":
            out += projection(run, rows)
    return out


# Kernel memory of one idle, subscribed server-side TCP socket on this machine (not in the process's RSS): the
# growth of /proc/meminfo's Slab + the TCP buffer pages of /proc/net/sockstat while `loadgen idle` held 10,000
# connections, halved because both ends of each loopback connection are on this machine. Measured 2026-11-26
# with fastws (the figure depends on the kernel, not on the server); see the text it is printed with.
KERNEL_BYTES_PER_SOCKET = 3634
KERNEL_MEASURE = (
    "Kernel: 3.6 KiB per idle subscribed TCP socket on this machine's kernel, the same for every server (with 10,000 "
    "fastws connections held by `loadgen idle`, /proc/meminfo's Slab grew 73.7 MB for the 20,000 sockets of both "
    "ends, and the TCP buffer pages of /proc/net/sockstat did not grow). Socket buffers of connections that are "
    "sent to come on top, up to the kernel's tcp_wmem/tcp_rmem limits."
)


def projection(run: Run, rows: list[str]) -> list[str]:
    """What 100,000 (and 1,000,000) idle connections would take, from the largest idle run measured here."""
    row = max(rows, key=lambda r: int("".join(ch for ch in r if ch.isdigit()) or 0))
    out = [
        "",
        f"Projection from **{row}** (the hard open-file limit here is 20,000 per process, so 100,000 "
        "connections can't be held on this machine): server RSS before + bytes per connection × N, plus the "
        "kernel's memory for each TCP socket, which is outside the process's RSS. " + KERNEL_MEASURE,
        "",
        "| server | per connection (process) | 100,000 connections: process | + kernel | 1,000,000: process + kernel |",
        "|---|---:|---:|---:|---:|",
    ]
    for server in run.servers:
        d, _ = run.best(row, server)
        if d is None or not d.get("bytes_per_connection"):
            continue
        per, before = d["bytes_per_connection"], d.get("server_rss_before_bytes") or 0
        kernel = KERNEL_BYTES_PER_SOCKET
        out.append(
            f"| {server} | {kib(per)} | {mib(before + per * 100_000)} | {mib(kernel * 100_000)} "
            f"| {mib(before + (per + kernel) * 1_000_000)} |"
        )
    return out


def losses(run: Run) -> list[str]:
    """Every case where some server beats fastws (pinned, 1 worker) on the headline."""
    out = []
    for row in run.rows:
        scenario = run.scenario(row)
        _, higher, label = HEADLINE.get(scenario, ("", True, ""))
        base = run.headline(row, "fastws")
        if base is None:
            continue
        for server in run.servers:
            if server == "fastws" or server in FLOOR_SERVERS:
                continue
            value = run.headline(row, server)
            if value is None:
                continue
            better = value > base if higher else value < base
            # Below these margins two runs of the same server differ as much: not a loss worth listing.
            margin = 0.05 if higher else 0.10
            if better and abs(value - base) / max(abs(base), 1e-12) > margin:
                out.append(
                    f"- **{row}**: {server} {fmt_headline(scenario, value)} vs fastws "
                    f"{fmt_headline(scenario, base)} ({label}; {value / base:.2f}×)"
                )
    return out


def problems(run: Run) -> list[str]:
    out = []
    for name, spec in run.doc.get("servers", {}).items():
        if not spec.get("available", True):
            out.append(f"- **{name}** was not run: {spec.get('unavailable')}")
    for r in run.failures():
        d = r.get("data") or {}
        what = []
        if r.get("error"):
            what.append(r["error"])
        what += r.get("problems") or []
        for key in ("loss", "missed_push", "subscribers_lost"):
            if d.get(key):
                what.append(f"{key}={d[key]}")
        for key in ("failures", "connect_failures", "subscribe_failures", "subscriber_endings"):
            if d.get(key):
                what.append(f"{key}={json.dumps(d[key])}")
        out.append(f"- {r['row']} · {r['server']} · run {r['rep']}: " + "; ".join(str(w) for w in what))
        if r.get("server_log"):
            log_text = r["server_log"].strip().replace("`", "'")[-600:]
            out.append("  ```text\n" + "\n".join("  " + line for line in log_text.splitlines()) + "\n  ```")
    return out


def charts(run: Run, prefix: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    IMG.mkdir(parents=True, exist_ok=True)
    made = []
    palette = {
        "fastws": "#d62728",
        "fastws-2w": "#ff9896",
        "websockets": "#1f77b4",
        "picows": "#17becf",
        "aiohttp": "#9467bd",
        "node-ws": "#2ca02c",
        "socketify": "#ff7f0e",
    }
    for scenario, file, title, ylabel, scale in [
        (
            "fanout",
            f"{prefix}deliveries.png",
            "Fan-out: frames delivered per second (server on one core)",
            "deliveries/s (millions)",
            1e6,
        ),
        (
            "idle",
            f"{prefix}memory.png",
            "Memory per idle subscribed connection (server RSS growth / N)",
            "KiB per connection",
            1024.0,
        ),
    ]:
        rows = [r for r in run.rows if run.scenario(r) == scenario]
        servers = [s for s in run.servers if any(run.headline(r, s) is not None for r in rows)]
        if not rows or not servers:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 3), 4.2), dpi=110)
        width = 0.8 / len(servers)
        for i, server in enumerate(servers):
            values = [(run.headline(r, server) or 0) / scale for r in rows]
            xs = [j + (i - (len(servers) - 1) / 2) * width for j in range(len(rows))]
            bars = ax.bar(xs, values, width, label=server, color=palette.get(server))
            for bar, v in zip(bars, values):
                if v:
                    ax.annotate(
                        f"{v:.2f}" if v < 10 else f"{v:.0f}",
                        (bar.get_x() + bar.get_width() / 2, v),
                        ha="center",
                        va="bottom",
                        fontsize=6.5,
                        rotation=90,
                        xytext=(0, 2),
                        textcoords="offset points",
                    )
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r.replace(scenario + " ", "") for r in rows])
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.25)
        ax.legend(fontsize=7, ncol=min(4, len(servers)), loc="upper right")
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(IMG / file)
        plt.close(fig)
        made.append(file)
    return made


def machine_lines(run: Run) -> list[str]:
    m = run.doc.get("machine", {})
    v = run.doc.get("versions", {})
    f = v.get("fastws") or {}
    lines = [
        f"- Machine: {m.get('cores')} cores, {m.get('cpu_model')}, {m.get('memory_gb')} GiB, {m.get('os')}, "
        f"Linux {m.get('kernel')}; open-file limit {m.get('fd_limit')}, ephemeral ports {m.get('ephemeral_ports')}",
        f"- fastws {f.get('version')} built from commit {f.get('commit')}"
        + (" plus uncommitted changes in rust/ or python/" if f.get("uncommitted_changes") else "")
        + (f" at {f.get('built')}" if f.get("built") else "")
        + f", {f.get('build')}; generator built with {v.get('rustc')}",
        f"- Python {v.get('python')}: websockets {v.get('websockets')}, picows {v.get('picows')}, "
        f"aiohttp {v.get('aiohttp')}, socketify {v.get('socketify')}, uvloop {v.get('uvloop')}, "
        f"orjson {v.get('orjson')}",
        f"- Node {v.get('node')}, ws {v.get('ws')}",
        f"- Command: `{run.doc.get('command')}`; started {run.doc.get('started')}, took "
        f"{(run.doc.get('duration_s') or 0) / 60:.1f} min; each case × server run {run.doc['config'].get('repeat')} "
        f"times, fan-out runs measured for {run.doc['config'].get('fanout_seconds'):g} s after a warm-up",
        f"- Results file: `{run.path.relative_to(ROOT)}`",
    ]
    return lines


def case_lines(run: Run) -> list[str]:
    out = ["| case id | generator command |", "|---|---|"]
    for cid, cmd in (run.doc.get("config", {}).get("cases") or {}).items():
        out.append(f"| {cid} | `{cmd}` |")
    out += ["", "| server | command (under `taskset -c 0` when pinned) |", "|---|---|"]
    for name, spec in run.doc.get("servers", {}).items():
        cmd = spec.get("command", "").replace("taskset -c 0 ", "")
        out.append(f"| {name} | `{cmd}` |")
    return out


def section(run: Run, title: str, prefix: str, intro: str) -> list[str]:
    out = [f"## {title}", "", intro, ""]
    out += machine_lines(run) + [""]
    out += summary_table(run)
    out += [
        "",
        "⚠ marks a server that lost frames, dropped subscribers or failed connections in at least one run "
        "(details below). `n/a`: the case does not apply to that server.",
        "",
    ]
    imgs = charts(run, prefix)
    for img in imgs:
        out += [f"![{img}](img/{img})", ""]
    noisy = [r for r in run.doc.get("runs", []) if r.get("noisy")]
    if noisy:
        out += [
            f"{len(noisy)} of {len(run.doc.get('runs', []))} result lines come from runs that another process "
            "disturbed (more than half a core of *other CPU*); such runs were repeated while time allowed, and "
            "the tables show the better run.",
            "",
        ]
    for key, note in (run.doc.get("notes") or {}).items():
        out += [f"**Note ({key}):** {note}", ""]
    lost = losses(run)
    out += ["### Where fastws loses", ""]
    out += lost or ["- Nowhere in this run: fastws (one worker, one core) had the best headline figure in every case."]
    out += detail_tables(run)
    issues = problems(run)
    out += ["", "### Failures, losses and servers not run", ""]
    out += issues or ["- None."]
    out += ["", "### How each case was run", ""] + case_lines(run) + [""]
    return out


CLUSTER_ORDER = ["1-node", "1-node-redis", "3-nodes"]
CLUSTER_LABEL = {"1-node": "1 node", "1-node-redis": "1 node + Redis", "3-nodes": "3 nodes + Redis"}


def node_cpu(record: dict[str, Any]) -> str:
    """The nodes' CPU together, in % of one core, and each node's when there are several."""
    d = record["data"]
    each = d.get("server_cpu_util_each")
    return pct(d.get("server_cpu_util")) + (f" ({', '.join(pct(e) for e in each)})" if each else "")


def redis(key: str, digits: int) -> Any:
    """A cell formatter for one of Redis' per-publication figures (— for a node without Redis)."""

    def fmt(record: dict[str, Any]) -> str:
        value = (record.get("redis_cost") or {}).get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "—"

    return fmt


def redis_cpu(record: dict[str, Any]) -> str:
    """Redis' CPU during the run, in % of one core, with a decimal: it is well under 1% at these rates."""
    value = (record.get("redis_cost") or {}).get("cpu_util")
    return f"{value * 100:.1f}%" if isinstance(value, (int, float)) else "—"


def cluster_table(run: Run) -> list[str]:
    """One row per case × configuration; every cell shows each repetition (`run 1 / run 2`), not only the better
    one: with every process on two shared cores, the spread matters as much as the figure."""
    configs = [c for c in CLUSTER_ORDER if c in run.doc.get("servers", {})]
    out = [
        "| case | configuration | deliveries/s | published/s | latency p50 ms | latency p99 ms | loss "
        "| PUBLISH per publication | Redis messages per publication | Redis CPU "
        "| nodes' CPU (each node) | other CPU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cells(records: list[dict[str, Any]], fmt: Any) -> str:
        return " / ".join(fmt(r) for r in records) or "—"

    for row in run.rows:
        for config in configs:
            records = sorted(
                (r for r in run.groups.get((row, config), []) if r.get("data")), key=lambda r: r.get("rep", 0)
            )
            if not records:
                continue
            out.append(
                f"| {row} | {CLUSTER_LABEL.get(config, config)} "
                f"| {cells(records, lambda r: si(r['data'].get('delivered_per_s')))} "
                f"| {cells(records, lambda r: si(r['data'].get('published_per_s')))} "
                f"| {cells(records, lambda r: ms(get(r['data'], 'latency_ms.p50')))} "
                f"| {cells(records, lambda r: ms(get(r['data'], 'latency_ms.p99')))} "
                f"| {cells(records, lambda r: str(r['data'].get('loss')))} "
                f"| {cells(records, redis('publish_calls_per_publication', 3))} "
                f"| {cells(records, redis('messages_per_publication', 2))} "
                f"| {cells(records, redis_cpu)} "
                f"| {cells(records, node_cpu)} "
                f"| {cells(records, lambda r: other_cpu(r['data']))} |"
            )
    return out


def cluster_section(run: Run) -> list[str]:
    m = run.doc.get("machine", {})
    v = run.doc.get("versions", {})
    cfg = run.doc.get("config", {})
    src = v.get("fastws_source") or {}
    issues = problems(run)
    out = [
        "## Cluster: cross-node fan-out (`make bench-cluster`)",
        "",
        f"One channel, {cfg.get('subscribers', 0):,} subscribers, on one node and on three nodes sharing one Redis "
        "(subscribers spread round robin, the publisher on node 1). The method, the figures and what they mean are "
        "in [scaling.md, Performance](scaling.md#performance); the table is regenerated from "
        f"`{run.path.relative_to(ROOT)}`. Each cell shows both runs (`run 1 / run 2`).",
        "",
        *cluster_table(run),
        "",
        f"- Command: `{run.doc.get('command')}`; started {run.doc.get('started')}, took "
        f"{(run.doc.get('duration_s') or 0) / 60:.1f} min; {cfg.get('seconds', 0):g} s measured per run",
        f"- Machine: {m.get('cores')} cores, {m.get('cpu_model')}, Linux {m.get('kernel')}; every node and Redis "
        f"pinned to core {cfg.get('server_cpu')}, the generator to core {cfg.get('loadgen_cpu')}",
        f"- fastws {v.get('fastws')} (commit {src.get('commit')}"
        + (" plus uncommitted changes" if src.get("uncommitted_changes") else "")
        + f"), {v.get('redis')}",
        f"- Node: `{cfg.get('node')}`",
        "",
        "Failures and losses:",
        "",
        *(issues or ["- None."]),
        "",
    ]
    return out


def profile_section(doc: dict[str, Any], path: Path) -> list[str]:
    """The latest benches/profile.py run: CPU per delivery by symbol, server beside server."""
    runs = [r for r in doc.get("runs", []) if r.get("ok")]
    servers = [s for s in SERVER_ORDER if any(r["server"] == s for r in runs)]
    cfg = doc.get("settings", {})
    m = doc.get("machine", {})
    src = (doc.get("versions") or {}).get("fastws") or {}
    out = [
        "## Where the CPU goes (`make bench-profile`)",
        "",
        f"Fan-out to {cfg.get('subscribers', 0):,} subscribers with a window of {cfg.get('window')}, each server "
        f"pinned to one core as above, profiled with `perf record -F {doc.get('frequency_hz')}` for "
        f"{cfg.get('record')} s inside {cfg.get('seconds')} measured seconds, while `perf stat` counts its send "
        "system calls. A symbol's figure is its samples turned into CPU time and divided by the frames delivered "
        "meanwhile: nanoseconds of the server's CPU per delivery, so servers compare per unit of work. *kernel* is "
        "everything in the kernel, including the loopback delivery to the generator's sockets, which runs on the "
        f"sender's CPU. From `{path.relative_to(ROOT)}`; command `{doc.get('command')}`; {m.get('cores')} cores, "
        f"{m.get('cpu_model')}, Linux {m.get('kernel')}; fastws built from commit {src.get('commit')}"
        + (" plus uncommitted changes" if src.get("uncommitted_changes") else "")
        + ".",
        "",
        "| Server | Run | Deliveries/s | CPU/delivery (/proc) | Sampled | Kernel | Server's code | libc | Python |"
        " Frames per send call |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (SERVER_ORDER.index(r["server"]), r["rep"])):
        kinds = r.get("ns_per_delivery_by_kind", {})
        cells = [f"{kinds[k]:.0f} ns" if k in kinds else "—" for k in ("kernel", "server", "libc", "python")]
        cpu = r.get("server_cpu_us_per_delivery")
        out.append(
            f"| {r['server']} | {r['rep']} | {si(r['delivered_per_s'])} | "
            + (f"{cpu * 1000:.0f} ns" if cpu is not None else "—")
            + f" | {r['sampled_ns_per_delivery']:.0f} ns | "
            + " | ".join(cells)
            + f" | {r.get('frames_per_send_syscall') or '—'} |"
        )
    means: dict[tuple[str, str], dict[str, float]] = {}
    for server in servers:
        reps = [r for r in runs if r["server"] == server]
        for r in reps:
            for dso, sym, ns in r.get("symbols", []):
                means.setdefault((dso, sym), {}).setdefault(server, 0.0)
                means[(dso, sym)][server] += ns / len(reps)
    top = sorted(means.items(), key=lambda item: -max(item[1].values()))[:25]
    out += [
        "",
        "The 25 largest symbols (mean of the runs, ns per delivery; — where a server has no such symbol, or it is "
        "not among that run's largest):",
        "",
        "| Symbol | Where | " + " | ".join(servers) + " |",
        "|---|---|" + "---|" * len(servers),
    ]
    for (dso, sym), values in top:
        where = "kernel" if dso == "[kernel.kallsyms]" else dso.split(".cpython")[0].split(".so")[0]
        name = sym if len(sym) <= 70 else sym[:67] + "..."
        cells = [f"{values[s]:.1f}" if s in values else "—" for s in servers]
        out.append(f"| `{name.replace('|', '/')}` | {where} | " + " | ".join(cells) + " |")
    out.append("")
    return out


HEADER = """# Benchmarks

<!-- Generated by benches/report.py from benches/results/*.json: edit the generator, not this page. -->

fastws against other WebSocket servers on the same machine, each speaking the same tiny pub/sub protocol, measured
by our own load generator (`benches/loadgen`, Rust, RFC 6455 clients on one tokio thread). Every figure below comes
from a results file committed in `benches/results/`; this page is regenerated from those files.

## Running it

```bash
make bench          # every case × server, twice (~22 min on a quiet machine): benches/results/<date>.json + this page
make bench-quick    # fanout S=1000 W=16, 3 s, fastws + websockets; writes benches/results/<date>-quick.json
make bench-docs     # regenerate this page and docs/img/bench-*.png from the committed results
make bench-smoke    # build the generator and check it against a fresh fastws server (a few seconds)
make bench-cluster  # 10,000 subscribers on 1 node vs 3 nodes + Redis (~8 min): benches/results/<date>-cluster.json
make bench-profile  # perf on fastws and socketify during fan-out (~1 min): benches/results/<date>-profile.json
```

Knobs: `python3 benches/run.py --servers fastws,node-ws --scenarios fanout-1k,idle-10k --repeat 1 --seconds 5`
(`--help` lists them). The harness creates `benches/.venv` (gitignored) and installs into it a **release** build of
this tree (`pip install .`, rebuilt when rust/ or python/ changed), the Python peers, uvloop, PyJWT and matplotlib;
`npm ci` installs the Node peer into `benches/peers/node_modules` (gitignored); `cargo build --release` builds the
generator in `benches/loadgen/target` (its own crate and lock file, not part of the wheel). A peer that cannot be
installed is recorded as not run, and the rest goes on.

The generator also runs alone, against any server that speaks the bench protocol (it only accepts loopback URLs):

```bash
cargo build --release --manifest-path benches/loadgen/Cargo.toml
benches/loadgen/target/release/loadgen help
# against a server started with --client-publish 'bench*' --rate-limit 0 (its publisher sends thousands of
# messages a second, which the default limit of 100/s cuts off with 4029 and then 1008); about 2 s, exit status 0
# when every check passed:
benches/loadgen/target/release/loadgen --smoke --url ws://127.0.0.1:PORT/
```

## Method

- **Per core.** Each server runs pinned to core 0 (`taskset -c 0`, fastws with `--workers 1`), the generator pinned
  to core 1, so every server gets exactly one core. `fastws-2w` is fastws with `--workers 2` and nothing pinned: it
  shows what a second core adds, while it shares both cores with the generator.
- **fanout**: S subscribers on one channel; one publisher sends ~200-byte payloads (`{"t":<send µs>,"seq":n,"pad":...}`)
  through client `publish` frames, as fast as a window allows: at most W messages may be not yet delivered to
  *every* subscriber. Windows 4, 16 (default) and 64. 0.5 s warm-up, then 10 s measured. Reported: published/s,
  frames delivered/s (during the measured seconds), loss (published × S − frames received, after a drain of up to
  10 s), latency percentiles from every 16th frame per subscriber (send time found by a text search in the frame),
  server CPU (utime+stime from /proc/PID/stat) per delivered frame, server RSS. By Little's law the latency in this
  scenario is mostly the window itself: W × S frames in flight divided by the delivery rate.
- **latency**: the same clients, but the publisher sends at a fixed rate (100/s and 20/s to 1,000 subscribers, and
  1,000/s to a 10-subscriber room) for 5 s; every frame is a latency sample.
- **idle**: N connections (10,000 and 19,000, from 16 loopback source addresses 127.0.0.1–16), each subscribed to one
  of 100 channels; server RSS before and 1 s after they are all subscribed gives bytes per connection (including
  the server's per-connection buffers, not the kernel's socket buffers). Then one publication per channel: every
  idle connection must receive it (counted).
- **connect**: 20,000 connections opened, upgraded and closed (close frame, then wait for the server's) with 200 in
  flight; handshakes/s. fastws also with JWT verification (`--jwt-secret`; each client sends `?token=` with an HS256
  token signed once by PyJWT).
- **push** (fastws only: it is its Python API): `benches/push_bench.py` starts `fastws.Server` in-process, the
  generator subscribes 1,000 clients, then one Python thread times 5,000 `server.push()` calls of a small dict;
  reported: calls/s (wall clock), the calling thread's own CPU time per call (`time.thread_time`: what the call
  costs, without the time the thread waited for a core that the fan-out or the generator had), and whether all
  5,000,000 frames arrived.
- **Twice.** Every case × server runs twice, each time against a freshly started server; the tables show the
  better run and, in parentheses, the other one.
- **Peers** (`benches/peers/`): Python `websockets` (asyncio API, `broadcast`), `picows`, `aiohttp`, Node `ws`
  (with `bufferutil`), and `socketify` (uWebSockets, native `app.publish`). The Python ones run on uvloop and use
  orjson, as their docs recommend for speed. All answer `subscribe` with `{"event":"subscribed","channel":C}` and
  fan a `publish` out as `{"event":"message","channel":C,"data":P}`, encoded once per publication; they send
  nothing on connect (fastws sends its `connected` frame), have pings and compression off, and a listen backlog
  of 4096. fastws runs as `fastws serve --workers 1 --client-publish 'bench*' --idle-timeout 0
  --heartbeat-interval 0 --max-connections 100000 --log-level warning` (plus a rate limit far above any rate here,
  so the default limit of 100 messages/s per connection never throttles the publisher).
- **The floor** (latency cases only; `floor` pinned like the peers, `floor-2w` with two writer threads and nothing
  pinned): `benches/loadgen/src/bin/floor.rs`, not a server to use. It answers the bench protocol with no event
  loop, queue or task wake-up: each publication goes to writer threads that `write()` the frame to each of their
  subscribers in turn, blocking. One write per subscriber is the least any server must do when a publication
  reaches each socket alone, so its latency is what this machine and this generator allow; run by hand with
  `benches/loadgen/target/release/floor --port PORT [--writers 2]`.
- **The generator's limits.** It reads with one 256 KiB buffer per read, counts frames by parsing headers only,
  and reports its own CPU use: near 100% means the figure is the generator's limit, not the server's. At 20/s to
  1,000 subscribers it spends about 6 ms of CPU reading each publication's 1,000 frames, so no server's p99 there
  can be much below that (the floor's is 6.8–7.5 ms). `--busy-poll 1` (not used by the harness) keeps it from
  sleeping in epoll_wait, so a server's writes never wake it: it then uses its whole core, so it is only for a
  generator pinned apart from the server. Measured by hand at 20/s × 1,000, pinned: the floor's p99 went from 7.0
  to 5.7 ms with it, while socketify's (7.4 → 7.5 ms) and fastws's (8.1 → 8.4 ms) did not move (one run each).
- **A shared machine.** The machine may run other work (builds, test suites). Before each run the harness waits up
  to 20 s for less than 0.15 core to be in use; during each run the generator reads /proc/stat and reports as
  *other CPU* what was busy but spent neither by the server nor by itself: the kernel's deferred network work
  (softirq threads, typically 10–30% of a core here) plus any other process. Above 50% (marked ⚠) another process
  took CPU during the run and its figures are low; the better-of-two selection usually avoids such a run.
"""


def main() -> int:
    runs = []
    profiles = sorted(RESULTS.glob("*-profile.json"))
    for path in sorted(set(RESULTS.glob("*.json")) - set(profiles)):
        try:
            runs.append(Run(path))
        except (OSError, ValueError, KeyError) as error:
            print(f"skipping {path.name}: {error}", file=sys.stderr)
    # A full run stopped half-way (complete: false) is kept in results/ but not shown.
    full = [r for r in runs if r.doc.get("kind") == "full" and r.doc.get("complete", True)]
    quick = [r for r in runs if r.doc.get("kind") == "quick"]
    out = [HEADER]
    if full:
        latest = max(full, key=lambda r: r.doc.get("started", ""))
        out += section(
            latest,
            "Results: full run",
            "bench-",
            "The latest full run (`make bench`). Each cell: the better of two runs and, in brackets, the "
            "ratio to fastws with one worker on one core.",
        )
    else:
        out += ["## Results: full run", "", "No full run is committed yet: run `make bench`.", ""]
    partial = [r for r in runs if r.doc.get("kind") == "partial"]
    if partial and full:
        newest = max(partial, key=lambda r: r.doc.get("started", ""))
        if newest.doc.get("started", "") > max(f.doc.get("started", "") for f in full):
            out += section(
                newest,
                "Partial run, after the full run",
                "bench-partial-",
                "**A partial run** (a subset of servers and cases, `" + str(newest.doc.get("command")) + "`), made "
                "after the full run above, e.g. to measure a newer build of fastws. Compare it with the full run "
                "only where the same server and case appear in both.",
            )
    if quick:
        latest = max(quick, key=lambda r: r.doc.get("started", ""))
        out += section(
            latest,
            "Quick run (`make bench-quick`)",
            "bench-quick-",
            "**A quick run, not the full benchmark:** fan-out to 1,000 subscribers with a window of 16, "
            "3 s measured per run, fastws and one peer. It is the development check of the harness.",
        )
    cluster = [r for r in runs if r.doc.get("kind") == "cluster" and r.doc.get("complete", True)]
    if cluster:
        out += cluster_section(max(cluster, key=lambda r: r.doc.get("started", "")))
    if profiles:
        out += profile_section(json.loads(profiles[-1].read_text()), profiles[-1])
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(out).rstrip() + "\n")
    print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
