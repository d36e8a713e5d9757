"""The Flask app: Azure ML's routes and the checks every request passes before the entry script sees it.

The path of a scoring request, top to bottom (the front has read it whole: server/front.py, connection.py):
  `_admit`: `request_ids` (431) -> CORS preflight (answered here) -> `authorize` (401) -> `read_body` (413)
  -> `score()` -> EntryScript (input mode: 400/405/415)
     -> Invoker: run() until the request's deadline (500 past it)                        [per worker, as Azure ML]
     or Invoker: preprocess() until the deadline -> ModelClient -> a model process's run_batch() (queue full: 503;
        the wait ends at the same deadline)                                               [batching]
  -> `as_response` (what run() returned, shaped as Azure ML does) -> `_finish` (contract headers, metrics).
Errors are raised as `errors.ServerError` types and turned into responses by one handler.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
import uuid
from typing import Any, Callable, Optional

import flask
from azureml.contrib.services.aml_response import AMLResponse
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from . import telemetry
from .body import WholeBodyRequest
from .entry_script import EntryScript
from .errors import (HeaderTooLong, InternalError, MethodNotAllowed, ModelUnavailable, PayloadTooLarge,
                     ScoringTimeout, ServerError, Unauthorized, UnreadableBody, error_response, message_response)
from .invoke import Invoker, Timed
from .model_process import ModelClient
from .metrics import Metrics
from .record import Recorder, exchange_of
from .settings import Settings, server_version
from .swagger import Swagger, SwaggerNotFound

log = logging.getLogger("scorehost.app")

HEADER_LIMIT = 100  # characters, for the request id headers, as Azure ML
BODY_ERROR = "scorehost.body_error"  # set by the HTTP front when a body could not be read as framed (server/front.py)
TIMED_OUT = "scorehost.timed_out"  # set by the HTTP front to have a call stuck past the scoring timeout answered
DEADLINE = "scorehost.deadline"  # the request's scoring deadline (time.monotonic()), set by the HTTP front when an
# app thread takes the request; run(), preprocess(), the model queue, run_batch() and the wait for its answer keep it
# A call past its deadline is answered by a second run of the app (TIMED_OUT) while the first may still return: the
# front gives both runs the request's one id (REQUEST_ID, when the client sent none) and one claim (ANSWER_CLAIM, a
# lock). The run that finishes first takes it and is the request's answer: counted, traced and recorded once; the
# other is marked LATE (the front neither logs nor sends it).
REQUEST_ID = "scorehost.request_id"
ANSWER_CLAIM = "scorehost.answer_claim"
LATE = "scorehost.late"
PROTECTED = ("/score", "/swagger.json", "/metrics")


def create_app(settings: Settings, script: Optional[EntryScript] = None,
               model_sockets: tuple[str, ...] = ()) -> flask.Flask:
    """Load the entry script, call its init(), and return the app that serves it.

    With `model_sockets`, run_batch() runs in model processes (server/model_process.py): this worker only
    preprocesses, so init() is not called here. `script` may be passed already loaded and initialised (tests,
    benchmarks); otherwise it is loaded from settings.
    """
    if script is None:
        script = EntryScript.load(settings.entry_script, settings.app_root, settings.source_dir)
        if not model_sockets:
            script.init()
    app = flask.Flask("scorehost")
    app.request_class = WholeBodyRequest  # get_data() is the body the front read, not a copy (server/body.py)
    # One byte over the limit: werkzeug silently truncates a chunked body at MAX_CONTENT_LENGTH, so the limit itself
    # is checked in `read_body` on what was read.
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes + 1
    metrics = Metrics()
    score_request, ready = _scorer(script, settings, metrics, model_sockets)
    swagger = Swagger(script.run, settings.app_root, {"SERVICE_NAME": settings.service_name,
                                                      "SERVICE_VERSION": settings.service_version,
                                                      "SERVICE_PATH_PREFIX": settings.service_path_prefix})
    version_header = server_version(settings)
    key = settings.auth_key.encode() if settings.auth_key else None
    recorder = Recorder.from_settings(settings)
    app.extensions["scorehost"] = {"script": script, "settings": settings, "metrics": metrics,
                                   "admits_body": body_admission(key, settings.max_body_bytes), "ready": ready,
                                   "tracing": telemetry.start(settings)}

    if settings.cors_origins:
        import flask_cors

        flask_cors.CORS(app, methods=["GET", "POST"], origins=cors_origins(settings.cors_origins))

    @app.before_request
    def _admit() -> Optional[flask.Response]:
        request, g = _current()
        g.started = time.perf_counter()
        request_ids(request.environ, g)
        if request.environ.get(TIMED_OUT):
            raise ScoringTimeout(settings.scoring_timeout_ms)
        if key is not None and is_preflight(request, settings):
            return AMLResponse("", 200)  # flask-cors adds its headers; no key, and the script is never called
        if key is not None and protected(request.path):
            authorize(request.environ.get("HTTP_AUTHORIZATION", ""), key)
            request.environ.pop("HTTP_AUTHORIZATION", None)  # checked: the script (and its logs) never sees the key
        if request.path == "/score":
            read_body(request, settings.max_body_bytes)
        return None

    @app.route("/", methods=["GET"])
    def health() -> str:
        return "Healthy"

    @app.route("/ready", methods=["GET"])
    def readiness() -> flask.Response:
        """Beside Azure ML's liveness (`GET /`): 200 only when every model process is loaded, warm and answering."""
        if ready():
            return flask.Response("Ready", 200, content_type="text/plain")
        return error_response(ModelUnavailable("Not ready: the model is loading or restarting."),
                              flask.g.get("request_id"))

    @app.route("/swagger.json", methods=["GET"])
    def swagger_json() -> flask.Response:
        try:
            return AMLResponse(swagger.get(flask.request.args.get("version", "2")), 200, json_str=True)
        except SwaggerNotFound as ex:
            return message_response(404, str(ex))

    @app.route("/score", methods=["GET", "POST", "OPTIONS"], provide_automatic_options=False)
    def score() -> flask.Response:
        request = flask.request._get_current_object()  # type: ignore[attr-defined] # run_batch() is on another thread
        try:
            timed = score_request(request)
        except MethodNotAllowed:
            if request.method == "OPTIONS":
                return AMLResponse("", 200)
            raise
        response = as_response(timed.output)
        response.headers.add("x-ms-run-fn-exec-ms", f"{timed.elapsed_ms:.3f}")
        return response

    @app.route("/metrics", methods=["GET"])
    def prometheus_metrics() -> flask.Response:
        body, content_type = metrics.exposition()
        return flask.Response(body, 200, content_type=content_type)

    @app.errorhandler(ServerError)
    def _server_error(error: ServerError) -> flask.Response:
        trace = flask.request.environ.get(telemetry.TRACE)
        if trace is not None and error.run_function_failed and error.__context__ is not None:
            trace.failed(error.__context__)  # the script's own exception, as azmlinfsrv logs it
        return error_response(error, flask.g.get("request_id"))

    @app.errorhandler(HTTPException)
    def _http_error(error: HTTPException) -> flask.Response:
        return message_response(error.code or 500, error.description or error.name)

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> flask.Response:
        log.exception("unhandled error while serving %s %s", flask.request.method, flask.request.path)
        return error_response(InternalError(), flask.g.get("request_id"))

    @app.after_request
    def _finish(response: flask.Response) -> flask.Response:
        request, g = _current()
        contract_headers(response, request.environ, g, version_header)
        if not first_answer(request.environ):
            return response  # a late return past the scoring timeout: the timed-out answer was the request's
        trace = request.environ.get(telemetry.TRACE)
        if trace is not None:
            response.headers["traceparent"] = trace.traceparent()
            trace.answered(request, response, g)
        rule = request.url_rule
        started = getattr(g, "started", None)
        metrics.observe_request(rule.rule if rule else "unmatched", request.method, response.status_code,
                                time.perf_counter() - started if started is not None else 0.0)
        if recorder is not None and recorder.wants(request.path, response.status_code):
            recorder.save(exchange_of(request, response))
        return response

    return app


