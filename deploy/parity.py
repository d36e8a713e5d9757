"""`scorehost parity URL`: send requests to a deployed endpoint and compare its answers with the local answers to the
same requests; one line per request, then a summary. Exit status 0 only when every answer matches. With
--deployment, every request carries Azure ML's `azureml-model-deployment` header, so it reaches that deployment even
with no traffic: `deploy aks|managed` gates a new deployment this way before moving traffic to it.

Where the requests and the local answers come from:
- `--replay DIR`: the exchanges `scorehost serve --record DIR` wrote (server/record.py) while serving the user's own
  script: any script can be checked with the requests its clients send.
- otherwise, the corpus made for the reference score.py (scorehost/corpus.py: JPEGs, a PNG, a JSON batch and each
  bad input), answered first by a local server on the same model (started here, or `--local URL`).

Compared: the status, then the body: as JSON where both sides are JSON (numbers within --tolerance, since GPU and
CPU kernels differ in the last digits; each `--ignore PATH` and every `request_id` skipped), else byte for byte.
The target (--target) decides what the endpoint should answer:
- `kubernetes` (AKS, a plain server): what the container answered.
- `managed`: Azure's front end answers a container's non-200 with 424, the container's status in
  `ms-azureml-model-error-statuscode` and its body passed through; a request body over 1.5 MB gets 413, and an
  answer over 1.5 MB 424, before or after the container (learn.microsoft.com, "Troubleshooting online endpoints
  deployment and scoring", HTTP status codes).
"""

from __future__ import annotations

import json
import os
import re
import http.client
import urllib.parse
import urllib.request
from typing import Any, Callable, Iterable, Optional

from deploy.settings import DeployError, is_reference
from scorehost.corpus import Probe, labelled
from server.record import Exchange, load

TOLERANCE = 1e-3
DEPLOYMENT_HEADER = "azureml-model-deployment"
KUBERNETES, MANAGED = "kubernetes", "managed"
TARGETS = (KUBERNETES, MANAGED)
MODEL_ERROR_STATUS = "ms-azureml-model-error-statuscode"
# Azure says "1.5 megabytes" without saying which megabyte: a body between the two readings may get either answer.
MANAGED_LIMITS = (1_500_000, 1536 * 1024)
# Not sent again: the connection's own headers, those the sender sets itself, the key (sent as --key), and
# Accept-Encoding (answers are compared uncompressed).
NOT_REPLAYED = frozenset(("host", "content-length", "connection", "keep-alive", "transfer-encoding", "expect",
                          "authorization", "accept-encoding"))
SHOWN_BYTES = 60  # of each body on a line that differs
# Said wherever the corpus meets a server that answers it otherwise: most often a user's own script, which the
# corpus was never made for.
CORPUS_IS_THE_REFERENCES = ("these requests are for the reference score.py; for your own script, record its requests "
                            "with `scorehost serve --record DIR` and pass --replay DIR")


