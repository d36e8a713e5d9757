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
from typing import Callable, Iterable, Iterator, Optional


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running server: `url`, `pid`, its log file, and stop(). The log is removed when the server stops, unless
    someone was told where it is (`log_path`); its text stays readable (`output`) either way."""

    def __init__(self, kind: str, argv: list[str], env: dict[str, str], port: int, cwd: Optional[str]):
        self.kind, self.port = kind, port
        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.NamedTemporaryFile(prefix=f"{kind}-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self._strays: set[tuple[int, str]] = set()
        self._keep_log = False
        self._output: Optional[str] = None  # the log's text, once stop() has removed the file

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log_path(self) -> str:
        """The log file's path, for a message: a log someone was told of is kept when the server stops."""
        self._keep_log = True
        return self.log.name

    def output(self) -> str:
        if self._output is not None:
            return self._output
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_healthy(self, timeout: float, progress: Optional[Callable[[float], None]] = None,
                     every_s: float = 30.0) -> "ServerProcess":
        """Until it answers (scorehost: /ready; AIHS: /); `progress(seconds waited)` every `every_s` meanwhile, so a
        slow start is not silence. RuntimeError with its output when it exits first or `timeout` passes."""
        started = time.monotonic()
        deadline, said = started + timeout, started
        while time.monotonic() < deadline:
            if progress is not None and time.monotonic() - said >= every_s:
                said = time.monotonic()
                progress(said - started)
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode} before it was healthy:\n"
                                   f"{self.output()[-5000:]}")
            try:  # scorehost: ready (every model process warm); AIHS has liveness only
                with urllib.request.urlopen(self.url + ("/ready" if self.kind == "scorehost" else "/"), timeout=1) as r:
                    if r.status == 200:
                        self.note_strays()
                        return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.kind} not healthy after {timeout} s:\n{self.output()[-5000:]}")

    def note_strays(self) -> None:
        """Remember the descendants that live in process groups of their own (Ray Serve's actors do): stop() ends
        them too, even once the server's own process is gone and they were handed to init. Called when the server
        answers, and on stop()."""
        for pid in process_tree(self.proc.pid)[1:]:
            identity = _identity(pid)
            if identity is not None and identity[0] != self.proc.pid and pid != os.getpid():
                self._strays.add((pid, identity[1]))

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM to its process group and to its strays (`note_strays`), SIGKILL to what is left after
        `timeout`, so that the next server measured has the machine to itself."""
        if self.proc.poll() is None:
            self.note_strays()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
        _signal(self._strays, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        while _signal(self._strays, 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal(self._strays, signal.SIGKILL)
        self._strays.clear()
        self.log.close()
        if not self._keep_log and self._output is None:  # a bench run or a test suite left hundreds in /tmp
            self._output = self.output()
            with contextlib.suppress(OSError):
                os.unlink(self.log.name)
        return self.proc.returncode


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (a gunicorn master and its workers, a peer server's actors), from /proc
    (where there is none: the process alone)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return [pid]
    for entry in entries:
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


def _identity(pid: int) -> Optional[tuple[int, str]]:
    """(process group, start time) of a live process, None for one gone (or a zombie): the start time tells a
    process from a later one that reused its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else (int(fields[2]), fields[19])


def _signal(strays: set[tuple[int, str]], sig: int) -> list[int]:
    """Send `sig` to each of `strays` (pid, start time) still alive as itself; the pids it was sent to (`sig` 0:
    none sent, only which are alive)."""
    alive = []
    for pid, started in strays:
        identity = _identity(pid)
        if identity is not None and identity[1] == started:
            alive.append(pid)
            if sig:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
    return alive


def stop_all(servers: "Iterable[ServerProcess]") -> None:
    """Stop every one, even when stopping one fails or is interrupted (a second Ctrl-C): they run in sessions of
    their own and would outlive the caller. The first exception is raised after."""
    error: Optional[BaseException] = None
    for server in servers:
        try:
            server.stop()
        except BaseException as ex:  # noqa: B036 - the others are stopped first
            error = error or ex
    if error is not None:
        raise error


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