def _current() -> tuple[flask.Request, Any]:
    """This request and its `g`, the objects themselves: each use of Flask's proxies (`flask.request`, `flask.g`)
    looks them up again (28 lookups a request had cost ~45 us of the app's ~160, in process)."""
    return flask.request._get_current_object(), flask.g._get_current_object()  # type: ignore[attr-defined]


def first_answer(environ: dict) -> bool:
    """Whether this run of the app is its request's answer (see ANSWER_CLAIM); a run that is not is marked LATE."""
    claim = environ.get(ANSWER_CLAIM)
    if claim is None or claim.acquire(blocking=False):
        return True
    environ[LATE] = True
    return False


def protected(path: str) -> bool:
    """Whether a path needs the key. Repeated slashes count as one, as the router merges them (`//score` is
    `/score`): checked on the head, so an unauthenticated body is never read."""
    return re.sub("/{2,}", "/", path) in PROTECTED


def is_preflight(request: flask.Request, settings: Settings) -> bool:
    """A browser's CORS preflight carries no credentials by design: with CORS on and a key (scorehost's own
    --auth-key), it needs none, and so never reaches the script, which would be called unauthenticated. Without a
    key, the script's run() answers it as in azmlinfsrv (a @rawhttp script may set its own headers), and flask-cors
    adds its own."""
    return bool(settings.cors_origins) and request.method == "OPTIONS" and \
        "Access-Control-Request-Method" in request.headers


