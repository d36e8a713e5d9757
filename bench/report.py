"""The `scorehost bench` report: results.json, report.md (table, scorehost's ratios against each other server) and
three PNG plots.

How to read the plots: throughput.png (higher is better) and latency.png (p50/p95/p99, lower is better) against
the number of concurrent clients, one panel per entry script; time_split.png splits the mean latency of each cell
into time inside run() (the model, reported by the server in x-ms-run-fn-exec-ms) and everything else (server,
network and client overhead).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import platform
import subprocess
import time
from typing import Optional

from bench.run import Result

COLUMNS = ("server", "script", "clients", "requests", "errors", "req/s", "img/s", "p50 ms", "p95 ms", "p99 ms",
           "run() ms", "overhead ms", "server CPU ms/req", "RSS MB")


MIN_REQUESTS_FOR_P99 = 100  # below this, "p99" is just the slowest request or so
ERROR_SHARE = 0.01  # more failures than this share of the answers (any but a 2xx): the figures time the failures
OWN_REQUESTS = ("a script that takes no images needs its own requests: record them with `scorehost serve --record "
                "DIR`, then pass `--requests DIR`")


def erred(results: list[Result]) -> list[Result]:
    """The cells where more than ERROR_SHARE of the answers were failures."""
    return [r for r in results if r.failures > ERROR_SHARE * r.requests]


def errors_line(r: Result) -> str:
    """One cell's failures in one line, for the console and the report alike."""
    return (f"{r.cell.server}/{r.cell.script}/{r.cell.concurrency}: {r.failures:,} of {r.requests:,} answers were "
            f"errors" + (f" (most common {r.top_error})" if r.top_error else ""))


def failed_scripts(results: list[Result]) -> list[str]:
    """The scripts none of whose cells were mostly answered (2xx): nothing about them was measured."""
    return sorted({r.cell.script for r in results} - {r.cell.script for r in results if 2 * r.failures < r.requests})


def _row(r: Result) -> list[str]:
    rss = "-" if r.rss_mb is None else f"{r.rss_mb:.0f}"
    cpu = "-" if r.cpu_ms_per_request is None else f"{r.cpu_ms_per_request:.3f}"
    return [r.cell.server, r.cell.script, str(r.cell.concurrency), str(r.requests), str(r.failures),
            f"{r.req_s:.1f}", f"{r.img_s:.1f}", f"{r.p50_ms:.0f}", f"{r.p95_ms:.0f}", f"{r.p99_ms:.0f}",
            _ms2(r.run_mean_ms), _ms2(r.overhead_mean_ms), cpu, rss]


def _ms2(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def ratios(results: list[Result]) -> list[dict]:
    """scorehost / each other server (AIHS, a peer) per (script, clients): throughput, p99, CPU and memory."""
    by = {(r.cell.server, r.cell.script, r.cell.concurrency): r for r in results}
    out = []
    for (server, script, c), theirs in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        ours = by.get(("scorehost", script, c))
        if server == "scorehost" or ours is None:
            continue
        div = lambda a, b: (a / b) if b else None  # noqa: E731
        out.append({"against": server, "script": script, "clients": c, "img_s": div(ours.img_s, theirs.img_s),
                    "req_s": div(ours.req_s, theirs.req_s), "p99": div(ours.p99_ms, theirs.p99_ms),
                    "rss": div(ours.rss_mb or 0, theirs.rss_mb or 0),
                    "cpu": div(ours.cpu_ms_per_request or 0, theirs.cpu_ms_per_request or 0)})
    return out


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}x"


def commit() -> str:
    """The checkout's commit (`-dirty` with changes), "-" outside one."""
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "-"
    except OSError:
        return "-"


def head(command: str) -> str:
    """The lines every report (bench's matrix and scenarios, tune's frontier) opens with, so that a figure can be
    traced to what ran it: command, code, date, machine and versions."""
    from scorehost import __version__

    return (f"- command: `{command}`\n- commit: {commit()}\n- date: {time.strftime('%Y-%m-%d %H:%M %Z')}\n"
            f"- machine: {platform.node()}: {os.cpu_count()} cores, {platform.system()} {platform.machine()}, "
            f"Python {platform.python_version()}, scorehost {__version__}\n")


