"""How long a normal request takes while slow, silent or idle clients hold connections to the server.

    python -m bench.slow_clients [--kind scorehost] [--stalled 64] [--silent 500] [--non-readers 4] [--idle 1000]

Starts the server (default settings) on bench/scripts/large_answer.py, then, one scenario at a time, opens the
bad connections, sends 20 normal requests and reports their median and worst latency. Traffic stays on 127.0.0.1;
every connection is closed at the end of its scenario.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import socket
import statistics
import time
from typing import Callable

from scorehost import processes

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "large_answer.py")


def _normal(port: int, timeout: float = 10) -> float:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/score", body=b"0")
        response = conn.getresponse()
        response.read()
        assert response.status == 200, response.status
    finally:
        conn.close()
    return (time.perf_counter() - started) * 1000


def _open(port: int, count: int, first_bytes: bytes, then: Callable[[socket.socket], None] = lambda s: None):
    sockets = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if first_bytes:
            s.sendall(first_bytes)
        then(s)
        sockets.append(s)
    return sockets


def scenarios(args: argparse.Namespace) -> dict[str, tuple[int, bytes, Callable[[socket.socket], None]]]:
    read_answer = lambda s: s.recv(65536)  # noqa: E731 - an idle keep-alive connection has had one answer
    return {
        "stalled uploads (headers + part of a body)": (
            args.stalled, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0", lambda s: None),
        "silent connections (nothing sent)": (args.silent, b"", lambda s: None),
        "clients that never read a 16 MiB answer": (
            args.non_readers, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n16", lambda s: None),
        "idle keep-alive connections": (args.idle, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", read_answer),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="scorehost")
    parser.add_argument("--stalled", type=int, default=64)
    parser.add_argument("--silent", type=int, default=500)
    parser.add_argument("--non-readers", type=int, default=4)
    parser.add_argument("--idle", type=int, default=1000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = {}
    with processes.running(args.kind, SCRIPT) as server:
        results["nothing else"] = [_normal(server.port) for _ in range(20)]
        for name, (count, first, then) in scenarios(args).items():
            held = _open(server.port, count, first, then)
            try:
                time.sleep(0.5)
                results[f"{count} {name}"] = [_normal(server.port) for _ in range(20)]
            except (OSError, http.client.HTTPException) as ex:
                results[f"{count} {name}"] = [float("inf")]
                print(f"{name}: no answer within 10 s ({type(ex).__name__})")
            finally:
                for s in held:
                    s.close()
    print(json.dumps({name: {"median_ms": round(statistics.median(v), 2), "worst_ms": round(max(v), 2)}
                      for name, v in results.items()}, indent=1))


if __name__ == "__main__":
    main()