def cors_origins(setting: str) -> list:
    """AML_CORS_ORIGINS as patterns matched literally (flask-cors would read a string with '*' as a regular
    expression: `https://*.example.com` matched `https://xexample.com.attacker.net`). `*` alone allows any origin;
    `scheme://*.domain` allows the subdomains of domain, at any depth, and not the domain itself."""
    from flask_cors.core import probably_regex  # flask-cors's own test of whether a string is a pattern

    patterns: list = []
    for origin in (o.strip() for o in setting.split(",")):
        if origin == "*":
            return ["*"]
        scheme, sep, host = origin.partition("://*.")
        if sep:
            patterns.append(re.compile(re.escape(scheme) + r"://[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\." + re.escape(host)
                                       + r"\Z", re.IGNORECASE))
        elif origin and not probably_regex(origin):
            # as it is: flask-cors compares it case-insensitively and, as under azmlinfsrv, sends it (the first,
            # sorted) with `Vary: Origin` to a request without an Origin header; a compiled pattern it never sends
            patterns.append(origin)
        elif origin:
            patterns.append(re.compile(re.escape(origin) + r"\Z", re.IGNORECASE))
    return patterns


def request_ids(environ: dict, g: Any) -> None:
    """x-request-id and the client ids, by Azure ML's rules (x-ms-request-id is the deprecated client id). Headers
    are read from the WSGI environ, where `request.headers` would look each name up through a transforming view."""
    g.request_id = g.client_request_id = g.legacy_client_request_id = ""
    request_id = environ.get("HTTP_X_REQUEST_ID")
    if request_id is None:
        request_id = environ.get(REQUEST_ID) or str(uuid.uuid4())
    if len(request_id) > HEADER_LIMIT:
        raise HeaderTooLong(f"x-request-id must not exceed {HEADER_LIMIT} characters")
    g.request_id = request_id
    legacy = environ.get("HTTP_X_MS_REQUEST_ID", "")
    client = environ.get("HTTP_X_MS_CLIENT_REQUEST_ID", "")
    if legacy:
        client = client or legacy
    else:
        legacy = client or request_id
    if len(legacy) > HEADER_LIMIT or len(client) > HEADER_LIMIT:
        raise HeaderTooLong(f"x-ms-request-id and x-ms-client-request-id must not exceed {HEADER_LIMIT} characters")
    g.legacy_client_request_id, g.client_request_id = legacy, client
    if len(environ.get("HTTP_TRACEID", "")) > HEADER_LIMIT:  # it is echoed: bound it like the ids
        raise HeaderTooLong(f"TraceId must not exceed {HEADER_LIMIT} characters")


def authorize(header: str, key: bytes) -> None:
    """`Authorization: Bearer <key>`, compared in constant time; the given value is never logged."""
    if not header:
        raise Unauthorized("Missing Authorization header: send 'Authorization: Bearer <key>'.")
    scheme, _, given = header.strip().partition(" ")
    if not given and scheme.lower() != "bearer":  # the key alone: say what is missing, nothing about the key
        raise Unauthorized("The Authorization header has no scheme: send 'Authorization: Bearer <key>'.")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key):
        raise Unauthorized("Invalid key in the Authorization header.")


def body_admission(key: Optional[bytes], limit: int) -> Callable[[str, Optional[str], Optional[int]], bool]:
    """For the HTTP front, on a request's head: would `_admit` take its body? If not (wrong key on a protected
    route, a body announced over the limit), the front answers without reading the body, and an
    `Expect: 100-continue` client is not invited to send it. The answer itself is still `_admit`'s."""

    def admits_body(path: str, authorization: Optional[str], content_length: Optional[int]) -> bool:
        if content_length is not None and content_length > limit:
            return False
        if key is not None and protected(path):
            try:
                authorize(authorization or "", key)
            except Unauthorized:
                return False
        return True

    return admits_body


