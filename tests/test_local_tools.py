"""What an Azure ML user reaches for locally, against real processes and real packages: azmlinfsrv's command line
and config file, the separate health port, the debugger (a raw DAP client against debugpy), Application Insights
(Azure Monitor's exporter into a local ingestion endpoint) and traces (OTLP/HTTP into a local receiver)."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import re
import socket
import threading
import time
from typing import Any, Callable, Iterator, Optional

import pytest

from conftest import script
from corpus import Case, send
from scorehost import processes

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
GUID = "0c4a6b2e-1f3d-4a5b-9c8d-7e6f5a4b3c2d"


class Recorder:
    """A local HTTP endpoint that records every POST (path, JSON body) and answers as Azure Monitor's ingestion
    does (itemsReceived/itemsAccepted); OTLP receivers only need the 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, Any]] = []
        self.raw = b""
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                recorder.raw += body
                parsed = json.loads(body)
                recorder.posts.append((self.path, parsed))
                count = len(parsed) if isinstance(parsed, list) else 1
                answer = json.dumps({"itemsReceived": count, "itemsAccepted": count, "errors": []}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait_for(self, found: Callable[[], Any], timeout: float = 20) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = found()
            if result:
                return result
            time.sleep(0.1)
        raise AssertionError(f"not received within {timeout} s; received: {self.posts!r}"[:3000])

    def spans(self) -> list[dict]:
        return [span for path, body in self.posts if path == "/v1/traces" for rs in body["resourceSpans"]
                for ss in rs["scopeSpans"] for span in ss["spans"]]

    def envelopes(self) -> list[dict]:
        return [e for path, body in self.posts if path.startswith("/v2") for e in body]


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.server.shutdown()


def attributes(span: dict) -> dict:
    return {a["key"]: next(iter(a["value"].values())) for a in span.get("attributes", [])}


EXPORT_SOON = {"OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_BLRP_SCHEDULE_DELAY": "100",
               "APPLICATIONINSIGHTS_STATSBEAT_DISABLED_ALL": "true"}


# --- azmlinfsrv's command line, config file, health port ------------------------------------------------------

def test_an_azmlinfsrv_command_line_works_with_the_program_name_swapped(tmp_path):
    """`azmlinfsrv --entry_script score.py --model_dir ./models --port 5001 --worker_count 2`, as scorehost."""
    (tmp_path / "models").mkdir()
    (tmp_path / "score.py").write_text(open(script("undecorated.py")).read())
    port = processes.free_port()
    argv = [processes._bin("scorehost"), "serve", "--entry_script", "score.py", "--model_dir", "./models", "--port",
            str(port), "--worker_count", "2", "--access_control_allow_origins", "https://app.example.com"]
    server = processes.ServerProcess("scorehost", argv, {**os.environ, "PYTHONUNBUFFERED": "1"}, port, str(tmp_path))
    try:
        server.wait_healthy(60)
        answer = send(server.url, Case("score.py", "POST", "/score", b"hello", (("Origin", "https://app.example.com"),)))
        assert answer.status == 200 and json.loads(answer.body)["raw"] == "hello"
        assert answer.header("access-control-allow-origin") == "https://app.example.com"
        output = server.output()
        assert "workers: 2" in output and f"model_dir: {tmp_path / 'models'}" not in output  # as given: ./models
        assert "model_dir: ./models" in output
    finally:
        server.stop()


def test_config_file_unknown_keys_are_named_in_one_line(tmp_path):
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"SCORING_TIMEOUT_MS": 700, "subscription_id": "x", "NOT_A_SETTING": 1}))
    with processes.running("scorehost", script("undecorated.py"),
                           env={"AZUREML_CONFIG_FILE": str(config)}) as server:
        output = server.output()
    lines = [line for line in output.splitlines() if "not supported" in line]
    assert lines == [f"scorehost: config file {config}: keys not supported by Azure ML's server, ignored: "
                     "NOT_A_SETTING, subscription_id"]
    assert "scoring_timeout_ms: 700" in output


