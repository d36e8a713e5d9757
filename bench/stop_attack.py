"""A graceful stop under load, attacked from outside: clients open a new connection for every POST while SIGTERM
comes, and each outcome is counted: an answer (its status), a refusal (the listeners are closed: the client may
retry), or a reset (the connection was accepted, then dropped unanswered: the failure this looks for).

    python -m bench.stop_attack --rounds 3            # batching mode (one model process) and plain, 3 rounds each

Figures: bench/RESULTS.md section 5.
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import signal
import socket
import threading
import time

from PIL import Image

from bench import peers
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


def attack(batching: bool, clients: int, stop_after_s: float) -> collections.Counter:
    env = {"PIPELINE_COST_S": "0.04", **({"CUDA_VISIBLE_DEVICES": "0"} if batching else {})}
    server = processes.start("scorehost", peers.PROXY_SCRIPT, env=env, workers=2)
    server.wait_healthy(60)
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(jpeg, "JPEG")
    body, seen = jpeg.getvalue(), collections.Counter()
    until = time.monotonic() + stop_after_s + 1.5

    def client() -> None:
        while time.monotonic() < until:
            seen[outcome(server.port, body)] += 1
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(stop_after_s)
    os.kill(server.pid, signal.SIGTERM)
    for t in threads:
        t.join()
    server.stop()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    for batching in (True, False):
        for _ in range(args.rounds):
            seen = attack(batching, args.clients, 1.0)
            print("batching" if batching else "plain", dict(sorted(seen.items())), flush=True)


if __name__ == "__main__":
    main()