def read_body(request: flask.Request, limit: int) -> None:
    """Read the whole body now: too large (announced or chunked) is 413, and a body that cannot be read as framed
    (bad chunking, or fewer bytes than Content-Length) is 400, all before the script sees any of it."""
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"Request body is {length} bytes; the limit is {limit} bytes.")
    if BODY_ERROR in request.environ:
        raise UnreadableBody(f"The request body could not be read: {request.environ[BODY_ERROR]}.")
    try:
        data = request.get_data()
    except RequestEntityTooLarge:
        data = None
    except Exception as ex:  # the server's reader: broken chunked framing, a client gone mid-body
        raise UnreadableBody(f"The request body could not be read: {type(ex).__name__}: {ex}") from None
    if data is None or len(data) > limit:
        raise PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
    if length is not None and len(data) < length:
        raise UnreadableBody(f"The request body ended after {len(data)} of the {length} bytes its Content-Length announced.")


def contract_headers(response: flask.Response, environ: dict, g: Any, server_version: str) -> None:
    headers = response.headers
    if server_version:
        headers.add("x-ms-server-version", server_version)
    for name, value in (("x-request-id", getattr(g, "request_id", "")),
                        ("x-ms-request-id", getattr(g, "legacy_client_request_id", "")),
                        ("x-ms-client-request-id", getattr(g, "client_request_id", ""))):
        if value:
            headers[name] = value
    trace_id = environ.get("HTTP_TRACEID")
    if trace_id is not None and len(trace_id) <= HEADER_LIMIT:
        headers.add("TraceId", trace_id)


def _scorer(script: EntryScript, settings: Settings, metrics: Metrics,
            model_sockets: tuple[str, ...]) -> tuple[Callable[[flask.Request], Timed], Callable[[], bool]]:
    """How this worker turns a request into run()'s output, and whether it is ready: each worker calls run() itself
    (Azure ML's way), or preprocesses here and has a model process batch the items (`model_process`)."""
    invoker = Invoker(settings.scoring_timeout_ms)
    if model_sockets:
        client = ModelClient(list(model_sockets), settings.scoring_timeout_ms,
                             item_max_bytes=settings.batch_queue_bytes, send_timeout_s=settings.send_timeout)

        def batched(request: flask.Request) -> Timed:
            deadline = deadline_of(request, settings)
            trace = request.environ.get(telemetry.TRACE)
            span = trace.child("preprocess") if trace is not None else None
            try:
                preprocessed = invoker.invoke(lambda: script.batch_item(request), deadline,  # preprocess(), on time
                                              passthrough=(ServerError, HTTPException), name="preprocess()")
            finally:
                if span is not None:
                    span.end()
            metrics.stages["preprocess"].observe(preprocessed.elapsed_ms / 1000)
            item = preprocessed.output
            if isinstance(item, flask.Response):  # preprocess() answered this request itself
                return Timed(item, 0.0)
            if trace is None:
                return client.submit(item, deadline)
            with trace.child("model"):  # the wait for the model process; run_batch() is its own span
                return client.submit(telemetry.Carried(item, trace.traceparent()), deadline)

        return batched, client.ready

    def one_by_one(request: flask.Request) -> Timed:
        trace = request.environ.get(telemetry.TRACE)
        if trace is None:
            timed = invoker.invoke(script.call_run(request), deadline_of(request, settings))
        else:
            with trace.child("run"):
                timed = invoker.invoke(script.call_run(request), deadline_of(request, settings))
        metrics.run_time.observe(timed.elapsed_ms / 1000)
        return timed

    return one_by_one, lambda: True


def deadline_of(request: flask.Request, settings: Settings) -> float:
    """The request's scoring deadline, as the front set it (or from now, for an app used without the front)."""
    deadline = request.environ.get(DEADLINE)
    return deadline if deadline is not None else time.monotonic() + settings.scoring_timeout_ms / 1000


def as_response(output: Any) -> flask.Response:
    """A Response from run() passes through (5xx marked as a run failure); anything else becomes 200 JSON."""
    if isinstance(output, flask.Response):
        if output.status_code >= 500:
            output.headers["x-ms-run-function-failed"] = "True"
        return output
    return AMLResponse(output, 200, json_str=True)
