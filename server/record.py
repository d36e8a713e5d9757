"""`scorehost serve --record DIR`: keep each request the server answers, with its answer, for a later replay.

`scorehost parity URL --replay DIR` (deploy/parity.py) sends the recorded requests to a deployed endpoint and
compares its answers with the recorded ones, so any script's own traffic can gate a deployment, not only the demo
corpus. The format, one JSON file per exchange, named `000000.json`, `000001.json`... in the order they were
recorded (across every worker):

    {"format": "scorehost-record/1", "recorded_at": "2026-12-01T10:00:00.123Z",
     "request":  {"method": "POST", "path": "/score", "query": "a=1",
                  "headers": [["Content-Type", "application/json"], ...], "body_base64": "..."},
     "response": {"status": 200, "headers": [["Content-Type", "application/json"], ...], "body_base64": "..."}}

Request headers are kept without `Authorization` (the key never reaches the disk); response headers are the
app's (Content-Type, the contract headers, the script's own). Probes and counters (`GET /`, `/ready`, `/metrics`)
and answers about the key (401) are not recorded: they say nothing about the script. DIR is bounded by
--record-max-count and --record-max-bytes: once either is reached, new exchanges are not written (the oldest are
kept) and the log says so once per worker.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import os
from typing import Any, Iterator, Optional

from .settings import BY_NAME, SettingError, Settings

log = logging.getLogger("scorehost.record")

FORMAT = "scorehost-record/1"
NOT_RECORDED = ("/", "/ready", "/metrics")
SECRET_HEADERS = ("authorization",)
_STATE = ".scorehost-record.state"  # {"count", "bytes"} of the files written, kept under a lock across workers


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One recorded request and its answer; `name` is the file's name without `.json`."""
    name: str
    method: str
    path: str
    query: str
    request_headers: list[tuple[str, str]]
    request_body: bytes
    status: int
    response_headers: list[tuple[str, str]]
    response_body: bytes

    def header(self, name: str) -> Optional[str]:
        """A response header, by case-insensitive name."""
        return next((v for k, v in self.response_headers if k.lower() == name.lower()), None)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT,
                "recorded_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
                "request": {"method": self.method, "path": self.path, "query": self.query,
                            "headers": [list(h) for h in self.request_headers],
                            "body_base64": base64.b64encode(self.request_body).decode()},
                "response": {"status": self.status, "headers": [list(h) for h in self.response_headers],
                             "body_base64": base64.b64encode(self.response_body).decode()}}

    @classmethod
    def from_json(cls, name: str, data: dict[str, Any]) -> "Exchange":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file (format {data.get('format')!r})")
        request, response = data["request"], data["response"]
        return cls(name, request["method"], request["path"], request.get("query", ""),
                   [(k, v) for k, v in request["headers"]], base64.b64decode(request["body_base64"]),
                   int(response["status"]), [(k, v) for k, v in response["headers"]],
                   base64.b64decode(response["body_base64"]))


def load(directory: str) -> list[Exchange]:
    """Every exchange recorded in `directory`, in recording order; a file that is not one is a one-line error."""
    if not os.path.isdir(directory):
        raise ValueError(f"{directory} is not a directory of recorded requests")
    exchanges = []
    for file in sorted(f for f in os.listdir(directory) if f.endswith(".json")):
        try:
            with open(os.path.join(directory, file), encoding="utf-8") as f:
                exchanges.append(Exchange.from_json(file[:-len(".json")], json.load(f)))
        except (OSError, ValueError, KeyError, TypeError) as ex:
            raise ValueError(f"{os.path.join(directory, file)}: {ex}") from None
    if not exchanges:
        raise ValueError(f"{directory} holds no recorded requests (scorehost serve --record {directory} writes them)")
    return exchanges


def check(settings: Settings) -> None:
    """Before anything starts: the directory can be written (the bounds are checked with their settings)."""
    if settings.record:
        try:
            os.makedirs(settings.record, exist_ok=True)
            with _locked(settings.record):
                pass
        except OSError as ex:
            raise SettingError(BY_NAME["record"], f"cannot write to {settings.record}: {ex.strerror}") from None


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    with open(os.path.join(directory, _STATE + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class Recorder:
    """Writes exchanges into one directory, shared by every worker (a file lock keeps the numbering and the
    bounds exact across processes)."""

    def __init__(self, directory: str, max_count: int, max_bytes: int):
        self.directory, self.max_count, self.max_bytes = directory, max_count, max_bytes
        self.said_full = False

    @classmethod
    def from_settings(cls, settings: Settings) -> Optional["Recorder"]:
        return cls(settings.record, settings.record_max_count, settings.record_max_bytes) if settings.record \
            else None

    def wants(self, path: str, status: int) -> bool:
        return path not in NOT_RECORDED and status != 401

    def save(self, exchange: Optional[Exchange]) -> Optional[str]:
        """Write one exchange; None when there is none, when the directory is full, or when it cannot be written
        (logged, never raised: recording never fails a request)."""
        if exchange is None:
            return None
        data = json.dumps(exchange.to_json()).encode()
        try:
            with _locked(self.directory):
                state_path = os.path.join(self.directory, _STATE)
                try:
                    with open(state_path, encoding="utf-8") as f:
                        state = json.load(f)
                except (OSError, ValueError):
                    state = self._count_existing()
                if state["count"] + 1 > self.max_count or state["bytes"] + len(data) > self.max_bytes:
                    self._say_full(state)
                    return None
                path = os.path.join(self.directory, f"{state['count']:06d}.json")
                with open(path, "wb") as f:
                    f.write(data)
                state = {"count": state["count"] + 1, "bytes": state["bytes"] + len(data)}
                with open(state_path, "w", encoding="utf-8") as f:
                    json.dump(state, f)
                return path
        except OSError as ex:
            if not self.said_full:
                log.warning("recording into %s failed: %s; requests are still answered", self.directory, ex)
                self.said_full = True
            return None

    def _count_existing(self) -> dict[str, int]:
        """A directory recorded into before (or by an older run): go on after what it holds."""
        files = [f for f in os.listdir(self.directory) if f.endswith(".json") and f[:-5].isdigit()]
        return {"count": max((int(f[:-5]) + 1 for f in files), default=0),
                "bytes": sum(os.path.getsize(os.path.join(self.directory, f)) for f in files)}

    def _say_full(self, state: dict[str, int]) -> None:
        if not self.said_full:
            log.warning("recording stopped: %s holds %d exchanges, %d bytes (limits --record-max-count %d, "
                        "--record-max-bytes %d); the oldest are kept", self.directory, state["count"],
                        state["bytes"], self.max_count, self.max_bytes)
            self.said_full = True


def exchange_of(request: Any, response: Any) -> Optional[Exchange]:
    """The exchange a Flask request and its finished response make (None for a streamed answer, which has no body
    to keep)."""
    if response.is_streamed:
        return None
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in SECRET_HEADERS]
    try:
        body = request.get_data(cache=True)
    except Exception:  # noqa: BLE001 - a body refused as too large or unreadable: its answer is still recorded
        body = b""
    return Exchange("", request.method, request.path, request.query_string.decode("latin-1"), headers, body,
                    response.status_code, list(response.headers.items()),
                    b"" if request.method == "HEAD" else response.get_data())  # what the wire carries
