"""Traces of each request, exported over OTLP and to Application Insights: off unless one is configured, and then
nothing in the request path does more than test one attribute for None.

Who makes which span (each process builds its own `Tracing` after the fork, with `start`):
- the HTTP worker's loop (front.py): the request span (SERVER, `POST /score`), child of the request's W3C
  `traceparent` when it has one, with the child `read` (first byte to whole request); once the answer is handed
  back, `write`, and the request span ends;
- its app thread: `queue` (waiting for an app thread), then (app.py) `preprocess`, and `run` (per worker) or
  `model` (the wait for a model process); the answer carries a `traceparent` naming the request span;
- a model process (model_process.py): `batch queue` per request (its context crossed the wire with the item,
  `Carried`) and one `run_batch` span per call with the batch size, linked to every request span in it.
Exporters: OTLP/HTTP with JSON bodies (OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces), by `OtlpJsonExporter` below:
the SDK's own OTLP exporters need opentelemetry-proto, which at OpenTelemetry 1.33 (AIHS 1.5.1 pins it) requires
protobuf<6, and TensorFlow 2.21 requires protobuf>=6.31. Application Insights through Azure Monitor's exporter,
the request span carrying azmlinfsrv's fields (Request Id, Client Request Id, Response Value, Container Id, ...).
Only that span goes there, as azmlinfsrv sends one request record and no dependency: the stages are spans for an OTLP
collector, made only when one is configured. With Application Insights each process also sends what the script
prints to stdout as traces (`send_logs`), as azmlinfsrv sends print()'s lines, and nothing logged.
"""

from __future__ import annotations

import builtins
import functools
import json
import logging
import os
import re
import socket
import sys
import time
import urllib.parse
import urllib.request
from typing import Any, NamedTuple, Optional, Sequence

log = logging.getLogger("scorehost.telemetry")

TRACE = "scorehost.trace"  # environ key: the request's RequestTrace, for app.py's spans
GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z", re.I)
PRINTED = "scorehost.print"  # the logger of what the script prints, to Application Insights only


def connection_string(settings: Any) -> Optional[str]:
    """Application Insights' connection string: APPLICATIONINSIGHTS_CONNECTION_STRING, else azmlinfsrv's
    `InstrumentationKey=<AML_APP_INSIGHTS_KEY>` when AML_APP_INSIGHTS_ENABLED is true and the key is a GUID."""
    if settings.appinsights_connection_string:
        return settings.appinsights_connection_string
    if settings.appinsights_enabled and settings.appinsights_key and GUID.match(settings.appinsights_key):
        return f"InstrumentationKey={settings.appinsights_key}"
    return None


def wanted(settings: Any) -> bool:
    return bool(settings.otlp_endpoint or connection_string(settings))


def needs(settings: Any) -> tuple[str, ...]:
    """The modules (of the `telemetry` extra) the configured exporters import."""
    return (("opentelemetry.sdk",) if wanted(settings) else ()) + (
        ("azure.monitor.opentelemetry.exporter",) if connection_string(settings) else ())


def start(settings: Any) -> Optional["Tracing"]:
    """In a worker or model process, after the fork: its Tracing, or None when tracing is off."""
    return Tracing(settings) if wanted(settings) else None


def container() -> str:
    return os.environ.get("HOSTNAME") or socket.gethostname()


def resource(settings: Any) -> Any:
    """This process, as its traces and logs name it (Application Insights' cloud role and role instance)."""
    from opentelemetry.sdk.resources import Resource

    return Resource.create({"service.name": settings.service_name, "service.version": settings.service_version,
                            "service.instance.id": f"{container()}/{os.getpid()}"})


