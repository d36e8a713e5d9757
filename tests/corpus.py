"""The request corpus the differential suite sends to scorehost and to Azure ML's server, and how answers compare.

Each script in tests/scripts is served by both servers; every request for it goes to both, and the answers must
agree on status, body, Content-Type and every contract header. Values that are random by design are compared by
shape only: generated request ids (a UUID, the same in x-request-id and x-ms-request-id), x-ms-run-fn-exec-ms (a
number with 3 decimals) and x-ms-server-version (present on both; the name differs).
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import re
from typing import Optional

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
HOP_BY_HOP = {"date", "server", "connection", "keep-alive", "transfer-encoding"}
ROUTING_EXTRAS = {"x-request-id", "x-ms-request-id", "x-ms-server-version"}
SHAPE_ONLY = {"x-ms-run-fn-exec-ms", "x-ms-server-version", "x-request-id", "x-ms-request-id"}


@dataclasses.dataclass(frozen=True)
class Case:
    script: str
    method: str
    path: str
    body: Optional[bytes] = None
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def id(self) -> str:
        size = f"+{len(self.body)}B" if self.body else ""
        hdr = ",".join(f"{k}" for k, _ in self.headers)
        return f"{self.script}:{self.method} {self.path}{size}{' ' + hdr if hdr else ''}"


@dataclasses.dataclass
class Answer:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> Optional[str]:
        values = self.headers.get(name.lower())
        return values[0] if values else None


def send(base_url: str, case: Case, timeout: float = 30) -> Answer:
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest(case.method, case.path, skip_accept_encoding=True)
        names = {k.lower() for k, _ in case.headers}
        for k, v in case.headers:
            conn.putheader(k, v)
        if case.body is not None and "content-length" not in names and "transfer-encoding" not in names:
            conn.putheader("Content-Length", str(len(case.body)))
        conn.endheaders(case.body)
        r = conn.getresponse()
        headers: dict[str, list[str]] = {}
        for k, v in r.getheaders():
            headers.setdefault(k.lower(), []).append(v)
        return Answer(r.status, headers, r.read())
    finally:
        conn.close()


def _sent(case: Case, name: str) -> bool:
    return any(k.lower() == name for k, _ in case.headers)


def differences(case: Case, ours: Answer, theirs: Answer) -> list[str]:
    """Every way `ours` departs from `theirs` (Azure ML's answer), beyond what is random by design."""
    diffs = []
    if ours.status != theirs.status:
        diffs.append(f"status {ours.status} != {theirs.status}")
    if ours.body != theirs.body:
        diffs.append(f"body {ours.body[:300]!r} != {theirs.body[:300]!r}")
    names = (set(ours.headers) | set(theirs.headers)) - HOP_BY_HOP
    for name in sorted(names):
        a, b = ours.headers.get(name), theirs.headers.get(name)
        if name in SHAPE_ONLY and a is not None and b is not None:
            continue  # checked by shape below
        if name in ROUTING_EXTRAS and b is None and is_routing_error(theirs):
            continue  # deliberate: scorehost gives every answer a request id, Azure ML only its own routes'
        if a != b:
            diffs.append(f"header {name}: {a} != {b}")
    if ours.header("x-ms-run-fn-exec-ms") is not None and not re.fullmatch(r"\d+\.\d{3}",
                                                                          ours.header("x-ms-run-fn-exec-ms")):
        diffs.append(f"x-ms-run-fn-exec-ms malformed: {ours.header('x-ms-run-fn-exec-ms')}")
    for answer, who in ((ours, "scorehost"), (theirs, "aihs")):
        rid = answer.header("x-request-id")
        if rid is not None and not _sent(case, "x-request-id") and not UUID.match(rid):
            diffs.append(f"{who} generated x-request-id is not a UUID4: {rid}")
        if rid is not None and not any(_sent(case, h) for h in ("x-ms-request-id", "x-ms-client-request-id")) \
                and answer.header("x-ms-request-id") != rid:
            diffs.append(f"{who}: x-ms-request-id should repeat x-request-id")
    return diffs


def is_routing_error(answer: Answer) -> bool:
    """An answer of Flask's router (unknown path, method not routed): Azure ML sends no contract headers there."""
    return answer.status in (404, 405) and answer.header("x-ms-run-function-failed") == "False" \
        and answer.header("x-ms-server-version") is None


def _c(script: str, method: str, path: str, body: Optional[bytes] = None, **headers: str) -> Case:
    return Case(script, method, path, body, tuple((k.replace("_", "-"), v) for k, v in headers.items()))


JSON = "application/json"
LONG = "x" * 101

CORPUS: list[Case] = [
    # Routes, for any script
    _c("undecorated.py", "GET", "/"),
    _c("undecorated.py", "POST", "/"),
    _c("undecorated.py", "GET", "/nowhere"),
    _c("undecorated.py", "DELETE", "/score"),
    _c("undecorated.py", "PUT", "/score", b"x"),
    _c("undecorated.py", "GET", "/swagger.json"),
    _c("undecorated.py", "GET", "/swagger.json?version=3"),
    _c("undecorated.py", "GET", "/swagger.json?version=3.1"),
    _c("undecorated.py", "GET", "/swagger.json?version=2.0"),
    _c("undecorated.py", "GET", "/swagger.json?version=4"),
    _c("undecorated.py", "POST", "/swagger.json"),
    # Undecorated run(): body as a UTF-8 string, GET query as a JSON string
    _c("undecorated.py", "POST", "/score", b'{"x": [1, 2]}', Content_Type=JSON),
    _c("undecorated.py", "POST", "/score", "héllo wörld".encode(), Content_Type="text/plain"),
    _c("undecorated.py", "POST", "/score", b""),
    _c("asyncio_loop.py", "POST", "/score", b"ab"),  # asyncio.get_event_loop() in init() and run(), off the main thread
    # `curl -d` sends a form type: Flask parses the body as a form, and run() gets "" (found by an outside review:
    # scorehost passed the body through, so a first curl worked locally and failed on Azure ML)
    _c("undecorated.py", "POST", "/score", b'{"data": [1, 2]}', Content_Type="application/x-www-form-urlencoded"),
    _c("undecorated.py", "POST", "/score", b"--b\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nv\r\n--b--\r\n",
       Content_Type="multipart/form-data; boundary=b"),
    # what werkzeug does not parse as a form is passed whole (a review of the rule above)
    _c("undecorated.py", "POST", "/score", b'{"a": 1}', Content_Type="application/x-url-encoded"),
    _c("undecorated.py", "POST", "/score", b'{"a": 1}', Content_Type="multipart/form-data"),
    _c("undecorated.py", "POST", "/score", b"\xff\xfe\xfa not utf-8"),
    _c("undecorated.py", "GET", "/score?a=1&b=[1,2]&c=text&d=null&e=1&e=2"),
    _c("undecorated.py", "GET", "/score"),
    _c("undecorated.py", "OPTIONS", "/score"),
    _c("undecorated.py", "HEAD", "/score"),
    # Request ids
    _c("undecorated.py", "POST", "/score", b"id", x_request_id="my-request-1"),
    _c("undecorated.py", "POST", "/score", b"id", x_ms_client_request_id="client-7"),
    _c("undecorated.py", "POST", "/score", b"id", x_ms_request_id="legacy-3"),
    _c("undecorated.py", "POST", "/score", b"id", x_ms_request_id="legacy-3", x_ms_client_request_id="client-7",
       x_request_id="req-9"),
    _c("undecorated.py", "POST", "/score", b"id", x_request_id=LONG),
    _c("undecorated.py", "POST", "/score", b"id", x_ms_client_request_id=LONG),
    _c("undecorated.py", "POST", "/score", b"id", x_ms_request_id=LONG),
    _c("undecorated.py", "GET", "/", x_request_id=LONG),
    _c("undecorated.py", "POST", "/score", b"id", TraceId="trace-42"),
    # @rawhttp: every method reaches run()
    _c("rawhttp_echo.py", "GET", "/score?q=1&q=2"),
    _c("rawhttp_echo.py", "POST", "/score", b"\x00\x01binary\xff"),
    _c("rawhttp_echo.py", "POST", "/score?status=201", b"created"),
    _c("rawhttp_echo.py", "POST", "/score?status=503", b"failing"),
    _c("rawhttp_echo.py", "POST", "/score?plain=1&status=500", b"plain failure"),
    _c("rawhttp_echo.py", "PATCH", "/score"),
    _c("rawhttp_echo.py", "OPTIONS", "/score"),
    _c("rawhttp_echo.py", "OPTIONS", "/score?none=1&status=204"),
    _c("rawhttp_echo.py", "HEAD", "/score"),
    _c("rawhttp_module.py", "POST", "/score", b"12345", X_Custom="c1"),
    _c("rawhttp_module.py", "GET", "/score"),
    _c("rawhttp_module.py", "GET", "/swagger.json"),
    # @input_schema
    _c("schema.py", "POST", "/score", b'{"a": 5, "b": "y"}', Content_Type=JSON, X_Custom="hdr"),
    _c("schema.py", "POST", "/score", b'{"a": 5}', Content_Type=JSON),
    _c("schema.py", "POST", "/score", b'{"b": "y"}', Content_Type=JSON),
    _c("schema.py", "POST", "/score", b'{"a": 5}', Content_Type="text/plain"),
    _c("schema.py", "POST", "/score", b'{"a": 5}'),
    _c("schema.py", "POST", "/score", b"", Content_Type=JSON),
    _c("schema.py", "POST", "/score", b"{not json", Content_Type=JSON),
    _c("schema.py", "POST", "/score", b"[1, 2]", Content_Type=JSON),
    _c("schema.py", "POST", "/score", b'{"a": 1}', Content_Type="application/json; charset=utf-8"),
    _c("schema.py", "GET", "/score?a=3&b=zz"),
    _c("schema.py", "GET", "/score?b=zz"),
    _c("schema.py", "GET", "/swagger.json"),
    _c("schema.py", "GET", "/swagger.json?version=3"),
    _c("schema.py", "GET", "/swagger.json?version=3.1"),
    _c("schema.py", "OPTIONS", "/score"),
    # run() fails
    _c("raises.py", "POST", "/score", b"boom"),
    _c("raises.py", "POST", "/score", b"ok"),
    _c("raises.py", "POST", "/score", b"set"),
    _c("raises.py", "GET", "/score"),
    # Timeout (served with SCORING_TIMEOUT_MS=500)
    _c("sleeper.py", "POST", "/score", b"2"),
    _c("sleeper.py", "POST", "/score", b"0"),
    # driver_module
    _c("driver.py", "POST", "/score", b"via proxy"),
    # SERVICE_PATH_PREFIX, SERVICE_NAME, SERVICE_VERSION, SERVER_VERSION_LOG_RESPONSE_ENABLED=false (VARIANTS)
    _c("schema.py@prefix", "GET", "/swagger.json"),
    _c("schema.py@prefix", "GET", "/swagger.json?version=3"),
    _c("schema.py@prefix", "POST", "/score", b'{"a": 2, "b": "p"}', Content_Type=JSON),
    _c("schema.py@prefix", "POST", "/api/v1/score", b'{"a": 2}', Content_Type=JSON),
    _c("schema.py@prefix", "GET", "/"),
    # A streamed answer (Response(generator)): chunked, and the scoring timeout (500 ms here) ends when run() returns,
    # not its stream (an outside review: scorehost buffered it, and answered 500 once the stream outlasted it)
    _c("streamed.py", "POST", "/score?parts=3&gap_ms=300", b""),
    _c("streamed.py", "GET", "/score?parts=0"),
    _c("streamed.py", "HEAD", "/score"),
    # AML_CORS_ORIGINS: a browser's preflight reaches a @rawhttp run(), whose headers come with flask-cors's (an
    # outside review: scorehost answered it 200 empty without calling the script)
    _c("rawhttp_echo.py@cors", "OPTIONS", "/score?none=1&status=204", Origin="https://a.example",
       Access_Control_Request_Method="POST"),
    _c("rawhttp_echo.py@cors", "OPTIONS", "/score", Origin="https://b.example", Access_Control_Request_Method="POST"),
    _c("rawhttp_echo.py@cors", "POST", "/score", b"x", Origin="https://a.example"),
    # azmlinfsrv's --config_file (its keys: SCORING_TIMEOUT_MS, SERVICE_NAME, ...), on both command lines
    _c("sleeper.py@config", "POST", "/score", b"2"),
    _c("sleeper.py@config", "POST", "/score", b"0"),
    _c("sleeper.py@config", "GET", "/swagger.json"),
    _c("sleeper.py@config", "GET", "/swagger.json?version=3.1"),
]

# How a server of the corpus is started, the same for both: "script.py" or "script.py@variant" ->
# (environment, extra command-line arguments, spelled as azmlinfsrv spells them).
VARIANTS: dict[str, tuple[dict[str, str], tuple[str, ...]]] = {
    "sleeper.py": ({"SCORING_TIMEOUT_MS": "500"}, ()),
    "streamed.py": ({"SCORING_TIMEOUT_MS": "500"}, ()),
    "schema.py@prefix": ({"SERVICE_PATH_PREFIX": "/api/v1/", "SERVICE_NAME": "greeter", "SERVICE_VERSION": "2.5",
                          "SERVER_VERSION_LOG_RESPONSE_ENABLED": "false"}, ()),
    "rawhttp_echo.py@cors": ({"AML_CORS_ORIGINS": "https://a.example"}, ()),
    "sleeper.py@config": ({}, ("--config_file", os.path.join(os.path.dirname(__file__), "scripts",
                                                             "aihs_config.json"))),
}


def script_of(server: str) -> str:
    """The script file a corpus server runs ("schema.py@prefix" runs schema.py)."""
    return server.partition("@")[0]