def markdown(results: list[Result], command: str, seconds: float, servers: str = "") -> str:
    """The report; `servers`: what each server was (run.Roster.markdown), after the head."""
    parts = [f"# scorehost bench\n\n{head(command)}- budget: {seconds:g} s per cell, closed-loop clients\n",
             *([servers] if servers else []),
             "## Results\n\n" + table(list(COLUMNS), [_row(r) for r in results])]
    thin = [r for r in results if r.requests < MIN_REQUESTS_FOR_P99]
    if thin:
        cells = ", ".join(f"{r.cell.server}/{r.cell.script}/{r.cell.concurrency} ({r.requests})" for r in thin)
        parts.append(f"**Warning**: fewer than {MIN_REQUESTS_FOR_P99} requests in {cells}: there, p99 is one of the "
                     "few slowest requests, not a percentile. Give those cells more time (`--seconds`).")
    failing = erred(results)
    if failing:
        parts.append(f"**Warning**: more than {ERROR_SHARE:.0%} of the answers were errors in "
                     + "; ".join(map(errors_line, failing))
                     + f". Those rows time the errors, not the script; {OWN_REQUESTS}.")
    rs = ratios(results)
    if rs:
        rows = [[r["against"], r["script"], str(r["clients"]), _fmt(r["req_s"]), _fmt(r["img_s"]), _fmt(r["p99"]),
                 _fmt(r["cpu"]), _fmt(r["rss"])] for r in rs]
        parts.append("## scorehost / each other server\n\nAbove 1 is better for req/s and img/s; below 1 is better "
                     "for p99, server CPU per request and memory.\n\n"
                     + table(["against", "script", "clients", "req/s", "img/s", "p99", "server CPU/req", "RSS"], rows))
    parts.append("## Plots\n\n![throughput](throughput.png)\n![latency](latency.png)\n![time split](time_split.png)"
                 "\n\n" + __doc__.split("\n\n", 1)[1].strip())
    return "\n\n".join(parts) + "\n"


def plots(results: list[Result], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scripts = sorted({r.cell.script for r in results})
    servers = sorted({r.cell.server for r in results})
    series = lambda server, script: sorted((r for r in results  # noqa: E731
                                            if r.cell.server == server and r.cell.script == script),
                                           key=lambda r: r.cell.concurrency)
    written = []

    fig, axes = plt.subplots(1, len(scripts), figsize=(5.5 * len(scripts), 4), squeeze=False)
    for ax, script in zip(axes[0], scripts):
        for server in servers:
            s = series(server, script)
            ax.plot([r.cell.concurrency for r in s], [r.img_s for r in s], marker="o", label=server)
        ax.set(title=f"{script}: throughput", xlabel="concurrent clients", ylabel="images/s (successful)")
        ax.set_ylim(bottom=0)
        _client_axis(ax, results)
        ax.legend()
        ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir, "throughput.png"))

    fig, axes = plt.subplots(1, len(scripts), figsize=(7.5 * len(scripts), 4), squeeze=False)
    for ax, script in zip(axes[0], scripts):
        for server, color in zip(servers, itertools.cycle(f"C{i}" for i in range(10))):
            s = series(server, script)
            x = [r.cell.concurrency for r in s]
            for attr, style in (("p50_ms", ":"), ("p95_ms", "--")):
                ax.plot(x, [getattr(r, attr) for r in s], style, color=color, marker=".",
                        label=f"{server} {attr.split('_')[0]}")
            # p99 only where it rests on enough requests; elsewhere a hollow marker, named in the legend
            ax.plot(x, [r.p99_ms if r.requests >= MIN_REQUESTS_FOR_P99 else None for r in s], "-", color=color,
                    marker=".", label=f"{server} p99")
            thin = [r for r in s if r.requests < MIN_REQUESTS_FOR_P99]
            if thin:
                ax.plot([r.cell.concurrency for r in thin], [r.p99_ms for r in thin], "o", mfc="none", color=color,
                        label=f"{server} p99 from < {MIN_REQUESTS_FOR_P99} requests")
        ax.set(title=f"{script}: latency", xlabel="concurrent clients", ylabel="ms")
        ax.set_ylim(bottom=0)
        _client_axis(ax, results)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
        ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir, "latency.png"))

    fig, axes = plt.subplots(1, len(scripts), figsize=(5.5 * len(scripts), 4.8), squeeze=False)
    for ax, script in zip(axes[0], scripts):
        labels, model, rest = [], [], []
        for server in servers:
            for r in series(server, script):
                if r.run_mean_ms is None:
                    continue  # a peer does not say how long its model took
                labels.append(f"{server}\n{r.cell.concurrency}")
                model.append(r.run_mean_ms)
                rest.append(r.overhead_mean_ms)
        x = range(len(labels))
        ax.bar(x, model, label="inside run() (model)")
        ax.bar(x, rest, bottom=model, label="everything else (server, network, client)")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set(title=f"{script}: where the mean latency goes", ylabel="ms", xlabel="server / clients")
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.12), ncol=2, borderaxespad=0)  # above the bars
    written.append(_save(fig, out_dir, "time_split.png"))
    return written


def _client_axis(ax, results: list[Result]) -> None:
    """Clients are whole numbers: a tick at each concurrency measured, none between."""
    ax.set_xticks(sorted({r.cell.concurrency for r in results}))


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(results: list[Result], out_dir: str, command: str, seconds: float, servers: str = "") -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump([{**dataclasses.asdict(r), "overhead_mean_ms": r.overhead_mean_ms} for r in results], f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(results, command, seconds, servers))
    plots(results, out_dir)
    return os.path.join(out_dir, "report.md")
