"""Starts a scoring server (scorehost, or Azure ML's azmlinfsrv for comparison) as a child process on 127.0.0.1.

Tests, `scorehost bench` and `scorehost parity` all need "a real server with this script, ready": this is that,
once. A server that dies before it is healthy raises with its output, so a failed start reads as such.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Iterator, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running server: `url`, `pid`, its log file, and stop()."""

    def __init__(self, kind: str, argv: list[str], env: dict[str, str], port: int, cwd: Optional[str]):
        self.kind, self.port = kind, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"{kind}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_healthy(self, timeout: float) -> "ServerProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode} before it was healthy:\n"
                                   f"{self.output()[-5000:]}")
            try:  # scorehost: ready (every model process warm); AIHS has liveness only
                with urllib.request.urlopen(self.url + ("/ready" if self.kind == "scorehost" else "/"), timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.kind} not healthy after {timeout} s:\n{self.output()[-5000:]}")

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM to its process group, SIGKILL after `timeout`; then the same for any descendant that lives on
        in a group of its own (Ray Serve's actors do), so the next server measured has the machine to itself."""
        if self.proc.poll() is None:
            descendants = process_tree(self.proc.pid)[1:]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            _end(descendants, timeout)
        return self.proc.returncode


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (a gunicorn master and its workers, a peer server's actors), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def _end(pids: list[int], timeout: float) -> None:
    """SIGTERM each process still alive, SIGKILL what is left after `timeout`."""
    def alive() -> list[int]:
        left = []
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                        left.append(pid)
            except OSError:
                continue
        return left

    for pid in alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _bin(name: str) -> str:
    beside = os.path.join(os.path.dirname(sys.executable), name)
    return beside if os.path.exists(beside) else (shutil.which(name) or name)


def start(kind: str, entry_script: str, model_dir: Optional[str] = None, *, port: Optional[int] = None,
          workers: Optional[int] = 1, env: Optional[dict[str, str]] = None, extra_args: tuple[str, ...] = (),
          cwd: Optional[str] = None) -> ServerProcess:
    """Start `kind` ("scorehost" or "aihs") serving `entry_script`; call wait_healthy() on the result."""
    port = port or free_port()
    entry_script = os.path.abspath(entry_script)
    model_dir = os.path.abspath(model_dir) if model_dir else None
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0",
                **(env or {})}
    cwd = cwd or os.path.dirname(os.path.abspath(entry_script))
    full_env.setdefault("AML_APP_ROOT", cwd)
    if kind == "scorehost":
        argv = [_bin("scorehost"), "serve", "--entry-script", entry_script, "--port", str(port), *extra_args]
        if workers is not None:  # None: scorehost's default (one per GPU)
            argv += ["--workers", str(workers)]
        if model_dir:
            argv += ["--model-dir", model_dir]
    elif kind == "aihs":
        argv = [_bin("azmlinfsrv"), "--entry_script", entry_script, "--port", str(port),
                "--worker_count", str(workers or 1), *extra_args]
        if model_dir:
            argv += ["--model_dir", model_dir]
    else:
        raise ValueError(f"unknown server kind {kind!r}")
    return ServerProcess(kind, argv, full_env, port, cwd)


@contextlib.contextmanager
def running(kind: str, entry_script: str, model_dir: Optional[str] = None, *, timeout: float = 120,
            **kwargs) -> Iterator[ServerProcess]:
    server = start(kind, entry_script, model_dir, **kwargs)
    try:
        yield server.wait_healthy(timeout)
    finally:
        server.stop()