def _http(url: str, method: str, headers: Iterable[tuple[str, str]], body: bytes,
          timeout: float) -> tuple[int, list[tuple[str, str]], bytes]:
    """One request, with the headers given and no others but Host and Content-Length (urllib added its own
    User-Agent, and a form Content-Type to a body without one, which a script that reads them answered otherwise):
    (status, headers, body), whatever the status; unreachable is a one-line DeployError. A proxy the environment
    names (HTTPS_PROXY, ...) is used, as urllib did."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme == "https"
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and urllib.request.proxy_bypass(parts.hostname or ""):
        proxy = None
    target = f"{parts.path or '/'}" + (f"?{parts.query}" if parts.query else "")
    try:
        if proxy:
            via = urllib.parse.urlsplit(proxy if "://" in proxy else "http://" + proxy)
            conn = http.client.HTTPConnection(via.hostname, via.port or 80, timeout=timeout) if not https else \
                http.client.HTTPSConnection(via.hostname, via.port or 80, timeout=timeout)
            if https:
                conn.set_tunnel(parts.hostname, parts.port or 443)
            else:
                target = url
        else:
            conn = (http.client.HTTPSConnection if https else http.client.HTTPConnection)(
                parts.hostname, parts.port, timeout=timeout)
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            for name, value in headers:
                conn.putheader(name, value)
            if body or method not in ("GET", "HEAD", "OPTIONS", "DELETE"):
                conn.putheader("Content-Length", str(len(body)))
            conn.endheaders(body or None)
            answer = conn.getresponse()
            return answer.status, answer.getheaders(), answer.read()
        finally:
            conn.close()
    except (OSError, http.client.HTTPException) as e:  # refused, unknown host, TLS, timeout: nothing to compare
        raise DeployError(f"scorehost parity: cannot reach {url}: {e}") from e


def _auth(key: str, deployment: str) -> list[tuple[str, str]]:
    return ([("Authorization", f"Bearer {key}")] if key else []) + \
        ([(DEPLOYMENT_HEADER, deployment)] if deployment else [])


def send(url: str, probe: Probe, key: str = "", timeout: float = 120, deployment: str = "") -> tuple[int, Any]:
    """One corpus request: (status, body as JSON where it parses, else text)."""
    headers = ([("Content-Type", probe.content_type)] if probe.content_type else []) + _auth(key, deployment)
    status, _, raw = _http(url, probe.method, headers, probe.body if probe.method == "POST" else b"", timeout)
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def ignored(path: str, patterns: Iterable[str]) -> bool:
    """`--ignore` PATHs: `a.b`, `items[0].id`, with `*` for any key or index (`items[*].id`); a path ignores its
    whole subtree. Paths are written from the body's root, with or without a leading dot."""
    for pattern in patterns:
        regex = re.escape("." + pattern.lstrip(".") if not pattern.startswith("[") else pattern)
        if re.fullmatch(regex.replace(r"\*", r"[^.\[\]]+") + r"(?:[.\[].*)?", path):
            return True
    return False


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def diff(a: Any, b: Any, path: str = "", tolerance: float = TOLERANCE, ignore: tuple[str, ...] = ()) -> list[str]:
    """Where two JSON values differ, `path: a != b` each; numbers within `tolerance` when either is a float, and
    every `request_id` (random by design) skipped."""
    if ignore and ignored(path, ignore):
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        keys = (set(a) | set(b)) - {"request_id"}
        return [d for k in sorted(keys) for d in diff(a.get(k), b.get(k), f"{path}.{k}", tolerance, ignore)]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{path}[{i}]", tolerance, ignore)]
    if _number(a) and _number(b) and (isinstance(a, float) or isinstance(b, float)):
        return [] if abs(a - b) <= tolerance else [f"{path}: {a} != {b} (tolerance {tolerance})"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _json(raw: bytes) -> tuple[bool, Any]:
    try:
        return True, json.loads(raw)
    except ValueError:
        return False, None


def body_problems(local: bytes, endpoint: bytes, tolerance: float, ignore: tuple[str, ...]) -> list[str]:
    (local_is_json, a), (endpoint_is_json, b) = _json(local), _json(endpoint)
    if local_is_json and endpoint_is_json:
        return diff(a, b, "", tolerance, ignore)
    if local_is_json != endpoint_is_json:
        return [f"body: local {'is' if local_is_json else 'is not'} JSON, endpoint "
                f"{'is' if endpoint_is_json else 'is not'}"]
    return [] if local == endpoint else [f"body: {len(local)} bytes != {len(endpoint)} bytes, not the same bytes"]


def judge(recorded: Exchange, status: int, headers: list[tuple[str, str]], body: bytes, target: str,
          tolerance: float = TOLERANCE, ignore: tuple[str, ...] = ()) -> tuple[list[str], str]:
    """(problems, note) for the endpoint's answer to a recorded request, by the target's rules."""
    if target == MANAGED:
        low, high = MANAGED_LIMITS
        size = len(recorded.request_body)
        if size > high or (size > low and status == 413):
            note = f" (request of {size} bytes: over 1.5 MB, Azure's front end answers 413)"
            return ([] if status == 413 else [f"status {status}, expected 413"]), note
        if len(recorded.response_body) > high:
            note = f" (answer of {len(recorded.response_body)} bytes: over 1.5 MB, Azure answers 424)"
            return ([] if status == 424 else [f"status {status}, expected 424"]), note
        if recorded.status != 200:
            given = next((v for k, v in headers if k.lower() == MODEL_ERROR_STATUS), None)
            problems = [] if status == 424 else [f"status {status}, expected 424 (a managed endpoint's answer to "
                                                  f"a container's {recorded.status})"]
            if status == 424 and given != str(recorded.status):
                problems.append(f"{MODEL_ERROR_STATUS}: {given}, expected {recorded.status}")
            note = f" (container {given})" if given else ""
            return problems or body_problems(recorded.response_body, body, tolerance, ignore), note
    if status != recorded.status:
        return [f"status {status}, expected {recorded.status}"], ""
    return body_problems(recorded.response_body, body, tolerance, ignore), ""


def cut(body: bytes, limit: int = SHOWN_BYTES) -> str:
    text = body.decode(errors="replace").replace("\n", " ")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(body)} bytes)"


def base_url(url: str) -> str:
    """An endpoint's base from its base URL or its scoring URI: recorded paths (/score...) go after it."""
    url = url.rstrip("/")
    return url[:-len("/score")] if url.endswith("/score") else url


def score_url(url: str) -> str:
    """Accept a base URL or a scoring URI."""
    return base_url(url) + "/score"


def refused(url: str, status: int, key: str) -> DeployError:
    return DeployError(f"scorehost parity: {url} answered {status}: " + (
        "the key was refused (is it this endpoint's? az ml online-endpoint get-credentials)" if key else
        "it needs a key: pass --key K (az ml online-endpoint get-credentials)"))