def test_config_file_below_flags_and_environment(tmp_path):
    from server.settings import resolve

    config = tmp_path / "config.json"  # found in the app root, as azmlinfsrv finds it
    config.write_text(json.dumps({"SCORING_TIMEOUT_MS": 700, "SERVICE_NAME": "from file", "AZUREML_DEBUG_PORT": 5678}))
    s = resolve({"service_name": "from flag"}, {"AML_APP_ROOT": str(tmp_path), "SCORING_TIMEOUT_MS": "900"})
    assert (s.scoring_timeout_ms, s.service_name, s.debug_port, s.config_file) == (900, "from flag", 5678, str(config))
    config.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="expected a JSON object"):
        resolve({}, {"AML_APP_ROOT": str(tmp_path)})


def test_separate_health_port_answers_liveness(start_server):
    health = processes.free_port()
    server = start_server("scorehost", script("sleeper.py"), env={"SEPERATE_HEALTH_ENDPOINT": "true"},
                          extra_args=("--health_port", str(health)))
    busy = threading.Thread(target=send, args=(server.url, Case("sleeper.py", "POST", "/score", b"2")))
    busy.start()  # the one app thread is busy for 2 s
    time.sleep(0.2)
    started = time.monotonic()
    answer = send(f"http://127.0.0.1:{health}", Case("sleeper.py", "GET", "/"))
    assert (answer.status, answer.body) == (200, b"Healthy") and time.monotonic() - started < 0.5
    assert f"Liveness Probe: GET   http://127.0.0.1:{health}/" in server.output()
    busy.join()


def test_server_version_header_can_be_switched_off(start_server):
    server = start_server("scorehost", script("undecorated.py"), env={"SERVER_VERSION_LOG_RESPONSE_ENABLED": "false"})
    assert send(server.url, Case("undecorated.py", "POST", "/score", b"x")).header("x-ms-server-version") is None


def test_source_directory_is_on_the_path(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "helper_i20.py").write_text("ANSWER = 42\n")
    (tmp_path / "score.py").write_text("import helper_i20\n\ndef init():\n    pass\n\n"
                                       "def run(data):\n    return helper_i20.ANSWER\n")
    with processes.running("scorehost", str(tmp_path / "score.py"), env={"AZUREML_SOURCE_DIRECTORY": "lib"}) as server:
        assert send(server.url, Case("score.py", "POST", "/score", b"x")).body == b"42"


# --- the debugger ---------------------------------------------------------------------------------------------