def send_logs(settings: Any) -> None:
    """In a process that runs the script's code (HTTP worker, model process), before it loads, with Application
    Insights on: what the script prints to stdout goes there as traces, as azmlinfsrv turns print() into a logger at
    INFO that sends to Application Insights; here print() still writes what it wrote, so the console shows what it
    showed. Nothing logged goes (as there): every library's INFO records would (httpx logs each URL it calls). The
    Azure SDK's HTTP logging and the exporter are kept to warnings: at INFO they log each call of the exporter,
    headers and all."""
    appinsights = connection_string(settings)
    if not appinsights:
        return
    from azure.monitor.opentelemetry.exporter import AzureMonitorLogExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk._logs.export import BatchLogRecordProcessor

    for chatty in ("azure.core.pipeline.policies.http_logging_policy", "azure.monitor.opentelemetry.exporter"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    provider = LoggerProvider(resource=resource(settings))
    provider.add_log_record_processor(BatchLogRecordProcessor(AzureMonitorLogExporter(
        connection_string=appinsights, disable_offline_storage=True)))
    handler = LoggingHandler(logging.INFO, provider)
    printed = logging.getLogger(PRINTED)
    printed.setLevel(logging.INFO)
    printed.propagate = False  # on the console already, as print() wrote it
    printed.addHandler(handler)
    builtins.print = _printing(builtins.print, printed)


def _printing(write: Any, printed: logging.Logger) -> Any:
    """print() that writes as before, then logs what it wrote to stdout as azmlinfsrv's print_log_hook does (the
    objects joined by `sep`, without `end`); the record names where the script called print()."""
    @functools.wraps(write)
    def print_(*objects: Any, sep: Optional[str] = " ", end: Optional[str] = "\n", file: Any = None,
               flush: bool = False) -> None:
        write(*objects, sep=sep, end=end, file=file, flush=flush)
        if (file is None or file is sys.stdout) and objects:
            printed.info((" " if sep is None else sep).join(map(str, objects)), stacklevel=2)
    return print_


class Carried(NamedTuple):
    """An item for run_batch() with its request span's traceparent, as it crosses to the model process."""

    value: Any
    traceparent: str

    def __reduce__(self) -> tuple:
        from .wire import BIG_BYTES, _Bytes

        value = _Bytes(self.value) if type(self.value) is bytes and len(self.value) >= BIG_BYTES else self.value
        return Carried, (value, self.traceparent)


class Tracing:
    """One process's tracer and exporters."""

    def __init__(self, settings: Any):
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace import NoOpTracer
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.container = container()
        self.provider = TracerProvider(resource=resource(settings))
        if settings.otlp_endpoint:
            self.provider.add_span_processor(BatchSpanProcessor(OtlpJsonExporter(settings.otlp_endpoint)))
        self.appinsights = connection_string(settings)
        if self.appinsights:
            from azure.monitor.opentelemetry.exporter import AzureMonitorTraceExporter

            # Given its provider, the exporter reads the resource from it, not from the global one (a proxy: none).
            self.provider.add_span_processor(BatchSpanProcessor(RequestsOnly(AzureMonitorTraceExporter(
                connection_string=self.appinsights, disable_offline_storage=True, tracer_provider=self.provider))))
        self.settings = settings
        self.tracer = self.provider.get_tracer("scorehost")
        # The stages and the model process's spans: only an OTLP collector gets them (RequestsOnly).
        self.stages = self.tracer if settings.otlp_endpoint else NoOpTracer()
        self.propagator = TraceContextTextMapPropagator()
        self.perf_to_epoch = time.time_ns() - time.perf_counter_ns()
        self.monotonic_to_epoch = time.time_ns() - time.monotonic_ns()

    def epoch_ns(self, perf_s: float) -> int:
        return self.perf_to_epoch + int(perf_s * 1e9)

    # --- HTTP workers ----------------------------------------------------------------------------------------
    def begin(self, method: str, path: str, headers: Sequence[tuple[bytes, bytes]], started: float) -> "RequestTrace":
        """In the loop, when a whole request goes to an app thread: the request span (from its first byte) and
        its `read` child."""
        from opentelemetry import trace

        carrier = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in headers
                   if name.lower() in (b"traceparent", b"tracestate")}
        parent = self.propagator.extract(carrier) if carrier else None
        span = self.tracer.start_span(f"{method} {path}", context=parent, kind=trace.SpanKind.SERVER,
                                      start_time=self.epoch_ns(started),
                                      attributes={"http.method": method, "http.target": path})
        request_trace = RequestTrace(self, span, trace.set_span_in_context(span))
        request_trace.stage("read", started)
        return request_trace

    # --- model processes -------------------------------------------------------------------------------------
    def batch(self, traceparents: Sequence[Optional[str]], arrivals: Sequence[float], size: int, padded: int) -> Any:
        """In a model process, as run_batch() starts: each request's `batch queue` span (arrival to now) and the
        `run_batch` span, linked to every request span of the batch. The caller ends the latter."""
        from opentelemetry import trace

        now = time.time_ns()
        links = []
        for traceparent, arrived in zip(traceparents, arrivals):
            if traceparent:
                parent = self.propagator.extract({"traceparent": traceparent})
                self.stages.start_span("batch queue", context=parent, start_time=self.monotonic_to_epoch + int(
                    arrived * 1e9)).end(end_time=now)
                links.append(trace.Link(trace.get_current_span(parent).get_span_context()))
        return self.stages.start_span("run_batch", links=links, start_time=now,
                                      attributes={"batch.size": size, "batch.padded_size": padded})


