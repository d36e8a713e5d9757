"""A graceful stop under load, attacked from outside: clients open a new connection for every POST while SIGTERM
comes (or, with --keep-alive, reuse one, a random pause of up to 50 ms between requests, while a reload comes:
SIGHUP), and each outcome is counted: an answer (its status), a refusal (the listeners are closed: the client may
retry), or a reset (a request sent on a connection the server accepted, then dropped unanswered: the failure this
looks for; on a kept-alive connection, a broken pipe or a close before the answer too).

    python -m bench.stop_attack --rounds 3               # batching mode (one model process) and plain, 3 rounds each
    python -m bench.stop_attack --rounds 2 --keep-alive  # the same, kept-alive clients and a reload

Figures: bench/RESULTS.md section 5.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import io
import os
import random
import signal
import socket
import threading
import time

from PIL import Image

from bench import peers

TRIVIAL_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "trivial.py")
from scorehost import processes


def outcome(port: int, body: bytes) -> str:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    except ConnectionRefusedError:
        return "refused"
    try:
        with sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: image/jpeg\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
        return reply[9:12].decode() or "closed unanswered"
    except ConnectionResetError:
        return "reset"


def kept_alive(port: int, body: bytes, until: float, seen: collections.Counter) -> None:
    """One client reusing its connection until the server closes it, a random pause of up to 50 ms between requests
    (a client that thinks), as long as `until`."""
    conn: "http.client.HTTPConnection | None" = None
    while time.monotonic() < until:
        time.sleep(random.random() * 0.05)
        conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("POST", "/score", body, {"Content-Type": "image/jpeg"})
            answer = conn.getresponse()
            answer.read()
            seen[str(answer.status)] += 1
            if answer.getheader("Connection", "").lower() != "close":
                continue
        except ConnectionRefusedError:
            seen["refused"] += 1
        except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
            seen["reset"] += 1
        conn.close()
        conn = None


def attack(batching: bool, clients: int, stop_after_s: float, keep_alive: bool = False) -> collections.Counter:
    env = {"PIPELINE_COST_S": "0.04", **({"CUDA_VISIBLE_DEVICES": "0"} if batching else {})}
    # Kept-alive clients against a fast script (a trivial one, plain): their connections idle between requests,
    # where a reload's close meets them.
    script = TRIVIAL_SCRIPT if keep_alive and not batching else peers.PROXY_SCRIPT
    server = processes.start("scorehost", script, env=env, workers=2)
    server.wait_healthy(60)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(jpeg, "JPEG")
    body, seen = jpeg.getvalue(), collections.Counter()
    until = time.monotonic() + stop_after_s + (6 if keep_alive else 1.5)

    def client() -> None:
        if keep_alive:
            kept_alive(server.port, body, until, seen)
            return
        while time.monotonic() < until:
            seen[outcome(server.port, body)] += 1
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(stop_after_s)
    os.kill(server.pid, signal.SIGHUP if keep_alive else signal.SIGTERM)
    for t in threads:
        t.join()
    server.stop()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--keep-alive", action="store_true",
                        help="clients reuse their connections, and the server is reloaded (SIGHUP), not stopped")
    args = parser.parse_args()
    for batching in (True, False):
        for _ in range(args.rounds):
            seen = attack(batching, args.clients, 1.0 if not args.keep_alive else 2.0, args.keep_alive)
            print("batching" if batching else "plain", dict(sorted(seen.items())), flush=True)


if __name__ == "__main__":
    main()