class DapClient:
    """The Debug Adapter Protocol as VS Code speaks it: Content-Length framed JSON over a socket."""

    def __init__(self, port: int):
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.seq = 0
        self.messages: list[dict] = []
        self.arrived = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            self._read_messages()
        except (OSError, ValueError):
            return  # closed at the end of the test

    def close(self) -> None:
        self.sock.close()

    def _read_messages(self) -> None:
        stream = self.sock.makefile("rb")
        while True:
            length = 0
            while (line := stream.readline().strip()):
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if not length:
                return
            message = json.loads(stream.read(length))
            with self.arrived:
                self.messages.append(message)
                self.arrived.notify_all()

    def send(self, command: str, **arguments: Any) -> int:
        self.seq += 1
        body = json.dumps({"seq": self.seq, "type": "request", "command": command, "arguments": arguments}).encode()
        self.sock.sendall(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        return self.seq

    def wait(self, match: Callable[[dict], bool], timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        with self.arrived:
            while True:
                found = next((m for m in self.messages if match(m)), None)
                if found is not None:
                    return found
                if not self.arrived.wait(max(0.0, deadline - time.monotonic())):
                    raise AssertionError(f"no such message; got {[m.get('command') or m.get('event') for m in self.messages]}")

    def response(self, seq: int) -> dict:
        answer = self.wait(lambda m: m.get("type") == "response" and m.get("request_seq") == seq)
        assert answer["success"], answer
        return answer

    def event(self, name: str) -> dict:
        return self.wait(lambda m: m.get("type") == "event" and m.get("event") == name)


DEBUGGED = """def init():
    pass


def run(data):
    answer = {'tag': data}
    return answer


def run_batch(items):
    return [run(item) for item in items]
"""


@pytest.mark.parametrize("batching", [False, True], ids=["per-worker", "model-process"])
def test_a_debugger_attaches_and_stops_at_a_breakpoint(tmp_path, batching):
    path = tmp_path / "debugged.py"
    path.write_text(DEBUGGED)
    line = DEBUGGED.splitlines().index("    answer = {'tag': data}") + 1
    port = processes.free_port()
    extra = ("--debug-port", str(port), "--workers", "3") + (("--batch-max", "4") if batching else ("--batch-max", "0"))
    with processes.running("scorehost", str(path), extra_args=extra) as server:
        output = server.output()
        assert "Debugging (AZUREML_DEBUG_PORT / --debug-port" in output and "workers: 1" in output
        assert "no scoring timeout" in output
        dap = DapClient(port)
        dap.response(dap.send("initialize", adapterID="python", clientID="scorehost-test", linesStartAt1=True,
                              columnsStartAt1=True, pathFormat="path"))
        attach = dap.send("attach", justMyCode=False)
        dap.event("initialized")
        breakpoints = dap.response(dap.send("setBreakpoints", source={"path": str(path)},
                                            breakpoints=[{"line": line}]))
        assert breakpoints["body"]["breakpoints"][0]["verified"], breakpoints
        dap.response(dap.send("configurationDone"))
        dap.response(attach)
        answers: list = []
        request = threading.Thread(target=lambda: answers.append(
            send(server.url, Case("debugged.py", "POST", "/score", b"held"), timeout=120)))
        request.start()
        stopped = dap.event("stopped")
        assert stopped["body"]["reason"] == "breakpoint"
        time.sleep(1.5)  # held at the breakpoint: no answer yet, nothing times out
        assert not answers
        dap.response(dap.send("continue", threadId=stopped["body"]["threadId"]))
        request.join(60)
        dap.close()
        assert answers and answers[0].status == 200 and json.loads(answers[0].body)["tag"] == "held"


# --- traces and Application Insights -------------------------------------------------------------------------

def test_traces_per_stage_over_otlp_with_the_callers_traceparent(start_server, recorder):
    server = start_server("scorehost", script("undecorated.py"),
                          env={**EXPORT_SOON, "OTEL_EXPORTER_OTLP_ENDPOINT": recorder.url})
    answer = send(server.url, Case("undecorated.py", "POST", "/score", b"traced", (("traceparent", TRACEPARENT),)))
    assert answer.status == 200
    version, trace_id, span_id, flags = answer.header("traceparent").split("-")
    assert (version, trace_id, flags) == ("00", TRACEPARENT.split("-")[1], "01") and span_id != TRACEPARENT.split("-")[2]
    spans = recorder.wait_for(lambda: len([s for s in recorder.spans() if s["traceId"] == trace_id]) >= 5 and
                              [s for s in recorder.spans() if s["traceId"] == trace_id])
    by_name = {s["name"]: s for s in spans}
    root = by_name["POST /score"]
    assert root["spanId"] == span_id and root["parentSpanId"] == TRACEPARENT.split("-")[2] and root["kind"] == 2
    assert attributes(root)["http.status_code"] == "200"
    for stage in ("read", "queue", "run", "write"):
        assert by_name[stage]["parentSpanId"] == span_id, stage
        assert int(root["startTimeUnixNano"]) <= int(by_name[stage]["startTimeUnixNano"])
        assert int(by_name[stage]["endTimeUnixNano"]) <= int(root["endTimeUnixNano"])


def test_the_batch_span_links_every_request_span(start_server, recorder):
    server = start_server("scorehost", script("batch_tagger.py"), extra_args=("--batch-max", "8",
                                                                              "--batch-delay-ms", "300"),
                          env={**EXPORT_SOON, "OTEL_EXPORTER_OTLP_ENDPOINT": recorder.url})
    answers: list = []
    threads = [threading.Thread(target=lambda i=i: answers.append(
        send(server.url, Case("batch_tagger.py", "POST", "/score", f"r{i}".encode())))) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sizes = [json.loads(a.body)["batch"] for a in answers]  # how the batching policy grouped them (issue 22)
    request_spans = {a.header("traceparent").split("-")[2] for a in answers}

    def batch_spans():
        spans = [s for s in recorder.spans() if s["name"] == "run_batch"]
        return spans if sum(int(attributes(s)["batch.size"]) for s in spans) == 3 else None

    batches = recorder.wait_for(batch_spans)
    assert {link["spanId"] for b in batches for link in b["links"]} == request_spans  # every request, linked once
    assert sorted(len(b["links"]) for b in batches) == sorted(int(attributes(b)["batch.size"]) for b in batches)
    assert sorted(sizes) == sorted(n for b in batches for n in [int(attributes(b)["batch.size"])] * len(b["links"]))
    names = recorder.wait_for(lambda: (names := [s["name"] for s in recorder.spans()]).count("write") >= 3 and names)
    assert names.count("batch queue") == 3 and names.count("preprocess") == 3 and names.count("model") == 3
    metrics = send(server.url, Case("batch_tagger.py", "GET", "/metrics")).body.decode()
    counts = dict(re.findall(r'scorehost_stage_duration_seconds_count\{stage="(\w+)"\} ([\d.]+)', metrics))
    assert counts == {"preprocess": "3.0", "queue": "4.0", "write": "3.0"}  # this scrape waited for a thread too
    assert f"scorehost_run_duration_seconds_count {float(len(batches))}" in metrics  # one per run_batch() call
    assert "scorehost_batch_queue_wait_seconds_count 3.0" in metrics


def test_application_insights_records_each_request_without_the_key(start_server, recorder):
    key = "the-endpoint-key-i20"
    server = start_server("scorehost", script("raises.py"), extra_args=("--auth-key", key), env={
        **EXPORT_SOON, "WORKSPACE_NAME": "ws-i20",
        "APPLICATIONINSIGHTS_CONNECTION_STRING": f"InstrumentationKey={GUID};IngestionEndpoint={recorder.url}"})
    headers = (("Authorization", f"Bearer {key}"), ("x-ms-client-request-id", "client-i20"))
    ok = send(server.url, Case("raises.py", "POST", "/score", b"ok", headers))
    failed = send(server.url, Case("raises.py", "POST", "/score", b"boom", headers))
    assert (ok.status, failed.status) == (200, 500)
    wanted = {ok.header("x-request-id"), failed.header("x-request-id")}

    def requests() -> list[dict]:
        found = [e for e in recorder.envelopes() if e["data"]["baseType"] == "RequestData"]
        return found if {e["data"]["baseData"]["properties"].get("Request Id") for e in found} >= wanted else []

    records = {e["data"]["baseData"]["properties"]["Request Id"]: e["data"]["baseData"] for e in recorder.wait_for(requests)}
    good, bad = records[ok.header("x-request-id")], records[failed.header("x-request-id")]
    assert (good["responseCode"], good["success"], bad["responseCode"], bad["success"]) == ("200", True, "500", False)
    assert good["properties"]["Response Value"] == '"fine"' and good["properties"]["Workspace Name"] == "ws-i20"
    assert good["properties"]["Client Request Id"] == "client-i20" and good["properties"]["Service Name"] == "ML service"
    exceptions = recorder.wait_for(lambda: [e for e in recorder.envelopes()
                                            if e["data"]["baseType"] == "ExceptionData"])
    assert "SECRET-TRACEBACK-TEXT" in json.dumps(exceptions)  # the script's own exception, as azmlinfsrv sends it
    assert key.encode() not in recorder.raw


def appinsights_to(recorder: Recorder) -> dict[str, str]:
    return {"APPLICATIONINSIGHTS_CONNECTION_STRING": f"InstrumentationKey={GUID};IngestionEndpoint={recorder.url}"}


def test_application_insights_gets_the_request_and_the_scripts_exception_only(start_server, recorder):
    """One request record per request, as azmlinfsrv sends: its stages are spans for an OTLP collector, not
    dependencies in Application Insights; a failing run() is one exception in either, the script's own (the server's
    ScriptFailed around it is none)."""
    server = start_server("scorehost", script("raises.py"), env={
        **EXPORT_SOON, **appinsights_to(recorder), "OTEL_EXPORTER_OTLP_ENDPOINT": recorder.url})
    failed = send(server.url, Case("raises.py", "POST", "/score", b"boom"))
    assert failed.status == 500
    trace_id = failed.header("traceparent").split("-")[1]
    # The request record is exported with or after its stages, which end first: once it is in, any would be too.
    envelopes = recorder.wait_for(lambda: (found := [e for e in recorder.envelopes()
                                                     if e["tags"].get("ai.operation.id") == trace_id]) and
                                  "RequestData" in {e["data"]["baseType"] for e in found} and found)
    assert sorted(e["data"]["baseType"] for e in envelopes) == ["ExceptionData", "RequestData"]
    exception = next(e for e in envelopes if e["data"]["baseType"] == "ExceptionData")["data"]["baseData"]
    assert [x["typeName"] for x in exception["exceptions"]] == ["ValueError"]
    spans = recorder.wait_for(lambda: (found := [s for s in recorder.spans() if s["traceId"] == trace_id]) and
                              "POST /score" in {s["name"] for s in found} and found)
    assert {"read", "queue", "run", "write"} <= {s["name"] for s in spans}
    events = [(s["name"], attributes(event)["exception.type"]) for s in spans for event in s.get("events", [])]
    assert events == [("POST /score", "ValueError")]


CHATTY = """import logging
import sys

log = logging.getLogger("chatty")


def init():
    print("init", "printed")


def run(data):
    print("run printed", data)
    print("run printed to stderr", file=sys.stderr)
    log.info("run logged %s", data)
    log.warning("run warned")
    log.debug("run debugged")
    return data


def run_batch(items):
    return [run(item) for item in items]
"""


@pytest.mark.parametrize("batching", [False, True], ids=["per-worker", "model-process"])
def test_application_insights_gets_what_the_script_prints_as_traces(tmp_path, recorder, batching):
    """As azmlinfsrv, which sends what print() writes to stdout as traces (a logger at INFO), from init() on, and
    nothing the script or its libraries log (a review: every library's INFO records, URLs and all, went too). The
    console shows what it showed, and no noise from the exporter: no HTTP headers of its calls, no traceback about
    the tracer provider."""
    path = tmp_path / "chatty.py"
    path.write_text(CHATTY)
    extra = ("--batch-max", "4") if batching else ("--batch-max", "0")
    with processes.running("scorehost", str(path), extra_args=extra,
                           env={**EXPORT_SOON, **appinsights_to(recorder)}) as server:
        assert send(server.url, Case("chatty.py", "POST", "/score", b"hello")).status == 200

        def traces() -> Optional[dict]:
            found = {e["data"]["baseData"]["message"]: e["data"]["baseData"]["severityLevel"]
                     for e in recorder.envelopes() if e["data"]["baseType"] == "MessageData"}
            sent = {e["data"]["baseType"] for e in recorder.envelopes()}
            return found if "run printed hello" in found and "RequestData" in sent else None

        found = recorder.wait_for(traces)
        output = server.output()
    # severityLevel 1 is INFO; what the script logged is not sent, nor the line print() wrote to stderr
    assert found == {"init printed": "1", "run printed hello": "1"}
    assert output.count("init printed\n") == 1 and output.count("run printed hello\n") == 1
    assert output.count("run printed to stderr\n") == 1 and output.count("chatty: run logged hello\n") == 1
    assert "Request headers" not in output and "Failed to derive Resource" not in output


def test_application_insights_key_as_azmlinfsrv_takes_it():
    from server.settings import resolve
    from server.telemetry import connection_string

    def settings(**environ: str) -> Any:
        return resolve({}, {"AML_APP_ROOT": "/nonexistent", **environ})

    assert connection_string(settings(AML_APP_INSIGHTS_ENABLED="true", AML_APP_INSIGHTS_KEY=GUID)) == \
        f"InstrumentationKey={GUID}"
    assert connection_string(settings(AML_APP_INSIGHTS_ENABLED="true", AML_APP_INSIGHTS_KEY="not-a-guid")) is None
    assert connection_string(settings(AML_APP_INSIGHTS_KEY=GUID)) is None  # not enabled
    assert connection_string(settings(APPLICATIONINSIGHTS_CONNECTION_STRING="InstrumentationKey=k")) == \
        "InstrumentationKey=k"


def test_an_invalid_instrumentation_key_turns_application_insights_off():
    with processes.running("scorehost", script("undecorated.py"),
                           extra_args=("--appinsights_instrumentation_key", "not-a-guid")) as server:
        answer = send(server.url, Case("undecorated.py", "POST", "/score", b"x"))
        output = server.output()
    assert answer.status == 200 and answer.header("traceparent") is None
    assert "scorehost: Application Insights is disabled: AML_APP_INSIGHTS_KEY" in output
    assert "appinsights_enabled: False" in output and "not-a-guid" not in output


def test_tracing_is_off_by_default(start_server):
    server = start_server("scorehost", script("undecorated.py"))
    answer = send(server.url, Case("undecorated.py", "POST", "/score", b"x", (("traceparent", TRACEPARENT),)))
    assert answer.status == 200 and answer.header("traceparent") is None


def test_a_call_stuck_past_the_scoring_timeout_still_ends_its_trace(start_server, recorder):
    """Answered 500 by the worker's loop at the deadline while run() sits in native code: the trace ends there."""
    server = start_server("scorehost", script("stuck.py"), extra_args=("--scoring-timeout-ms", "500",
                                                                      "--hung-grace", "30"),
                          env={**EXPORT_SOON, "OTEL_EXPORTER_OTLP_ENDPOINT": recorder.url})
    answer = send(server.url, Case("stuck.py", "POST", "/score", b"native"))
    assert answer.status == 500
    span_id = answer.header("traceparent").split("-")[2]
    root = recorder.wait_for(lambda: next((s for s in recorder.spans() if s["spanId"] == span_id), None))
    assert attributes(root)["http.status_code"] == "500" and root["status"]["code"] == 2  # ERROR


@pytest.mark.parametrize("init, last", [
    # reads AZUREML_MODEL_DIR, but fails on an import: the model directory is not blamed, the error is quoted
    ("import no_such_module_xyz\n    os.listdir(os.environ['AZUREML_MODEL_DIR'])",
     ["failed to load or init() raised: ModuleNotFoundError: No module named 'no_such_module_xyz'"]),
    # a path built from the missing variable: that is the model directory's failure
    ("os.listdir(os.path.join(os.getenv('AZUREML_MODEL_DIR'), 'model'))",
     ["raised: TypeError: expected str, bytes or os.PathLike object, not NoneType",
      "no model directory was given, and score.py needs one: pass --model-dir DIR"]),
])
def test_the_last_line_of_a_failed_start_says_what_failed(tmp_path, init, last):
    """The master learns only exit code 3; the worker leaves its one line in the run directory (BootWatch.fail)."""
    (tmp_path / "score.py").write_text(f"import os\n\ndef init():\n    {init}\n\ndef run(raw):\n    return raw\n")
    server = processes.start("scorehost", str(tmp_path / "score.py"))
    try:
        assert server.proc.wait(120) == 3
    finally:
        server.stop()
    lines = server.output().strip().splitlines()[-len(last):]
    assert all(want in line for want, line in zip(last, lines)), server.output()[-3000:]


def test_serving_the_demo_for_want_of_a_score_py_is_said(tmp_path, capsys):
    from scorehost import REFERENCE_SCRIPT
    from scorehost.cli import default_entry_script

    assert default_entry_script(str(tmp_path)) == REFERENCE_SCRIPT
    assert capsys.readouterr().err == (f"scorehost: no --entry-script given and no score.py in the app root "
                                       f"({tmp_path}): serving the reference demo script {REFERENCE_SCRIPT}\n")