class RequestTrace:
    """One request's span and the moments its stages are measured from."""

    __slots__ = ("tracing", "span", "context")

    def __init__(self, tracing: Tracing, span: Any, context: Any):
        self.tracing, self.span, self.context = tracing, span, context

    def stage(self, name: str, since: float, until: Optional[float] = None) -> None:
        """A finished child span from `since` to `until` (perf_counter seconds; default now)."""
        epoch = self.tracing.epoch_ns
        self.tracing.stages.start_span(name, context=self.context, start_time=epoch(since)).end(
            end_time=epoch(time.perf_counter() if until is None else until))

    def child(self, name: str) -> Any:
        """A child span starting now; the caller ends it. An exception through it sets its status, and is not
        recorded: the server's wrapper of the script's exception, which the request span records (`failed`)."""
        return self.tracing.stages.start_span(name, context=self.context, record_exception=False)

    def traceparent(self) -> str:
        context = self.span.get_span_context()
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"

    def answered(self, request: Any, response: Any, ids: Any) -> None:
        """In the app, once the answer is made: its status, and what azmlinfsrv sends Application Insights."""
        from opentelemetry.trace import StatusCode

        span, settings = self.span, self.tracing.settings
        span.set_attribute("http.status_code", response.status_code)
        if response.status_code >= 400:  # azmlinfsrv's `success` is status < 400: Application Insights agrees
            span.set_status(StatusCode.ERROR)
        if not self.tracing.appinsights:
            return
        body = None
        if settings.appinsights_log_response:
            try:
                body = response.get_data(as_text=True)
            except (UnicodeDecodeError, AttributeError):
                body = json.dumps("Scoring request response payload is a non serializable object or raw binary")
        span.set_attributes({
            "Container Id": self.tracing.container, "Request Id": ids.get("request_id", ""),
            "Client Request Id": ids.get("client_request_id", ""), "http.url": request.base_url,
            "Workspace Name": settings.workspace_name, "Service Name": settings.service_name,
            **({"Response Value": body} if body is not None else {})})

    def failed(self, error: BaseException) -> None:
        """The script's exception (Application Insights shows it as an exception of the request)."""
        self.span.record_exception(error)

    def end(self, responded: float) -> None:
        """In the loop, once the answer (made at `responded`) is handed to the socket: `write`, and the request
        span ends."""
        self.stage("write", responded)
        self.span.end()


class RequestsOnly:
    """A SpanExporter passing on the request spans (SERVER) only. In Application Insights a span of another kind is
    a dependency: azmlinfsrv sends none, and the stages of one process are none a user there looks for."""

    def __init__(self, exporter: Any):
        self.exporter = exporter

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult
        from opentelemetry.trace import SpanKind

        requests = [span for span in spans if span.kind is SpanKind.SERVER]
        return self.exporter.export(requests) if requests else SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class OtlpJsonExporter:
    """OTLP/HTTP with JSON bodies (the OTLP specification's JSON encoding), POSTed to ENDPOINT/v1/traces with
    OTEL_EXPORTER_OTLP_HEADERS; a SpanExporter for the SDK's BatchSpanProcessor."""

    def __init__(self, endpoint: str, timeout_s: float = 10.0):
        self.url = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or endpoint.rstrip("/") + "/v1/traces"
        self.headers = {"Content-Type": "application/json"}
        for pair in filter(None, os.environ.get("OTEL_EXPORTER_OTLP_HEADERS", "").split(",")):
            name, _, value = pair.partition("=")
            self.headers[urllib.parse.unquote(name.strip())] = urllib.parse.unquote(value.strip())
        self.timeout_s = timeout_s

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        body = json.dumps(otlp_json(spans)).encode()
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url, body, self.headers, method="POST"),
                                        timeout=self.timeout_s) as answer:
                answer.read()
            return SpanExportResult.SUCCESS
        except OSError as ex:
            log.warning("OTLP export to %s failed: %s", self.url, ex)
            return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True


def otlp_json(spans: Sequence[Any]) -> dict:
    """ExportTraceServiceRequest in OTLP's JSON encoding: ids in hex, 64-bit integers as strings, enums as
    numbers (OTLP's span kinds are the SDK's plus one)."""
    by_resource: dict[int, tuple[Any, list]] = {}
    for span in spans:
        by_resource.setdefault(id(span.resource), (span.resource, []))[1].append(span)
    return {"resourceSpans": [
        {"resource": {"attributes": _attributes(resource.attributes)},
         "scopeSpans": [{"scope": {"name": "scorehost"}, "spans": [_span(s) for s in group]}]}
        for resource, group in by_resource.values()]}


def _span(span: Any) -> dict:
    context = span.get_span_context()
    out = {"traceId": f"{context.trace_id:032x}", "spanId": f"{context.span_id:016x}", "name": span.name,
           "kind": span.kind.value + 1, "startTimeUnixNano": str(span.start_time),
           "endTimeUnixNano": str(span.end_time), "attributes": _attributes(span.attributes or {}),
           "status": {"code": span.status.status_code.value}}
    if span.parent is not None:
        out["parentSpanId"] = f"{span.parent.span_id:016x}"
    if span.links:
        out["links"] = [{"traceId": f"{link.context.trace_id:032x}", "spanId": f"{link.context.span_id:016x}"}
                        for link in span.links]
    if span.events:
        out["events"] = [{"name": e.name, "timeUnixNano": str(e.timestamp), "attributes": _attributes(e.attributes)}
                         for e in span.events]
    return out


def _attributes(attributes: Any) -> list[dict]:
    return [{"key": key, "value": _value(value)} for key, value in attributes.items()]


def _value(value: Any) -> dict:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, (list, tuple)):
        return {"arrayValue": {"values": [_value(v) for v in value]}}
    return {"stringValue": str(value)}
