"""`scorehost parity URL [--key K] [--deployment NAME]`: replay one request corpus against a deployed endpoint and
a local server, and print a per-request diff. Exit status 0 only when every answer matches. With --deployment, every
request carries Azure ML's `azureml-model-deployment` header, so it reaches that deployment even with no traffic:
`deploy aks` checks a new deployment this way before moving traffic to it.

The corpus is scorehost/corpus.py's labelled requests: JPEGs of several sizes, a PNG, a JSON batch, and each bad
input score.py refuses, with the status it must get. Compared: the status (with each other, and with the expected
one), and the JSON body; probabilities within an absolute tolerance (GPU and CPU kernels differ in
the last digits), everything else exactly; `request_id` is ignored (random by design).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Optional

from deploy.settings import DeployError
from scorehost.corpus import Probe, labelled

TOLERANCE = 1e-3
DEPLOYMENT_HEADER = "azureml-model-deployment"


def send(url: str, probe: Probe, key: str = "", timeout: float = 120, deployment: str = "") -> tuple[int, Any]:
    headers = {"Content-Type": probe.content_type} if probe.content_type else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if deployment:
        headers[DEPLOYMENT_HEADER] = deployment
    request = urllib.request.Request(url, probe.body if probe.method == "POST" else None, headers,
                                     method=probe.method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, OSError) as e:  # refused, unknown host, TLS, timeout: nothing to compare
        raise DeployError(f"scorehost parity: cannot reach {url}: {getattr(e, 'reason', e)}") from e
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def diff(a: Any, b: Any, path: str = "", tolerance: float = TOLERANCE) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - {"request_id"}
        return [d for k in sorted(keys) for d in diff(a.get(k), b.get(k), f"{path}.{k}", tolerance)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]", tolerance)]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return [] if abs(a - b) <= tolerance else [f"{path}: {a} != {b} (tolerance {tolerance})"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def refused(url: str, status: int, key: str) -> DeployError:
    return DeployError(f"scorehost parity: {url} answered {status}: " + (
        "the key was refused (is it this endpoint's? az ml online-endpoint get-credentials)" if key else
        "it needs a key: pass --key K (az ml online-endpoint get-credentials)"))


def compare(remote: str, local: str, key: str = "", local_key: str = "", tolerance: float = TOLERANCE,
            say=print, deployment: str = "") -> bool:
    """Replay the corpus against both; True when every answer matches. A refused key stops at the first answer."""
    all_match = True
    for probe in labelled():
        r_status, r_body = send(remote, probe, key, deployment=deployment)
        if r_status in (401, 403):
            raise refused(remote, r_status, key)
        l_status, l_body = send(local, probe, local_key)
        problems = ([f"status {r_status} != {l_status}"] if r_status != l_status else []) + \
            ([f"status {r_status}, expected {probe.status}"] if r_status == l_status != probe.status else []) + \
            diff(r_body, l_body, "body", tolerance)
        all_match &= not problems
        say(f"{'ok  ' if not problems else 'DIFF'} {probe.name:18} {r_status}" +
            "".join(f"\n       {p}" for p in problems[:10]))
    say("parity: all answers match" if all_match else "parity: answers differ")
    return all_match


def score_url(url: str) -> str:
    """Accept a base URL or a scoring URI."""
    url = url.rstrip("/")
    return url if url.endswith("/score") else url + "/score"


def run(url: str, key: str = "", local: Optional[str] = None, model_dir: Optional[str] = None,
        tolerance: float = TOLERANCE, deployment: str = "") -> int:
    """Compare `url` with `local` (a running server), or with a local scorehost started here on the demo model
    (once `url` is known to answer and to take the key: starting a server to compare with nothing is a minute lost)."""
    status, _ = send(score_url(url), labelled()[0], key, deployment=deployment)
    if status in (401, 403):
        raise refused(score_url(url), status, key)
    if local:
        return 0 if compare(score_url(url), score_url(local), key, tolerance=tolerance, deployment=deployment) else 1
    from scorehost import REFERENCE_SCRIPT, processes
    from scorehost.models import demo_model_dir

    with processes.running("scorehost", REFERENCE_SCRIPT, model_dir or demo_model_dir(), timeout=300) as server:
        return 0 if compare(score_url(url), server.url + "/score", key, tolerance=tolerance,
                            deployment=deployment) else 1
