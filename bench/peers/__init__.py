"""The peer servers (TorchServe, LitServe, MLServer, BentoML, Ray Serve), as the benchmarks drive them.

Each peer serves issue 22's proxy of a GPU script (proxy.py: a Pillow decode per request, then a batch call costing
PIPELINE_COST_S whatever its size) with its own batching, from its own virtualenv PEERS_DIR/NAME/bin/python
(`bash bench/peers/install.sh` makes them; they are not scorehost's dependencies). scorehost's side of the same
proxy is tests/scripts/pipeline.py. The *_peer.py scripts beside this file run in those virtualenvs; this module
runs in scorehost's: it starts them and says how each is sent a JPEG. Used by bench/batching_table.py and
`scorehost bench --servers ... PEER` (bench/run.py, bench/scenarios.py).
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import os
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Optional

from scorehost import processes

if TYPE_CHECKING:
    from bench import loadgen

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("torchserve", "litserve", "mlserver", "bentoml", "rayserve")
PROXY_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "tests", "scripts", "pipeline.py")
DEFAULT_DIR = os.environ.get("SCOREHOST_PEERS_DIR", os.path.expanduser("~/.cache/scorehost-peers"))
_JSON_BODY = {  # peers that read JSON only: the JPEG in base64
    "litserve": lambda b64: {"image": b64},
    "bentoml": lambda b64: {"images": [b64]},  # a batchable API takes a list (and answers one)
}
_BASE_PATH = {"torchserve": "/predictions"}  # TorchServe's model is named "score": POST /predictions/score


@dataclasses.dataclass
class Peer:
    name: str
    process: processes.ServerProcess
    url: str  # the base URL: POST url + "/score" scores one JPEG
    stats: str  # the proxy's log of each batch call's size (one line a call)


def body(name: str, jpeg: bytes) -> tuple[str, bytes]:
    """(content type, body) that sends `jpeg` to server `name` (a peer, or scorehost/AIHS: the JPEG as it is)."""
    if name in _JSON_BODY:
        return "application/json", json.dumps(_JSON_BODY[name](base64.b64encode(jpeg).decode())).encode()
    return "image/jpeg", jpeg


def bodies(name: str, items: "loadgen.Bodies") -> "loadgen.Bodies":
    """The same load as server `name` reads it: each single JPEG ("image") re-shaped by `body`."""
    return dataclasses.replace(items, items=tuple((label, *body(name, data)) if label == "image" else
                                                  (label, content_type, data)
                                                  for label, content_type, data in items.items))


def post(name: str, url: str, jpeg: bytes, timeout: float = 30) -> tuple[int, bytes]:
    """POST one JPEG to server `name` at base `url`: (status, body)."""
    content_type, data = body(name, jpeg)
    request = urllib.request.Request(url + "/score", data, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as ex:
        return ex.code, b""


def wait_answering(name: str, process: processes.ServerProcess, url: str, timeout: float,
                   jpeg: Optional[bytes] = None) -> None:
    """Up when it answers a real request 200 (the peers have no common readiness route)."""
    if jpeg is None:
        from PIL import Image

        out = io.BytesIO()
        Image.new("RGB", (64, 48), (90, 120, 30)).save(out, "JPEG")
        jpeg = out.getvalue()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.proc.poll() is not None:
            raise RuntimeError(f"{name} exited ({process.proc.returncode}):\n{process.output()[-3000:]}")
        try:
            if post(name, url, jpeg, timeout=5)[0] == 200:
                process.note_strays()
                return
        except (OSError, http.client.HTTPException):  # not listening yet, or a half-started server
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} not answering after {timeout} s:\n{process.output()[-3000:]}")


def skip_reason(process: processes.ServerProcess, error: Exception) -> str:
    """Why a peer that was started is skipped, in one line (`scorehost bench` and the batching table say it alike):
    what went wrong, the last line of its log (scorehost's own last `scorehost: ...` line where it wrote one: the
    cause, before gunicorn's shutdown lines), and where the log is (kept for the reader)."""
    lines = [line.strip() for line in process.output().splitlines() if line.strip()]
    last = ([line for line in lines if line.startswith("scorehost:")] or lines)[-1:]
    return (str(error).splitlines()[0].rstrip(":") + (f" ({last[0][:200]})" if last else "")
            + f"; its log: {process.log_path}")


def scorehost_setup(cost_s: float, batch_max: int) -> tuple[dict[str, str], tuple[str, ...]]:
    """(environment, flags) with which scorehost serves the proxy: batching, one model process (one visible GPU,
    as on a one-GPU machine), at most `batch_max` a batch; its HTTP workers its own default (workers=None)."""
    return {"PIPELINE_COST_S": str(cost_s), "CUDA_VISIBLE_DEVICES": "0"}, ("--batch-max", str(batch_max))


class Unavailable(Exception):
    """A peer that cannot be measured here (not installed, or it did not start): skipped, with this reason."""


_PACKAGE = {"rayserve": "ray"}  # a peer's package, where it is not the peer's name


def python(name: str, peers_dir: str) -> str:
    return os.path.join(peers_dir, name, "bin", "python")


def version(name: str, peers_dir: str) -> str:
    """The peer's package version in its virtualenv (install.sh takes the latest: the report says which ran)."""
    import subprocess

    try:
        done = subprocess.run([python(name, peers_dir), "-c", "import importlib.metadata as m, sys; "
                               "print(m.version(sys.argv[1]))", _PACKAGE.get(name, name)], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return "version unknown"
    return done.stdout.strip() or "version unknown"


def about(name: str, peers_dir: str, max_batch: int, delay_ms: float) -> str:
    """One line for the report: what ran, how it batched, what it was sent."""
    sent = "base64 JSON" if name in _JSON_BODY else "the JPEG"
    return (f"{name} {version(name, peers_dir)}: its own batching, at most {max_batch} a call, {delay_ms:g} ms "
            f"delay bound; one model copy; sent {sent}")


def start(name: str, peers_dir: str, scratch: str, *, cost_s: float, max_batch: int, delay_ms: float,
          workers: int = 1) -> Peer:
    """Start peer `name` on a free port with its own batching (at most `max_batch` a call, `delay_ms` its delay
    bound, `workers` model copies). Not ready yet: it has no readiness route, so the caller waits for a real
    answer (`wait_answering`). Unavailable when it is not installed."""
    executable = python(name, peers_dir)
    if not os.path.exists(executable):
        raise Unavailable(f"not installed ({executable} missing; bash bench/peers/install.sh {peers_dir} {name} "
                          "makes it)")
    port = processes.free_port()
    stats = os.path.join(scratch, f"{name}.calls")
    open(stats, "w").close()
    argv = [executable, os.path.join(HERE, f"{name}_peer.py"), "--port", str(port), "--max-batch", str(max_batch),
            "--delay-ms", str(delay_ms), "--workers", str(workers)]
    env = {**os.environ, "PIPELINE_COST_S": str(cost_s), "PROXY_STATS": stats, "PYTHONUNBUFFERED": "1"}
    try:
        process = processes.ServerProcess(name, argv, env, port, scratch)
    except OSError as ex:  # a python that is not executable, a broken virtualenv
        raise Unavailable(f"cannot be started ({ex})") from None
    return Peer(name, process, process.url + _BASE_PATH.get(name, ""), stats)