def replay(url: str, exchanges: list[Exchange], key: str = "", deployment: str = "", target: str = KUBERNETES,
           tolerance: float = TOLERANCE, ignore: tuple[str, ...] = (), say: Callable[[str], Any] = print,
           timeout: float = 120) -> bool:
    """Send each recorded request to `url` and judge its answer against the recorded one; True when all match.
    A refused key stops at the first answer."""
    base, differing = base_url(url), []
    for ex in exchanges:
        headers = [(k, v) for k, v in ex.request_headers if k.lower() not in NOT_REPLAYED] + _auth(key, deployment)
        target_url = base + ex.path + (f"?{ex.query}" if ex.query else "")
        status, answer_headers, body = _http(target_url, ex.method, headers, ex.request_body, timeout)
        if status in (401, 403) and ex.status not in (401, 403):
            raise refused(target_url, status, key)
        problems, note = judge(ex, status, answer_headers, body, target, tolerance, ignore)
        what = f"{ex.name} {ex.method} {ex.path}{'?' + ex.query if ex.query else ''}"
        line = f"{'ok  ' if not problems else 'DIFF'} {what:32} local {ex.status} | endpoint {status}{note}"
        if problems:
            differing.append(what)
            line += f"\n       local:    {cut(ex.response_body)}\n       endpoint: {cut(body)}" + \
                "".join(f"\n       {p}" for p in problems[:10])
        say(line)
    matched = len(exchanges) - len(differing)
    say(f"parity ({target}): all answers match ({matched} of {matched})" if not differing else
        f"parity ({target}): {matched} of {len(exchanges)} answers match; differ: " + "; ".join(differing))
    return not differing


def corpus_exchanges(local: str, key: str = "", timeout: float = 120) -> list[Exchange]:
    """The reference corpus, answered by the local server at `local`: the recorded side of the replay."""
    exchanges = []
    for probe in labelled():
        headers = [("Content-Type", probe.content_type)] if probe.content_type else []
        status, answer_headers, body = _http(score_url(local), probe.method, headers + _auth(key, ""),
                                             probe.body if probe.method == "POST" else b"", timeout)
        if status != probe.status:
            raise DeployError(f"scorehost parity: the local server answered '{probe.name}' with {status}, not the "
                              f"{probe.status} the reference score.py gives: is it serving the reference script? "
                              f"{CORPUS_IS_THE_REFERENCES}")
        exchanges.append(Exchange(probe.name, probe.method, "/score", "", headers, probe.body, status,
                                  answer_headers, body))
    return exchanges


def recorded(directory: str) -> list[Exchange]:
    try:
        return load(directory)
    except ValueError as ex:
        raise DeployError(f"scorehost parity: {ex}") from None


def run(url: str, key: str = "", local: Optional[str] = None, model_dir: Optional[str] = None,
        tolerance: float = TOLERANCE, deployment: str = "", target: str = KUBERNETES, replay_dir: str = "",
        ignore: tuple[str, ...] = ()) -> int:
    """Replay `replay_dir` against `url`; or the reference corpus, answered by `local` (a running server) or by a
    local scorehost started here on the demo model (once `url` is known to answer and to take the key: starting a
    server to compare with nothing is a minute lost)."""
    options = dict(key=key, deployment=deployment, target=target, tolerance=tolerance, ignore=ignore)
    if replay_dir:
        return 0 if replay(url, recorded(replay_dir), **options) else 1
    status, _ = send(score_url(url), labelled()[0], key, deployment=deployment)
    if status in (401, 403):
        raise refused(score_url(url), status, key)
    if local:
        exchanges = corpus_exchanges(local)
    else:
        from scorehost import REFERENCE_SCRIPT, processes
        from scorehost.models import demo_model_dir

        with processes.running("scorehost", REFERENCE_SCRIPT, model_dir or demo_model_dir(), timeout=300) as server:
            exchanges = corpus_exchanges(server.url)
    if replay(url, exchanges, **options):
        return 0
    print(f"scorehost parity: {CORPUS_IS_THE_REFERENCES}")
    return 1


def gate(command: str, entry_script: str, model_dir: str, target: str, requests_dir: Optional[str] = None,
         ignore: tuple[str, ...] = ()) -> Callable[[str, str, str], bool]:
    """The check `deploy aks|managed` runs against a new deployment alone before it takes traffic:
    `check(scoring_uri, key, deployment)`. With `requests_dir`, its recorded requests (read now, so a bad directory
    stops before anything is created); else the shipped corpus, which only the reference score.py answers: for any
    other script, a refusal saying how to record requests."""
    if requests_dir:
        recorded(requests_dir)
    elif not is_reference(entry_script):
        script = os.path.relpath(entry_script)
        raise DeployError(
            f"scorehost {command}: the parity gate needs requests for {script} (the shipped corpus is the reference "
            f"model's): record them with `scorehost serve --entry-script {script} --model-dir "
            f"{model_dir or 'DIR'} --record requests/` and the requests your clients send, then pass "
            f"--parity-requests requests/ (or --skip-parity to move traffic unchecked)")

    def check(scoring_uri: str, key: str, deployment: str) -> bool:
        return run(scoring_uri, key, model_dir=model_dir or None, deployment=deployment, target=target,
                   replay_dir=requests_dir or "", ignore=ignore) == 0

    return check
