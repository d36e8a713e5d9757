"""Every setting of the server, declared once: name, command-line flag, environment variable, default, check, doc.

Like gunicorn's config module (whose Setting carries its validator), the CLI, the app and the README's tables all
read this one list, so a setting cannot drift between them. Environment variables carry Azure ML's names where
Azure ML has one, so a container configured for Azure ML configures scorehost the same way. Precedence: flag, then
environment, then default. A default that depends on the machine (GPUs, whether the script has run_batch(), a
terminal) is computed by the setting's own `computed` (`fill_defaults`), so `server/` used without the CLI gets the
same defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional

MIB = 1024 * 1024


def _sizes(text: str) -> tuple[int, ...]:
    if text.strip().lower() == "any":
        return ()
    sizes = tuple(sorted({int(part) for part in text.replace(" ", "").split(",") if part}))
    if any(size < 1 for size in sizes):
        raise ValueError(f"batch sizes must be positive integers, got {text!r}")
    return sizes


def _exactly_true(text: str) -> bool:
    """azmlinfsrv's reading of AML_APP_INSIGHTS_ENABLED and SEPERATE_HEALTH_ENDPOINT: on for "true" alone; any
    other value ("True", "1") is off, without an error, so a deployment with one of those runs with it off on Azure
    ML, and so here too."""
    return text == "true"


def _true_in_any_case(text: str) -> bool:
    """azmlinfsrv's reading of SERVER_VERSION_LOG_RESPONSE_ENABLED: on for "true" in any case, off for anything else
    ("1", "yes"), without an error."""
    return text.lower() == "true"


TRUE_WORDS = ("1", "true", "yes", "on")


def _bool(text: str) -> bool:
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@dataclasses.dataclass(frozen=True)
class Machine:
    """What computed defaults depend on: the visible GPUs, whether the script has run_batch(), a terminal."""

    gpus: tuple[str, ...] = ()
    has_run_batch: bool = False
    terminal: bool = False
    cpus: int = dataclasses.field(default_factory=lambda: os.cpu_count() or 1)


Get = Callable[[str], Any]  # a computed default reads other settings (already filled) through this


def at_least(low: float) -> Callable[[Any], Optional[str]]:
    return lambda value: None if value >= low else f"must be at least {low:g}, got {value}"


def positive(value: Any) -> Optional[str]:
    return None if value > 0 else f"must be greater than 0, got {value}"


def is_dir(value: str) -> Optional[str]:
    return None if os.path.isdir(value) else f"{value} is not a directory"


def is_file(value: str) -> Optional[str]:
    return None if os.path.isfile(value) else f"{value} is not a file"


def _port(value: int) -> Optional[str]:
    return None if 1 <= value <= 65535 else f"must be between 1 and 65535, got {value}"


def _batching(get: Get, machine: Machine) -> bool:
    return get("batch_max") > 1 and machine.has_run_batch


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    flag: str
    env: Optional[str]
    default: Any
    type: Callable[[str], Any]
    doc: str
    secret: bool = False
    check: Optional[Callable[[Any], Optional[str]]] = None  # the problem with a value, or None
    computed: Optional[Callable[[Get, Machine], Any]] = None  # the default when it depends on the machine
    aihs_flag: Optional[str] = None  # azmlinfsrv's spelling of the flag, accepted as well
    env_type: Optional[Callable[[str], Any]] = None  # azmlinfsrv's reading of the variable, where not `type`'s
    warn_only: bool = False  # a problem `check` finds is a warning, not an error: azmlinfsrv serves anyway


SETTINGS: tuple[Setting, ...] = (
    Setting("entry_script", "--entry-script", "AZUREML_ENTRY_SCRIPT", None, str,
            "The entry script with init() and run(). As azmlinfsrv, a relative path given by the flag is from the "
            "current directory, one given by the variable (or the config file) is under the app root. Default: "
            "score.py in the app root when there is one, else the reference score.py with the demo model.",
            aihs_flag="--entry_script"),
    Setting("model_dir", "--model-dir", "AZUREML_MODEL_DIR", None, str,
            "Directory the entry script loads its model from, exported to it as AZUREML_MODEL_DIR as given (the "
            "config file's is not exported, as in azmlinfsrv); one that is not there is a warning, as there. "
            "Default with the reference score.py: the demo ResNet50, built on first use.", check=is_dir,
            aihs_flag="--model_dir", warn_only=True),
    Setting("app_root", "--app-root", "AML_APP_ROOT", ".", str,
            "Directory a relative AZUREML_ENTRY_SCRIPT is found under, appended to sys.path, as in Azure ML."),
    Setting("host", "--host", "SCOREHOST_HOST", "127.0.0.1", str,
            "Address to bind. 127.0.0.1 keeps a laptop server private; containers pass 0.0.0.0."),
    Setting("port", "--port", "SCOREHOST_PORT", 5001, int, "Port to bind (Azure ML's is 5001).", check=_port),
    Setting("workers", "--workers", "WORKER_COUNT", None, int,
            "Worker processes, each with its own copy of the model. Default: one per visible GPU, else 1 (with a "
            "model process: one HTTP worker per core).", check=at_least(1),
            computed=lambda get, m: m.cpus if _batching(get, m) else max(1, len(m.gpus)),
            aihs_flag="--worker_count"),
    Setting("threads", "--threads", "SCOREHOST_THREADS", None, int,
            "App threads per worker: how many run() calls may overlap in one worker. Default 1, as Azure ML: "
            "scripts are written for one call at a time (a module global shared by two calls mixes two clients' "
            "data); raise it only for a thread-safe script. Sockets are the worker's event loop's, so slow clients "
            "need no threads. With a model process (run_batch), each thread carries one request to it and waits for "
            "the answer (default 2 x --batch-max); run_batch() is called one at a time.", check=at_least(1),
            computed=lambda get, m: 2 * get("batch_max") if _batching(get, m) else 1),
    Setting("scoring_timeout_ms", "--scoring-timeout-ms", "SCORING_TIMEOUT_MS", 3_600_000, int,
            "A run() that takes longer is answered with 500 'Scoring timeout after N ms'. The deadline starts when "
            "an app thread takes the request, as Azure ML's timer does, and covers preprocess(), the model queue, "
            "run_batch() and the wait for its answer.", check=positive),
    Setting("worker_timeout", "--worker-timeout", "WORKER_TIMEOUT", 300, int,
            "Seconds a silent worker may go before the master restarts it (gunicorn --timeout).", check=positive),
    Setting("graceful_timeout", "--graceful-timeout", "SCOREHOST_GRACEFUL_TIMEOUT", 30, int,
            "Seconds in-flight requests get to finish after SIGTERM (or a reload) before what is left is answered "
            "503 with Retry-After; a model process serves its linked HTTP workers that long at most.",
            check=positive),
    Setting("init_timeout", "--init-timeout", "SCOREHOST_INIT_TIMEOUT", 600, int,
            "Seconds a worker may spend importing the entry script and running init() before start-up fails.",
            check=positive),
    Setting("keepalive", "--keepalive", "SCOREHOST_KEEPALIVE", 5, int,
            "Seconds an idle keep-alive connection stays open (0 closes after each response, as Azure ML does).",
            check=at_least(0)),
    Setting("read_timeout", "--read-timeout", "SCOREHOST_READ_TIMEOUT", 30.0, float,
            "Seconds a client may go silent in the middle of a request (or before its first byte) before it is "
            "answered 408 and closed (nginx's client_body_timeout).", check=positive),
    Setting("send_timeout", "--send-timeout", "SCOREHOST_SEND_TIMEOUT", 30.0, float,
            "Seconds a client may go without reading its answer before the connection is dropped (nginx's "
            "send_timeout). Also bounds each write between an HTTP worker and a model process.", check=positive),
    Setting("cors_origins", "--cors-origins", "AML_CORS_ORIGINS", None, str,
            "Comma-separated origins allowed by CORS (GET and POST), as Azure ML's AML_CORS_ORIGINS.",
            aihs_flag="--access_control_allow_origins"),
    Setting("auth_key", "--auth-key", "SCOREHOST_AUTH_KEY", None, str,
            "When set, /score, /swagger.json and /metrics need 'Authorization: Bearer <key>', as AKS endpoints do. "
            "The header is removed once checked: the entry script never sees the key. Prefer the environment "
            "variable or --auth-key-file: a flag is visible in the process list.",
            secret=True),
    Setting("auth_key_file", "--auth-key-file", "SCOREHOST_AUTH_KEY_FILE", None, str,
            "File holding the key (read once at start-up): keeps it out of the process list, unlike --auth-key.",
            check=is_file),
    Setting("max_body_bytes", "--max-body-bytes", "SCOREHOST_MAX_BODY_BYTES", 16 * MIB, int,
            "Largest request body accepted; a larger one is answered 413 before the entry script sees it.",
            check=positive),
    Setting("batch_max", "--batch-max", "SCOREHOST_BATCH_MAX", None, int,
            "Batching: most requests handed to the script's run_batch() at once; > 1 starts one model process per "
            "GPU (one on a machine without GPU) that batches for every HTTP worker. Default: 64 on a machine with "
            "a GPU when the script has run_batch(), else 0 (off: each worker calls run(), as Azure ML).",
            check=at_least(0), computed=lambda get, m: 64 if m.gpus and m.has_run_batch else 0),
    Setting("batch_delay_ms", "--batch-delay-ms", "SCOREHOST_BATCH_DELAY_MS", 100.0, float,
            "Batching: the longest a batch is held, from its first request's arrival, while the batching policy "
            "waits for a fuller one. It waits only when run_batch()'s learned cost and the clients' return pattern "
            "say a fuller batch pays (never for a single client, never past a request's deadline); the very first "
            "batch, before anything is learned, waits this long for a full one. For batches to fill, this must "
            "exceed run_batch()'s time. 0: send whatever is queued at once.", check=at_least(0)),
    Setting("batch_sizes", "--batch-sizes", "SCOREHOST_BATCH_SIZES", None, _sizes,
            "Batching: allowed batch sizes, e.g. 1,2,4,8,16,32,64; a batch is padded to the next one, and each is "
            "warmed (with the script's warmup_item()) before the model process takes traffic, so GPU kernels are "
            "tuned once. Default: powers of two up to --batch-max on a GPU, any size on the CPU ('any').",
            computed=lambda get, m: tuple(2 ** i for i in range(get("batch_max").bit_length())
                                          if 2 ** i < get("batch_max")) + (get("batch_max"),)
            if m.gpus and _batching(get, m) else ()),
    Setting("batch_queue", "--batch-queue", "SCOREHOST_BATCH_QUEUE", 256, int,
            "Batching: requests that may wait per model process; past that the server answers 503 with "
            "Retry-After.", check=at_least(1)),
    Setting("batch_queue_bytes", "--batch-queue-bytes", "SCOREHOST_BATCH_QUEUE_BYTES", 512 * MIB, int,
            "Batching: bytes of items that may wait per model process (past that, 503 with Retry-After); an item "
            "larger than this (what preprocess() made of one request) is refused with 500 in the HTTP worker.",
            check=positive),
    Setting("max_body_bytes_in_flight", "--max-body-bytes-in-flight", "SCOREHOST_MAX_BODY_BYTES_IN_FLIGHT",
            64 * MIB, int,
            "Request body bytes one HTTP worker may hold at once (arrived, waiting, being answered); a request "
            "whose announced size does not fit is answered 503 with Retry-After before its body is read, and one "
            "whose bytes pass it as they arrive, then. One request is always taken.",
            check=positive),
    Setting("hung_grace", "--hung-grace", "SCOREHOST_HUNG_GRACE", 10.0, float,
            "Seconds a run() or run_batch() may go on past the scoring timeout (its requests already answered 500) "
            "before its worker or model process is restarted. A worker first lets its other requests finish (up to "
            "5 s) and answers what is left 503 with Retry-After.", check=positive),
    Setting("access_log", "--access-log", "SCOREHOST_ACCESS_LOG", None, _bool,
            "Log one short line per request (client, method, path, status, size, time): true or false (also "
            "1/0, yes/no, on/off). Default: on when the "
            "server runs in a terminal, so a first user sees requests arrive; off otherwise (on a trivial script it "
            "costs about 15% of the requests a second, bench/RESULTS.md).", computed=lambda get, m: m.terminal),
    Setting("record", "--record", "SCOREHOST_RECORD", None, str,
            "Directory to record each answered request and its answer into, one JSON file each (server/record.py "
            "has the format), for `scorehost parity URL --replay DIR`. The Authorization header is never written."),
    Setting("record_max_count", "--record-max-count", "SCOREHOST_RECORD_MAX_COUNT", 1000, int,
            "Recording: most exchanges kept in the --record directory; later ones are not written (the oldest "
            "are kept).", check=at_least(1)),
    Setting("record_max_bytes", "--record-max-bytes", "SCOREHOST_RECORD_MAX_BYTES", 256 * MIB, int,
            "Recording: most bytes of recorded files in the --record directory; an exchange that would pass it "
            "is not written.", check=at_least(1)),
    # --- Azure ML's local features (azmlinfsrv's amlserver.py, server/config.py, entry.py, appinsights_client.py)
    Setting("config_file", "--config-file", "AZUREML_CONFIG_FILE", None, str,
            "JSON file of Azure ML's server settings by their environment names (AZUREML_ENTRY_SCRIPT, "
            "AZUREML_MODEL_DIR, SCORING_TIMEOUT_MS, SERVICE_PATH_PREFIX, AZUREML_DEBUG_PORT, ...), as azmlinfsrv "
            "reads it: flags and environment win over it; unknown keys are named in one warning. Default: "
            "config.json in the app root or beside the entry script, when there is one (as azmlinfsrv).",
            check=is_file, aihs_flag="--config_file"),
    Setting("health_port", "--health-port", None, 5000, int,
            "Port of the separate liveness listener, with --separate-health-endpoint (azmlinfsrv ignores a "
            "HEALTH_PORT variable, so there is none).", check=_port, aihs_flag="--health_port"),
    Setting("separate_health_endpoint", "--separate-health-endpoint", "SEPERATE_HEALTH_ENDPOINT", False, _bool,
            "Also listen on --health-port (Azure ML's own spelling of the variable), so a liveness probe of GET / "
            "has an accept queue that scoring traffic cannot fill. As azmlinfsrv, it serves the same routes, and "
            "the variable is on for 'true' alone.", env_type=_exactly_true),
    Setting("debug_port", "--debug-port", "AZUREML_DEBUG_PORT", None, int,
            "Listen for a debugger (debugpy; pip install scorehost[debug]) on this port in the process that runs "
            "init() and run() (the model process when batching). Implies one worker and no scoring, worker or init "
            "timeout, since a breakpoint would otherwise time the request out or restart the worker. Never in "
            "production.", check=_port),
    Setting("source_dir", "--source-dir", "AZUREML_SOURCE_DIRECTORY", None, str,
            "Directory (relative to --app-root) appended to sys.path before the entry script loads, as azmlinfsrv."),
    Setting("service_path_prefix", "--service-path-prefix", "SERVICE_PATH_PREFIX", "", str,
            "Path prefix written into /swagger.json's paths, as azmlinfsrv (which, like scorehost, still serves "
            "the routes themselves without it: Azure ML's front end strips it)."),
    Setting("service_name", "--service-name", "SERVICE_NAME", "ML service", str,
            "Service name in /swagger.json's title and in Application Insights records ('Service Name')."),
    Setting("service_version", "--service-version", "SERVICE_VERSION", "1.0", str,
            "Service version in /swagger.json's info."),
    Setting("workspace_name", "--workspace-name", "WORKSPACE_NAME", "", str,
            "Workspace name in Application Insights records ('Workspace Name')."),
    Setting("server_version_header", "--server-version-header", "SERVER_VERSION_LOG_RESPONSE_ENABLED", True, _bool,
            "Send x-ms-server-version on every answer, with scorehost's version; false sends it only when "
            "HTTP_X_MS_SERVER_VERSION is set, with its value, as azmlinfsrv (whose variable is off for anything "
            "but 'true' in any case).", env_type=_true_in_any_case),
    Setting("log_level", "--log-level", "AZUREML_LOG_LEVEL", "info", str,
            "Server log level (debug, info, warning, error), Azure ML's AZUREML_LOG_LEVEL."),
    Setting("appinsights_enabled", "--appinsights-enabled", "AML_APP_INSIGHTS_ENABLED", False, _bool,
            "Send each request (id, status, "
            "duration, the answer's body unless --appinsights-log-response false) and the script's exceptions to "
            "Application Insights, with the key below or the connection string (pip install scorehost[telemetry]). "
            "The variable is on for 'true' alone, as azmlinfsrv reads it ('True' is off).", env_type=_exactly_true),
    Setting("appinsights_key", "--appinsights-instrumentation-key", "AML_APP_INSIGHTS_KEY", None, str,
            "Application Insights instrumentation key (a GUID, checked as azmlinfsrv does; giving the flag turns "
            "Application Insights on, as azmlinfsrv).", secret=True, aihs_flag="--appinsights_instrumentation_key"),
    Setting("appinsights_connection_string", "--appinsights-connection-string",
            "APPLICATIONINSIGHTS_CONNECTION_STRING", None, str,
            "Application Insights connection string, as today's SDKs take it (InstrumentationKey=...;"
            "IngestionEndpoint=...); turns Application Insights on. Beats the instrumentation key.", secret=True),
    Setting("appinsights_log_response", "--appinsights-log-response", "APP_INSIGHTS_LOG_RESPONSE_ENABLED", True,
            _bool, "Application Insights: include each answer's body ('Response Value'), as azmlinfsrv by default."),
    Setting("otlp_endpoint", "--otlp-endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", None, str,
            "Trace every request (spans for reading the body, preprocess(), the queue, run() or run_batch() with "
            "its batch size, writing the answer; W3C traceparent taken and returned) and export them over "
            "OTLP/HTTP (JSON) to this base URL (+ /v1/traces; OTEL_EXPORTER_OTLP_HEADERS is sent). Off by default "
            "(pip install scorehost[telemetry])."),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved values, one attribute per Setting."""

    values: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def replace(self, **changes: Any) -> "Settings":
        return Settings({**self.values, **changes})

    def describe(self) -> list[tuple[str, str]]:
        """(doc name, shown value) pairs for the start-up banner; secrets are never shown."""
        shown = []
        for s in SETTINGS:
            value = self.values[s.name]
            if s.secret and value:
                value = "set (hidden)"
            shown.append((s.name, str(value)))
        return shown


class SettingError(Exception):
    """A setting that cannot work: one line naming its flag and environment variable, and the exit code (3 for an
    entry script that is not there, as Azure ML's server exits when it cannot load one; else 2, a usage error)."""

    def __init__(self, setting: Setting, problem: str):
        super().__init__(f"scorehost: {setting.flag}" + (f" / {setting.env}" if setting.env else "") + f": {problem}")
        self.exit_code = 3 if setting.name == "entry_script" else 2


def check(settings: Settings) -> None:
    """Every resolved value checked before anything starts, by its setting's own check; the first problem ends
    start-up with a SettingError (a worker count of 0 used to start no worker and hang). A warn-only setting's
    problem is printed, in the same words, and start-up goes on, as in azmlinfsrv."""
    import socket
    import sys

    v = settings.values
    for s in SETTINGS:
        problem = s.check(v[s.name]) if s.check is not None and v[s.name] is not None else None
        if problem and s.warn_only:
            print(f"{SettingError(s, problem)} (a warning: azmlinfsrv serves anyway, and so does scorehost)",
                  file=sys.stderr)
        elif problem:
            raise SettingError(s, problem)
    if v["entry_script"] and not os.path.isfile(os.path.join(v["app_root"], v["entry_script"])):
        raise SettingError(BY_NAME["entry_script"], f"{v['entry_script']} is not a file")
    ports = ("port",) + (("health_port",) if v["separate_health_endpoint"] else ()) + (
        ("debug_port",) if v["debug_port"] else ())
    for name in ports:
        with socket.socket(socket.AF_INET6 if ":" in v["host"] else socket.AF_INET) as probe:
            # As gunicorn binds: SO_REUSEADDR, so the TIME_WAIT sockets a previous server left do not block a
            # restart.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((v["host"], v[name]))
            except OSError as ex:
                flag = BY_NAME[name].flag
                raise SettingError(BY_NAME[name], f"cannot listen on {v['host']}:{v[name]} ({ex.strerror}): another "
                                   f"server may hold it; choose another with {flag}") from None


class DrainPlan(NamedTuple):
    """How a graceful stop (SIGTERM, Ctrl-C) spends --graceful-timeout, after which gunicorn's master SIGKILLs every
    worker: HTTP workers finish their requests for `http_s`, then answer what is left 503 and have `write_s` to write
    it; a model process serves its linked HTTP workers for `model_s`, then answers its queue 503 early enough for
    those answers to reach the clients."""

    http_s: float
    model_s: float
    write_s: float


def drain_plan(graceful_s: float) -> DrainPlan:
    margin = min(2.0, graceful_s / 4)
    return DrainPlan(graceful_s - margin, max(0.0, graceful_s - 2 * margin), margin / 2)


def fill_defaults(settings: Settings, machine: Machine) -> Settings:
    """The settings left unset, filled by their setting's `computed` default for this machine."""
    values = dict(settings.values)

    def get(name: str) -> Any:
        computed = BY_NAME[name].computed
        if values[name] is None and computed is not None:
            values[name] = computed(get, machine)
        return values[name]

    for s in SETTINGS:
        get(s.name)
    return Settings(values)


def markdown_table() -> str:
    """The README's settings table, made from SETTINGS (tests/test_server.py requires the README to carry it)."""
    rows = ["| flag | environment | default | what it does |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = "see text" if s.default is None else f"`{s.default}`"
        flags = f"`{s.flag}`" + (f", `{s.aihs_flag}`" if s.aihs_flag and s.aihs_flag != s.flag else "")
        rows.append(f"| {flags} | {f'`{s.env}`' if s.env else '-'} | {default} | {s.doc} |")
    return "\n".join(rows)


# The settings azmlinfsrv has too (a flag or a variable of its own, the same meaning): `serve --help` lists them
# first, apart from scorehost's own (an outside review: 45 flags in one list of 290 lines, azmlinfsrv's buried).
AZMLINFSRV = ("entry_script", "model_dir", "app_root", "port", "workers", "scoring_timeout_ms", "worker_timeout",
              "cors_origins", "config_file", "health_port", "separate_health_endpoint", "debug_port", "source_dir",
              "service_path_prefix", "service_name", "service_version", "workspace_name", "server_version_header",
              "log_level", "appinsights_enabled", "appinsights_key", "appinsights_log_response")
USAGE = "%(prog)s [--entry-script SCRIPT] [--model-dir DIR] [--port PORT] [options: --help lists them]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every setting's flag, and azmlinfsrv's spelling of it where that differs (`--entry_script`), so a user's
    azmlinfsrv command line works with the program name swapped; in two groups, azmlinfsrv's first."""
    parser.usage = USAGE
    groups = {True: parser.add_argument_group("Azure ML's settings (azmlinfsrv's flags and variables, the same "
                                              "meaning; its spelling of a flag, e.g. --entry_script, works too)"),
              False: parser.add_argument_group("scorehost's own settings")}
    for s in SETTINGS:
        env = f" [env {s.env}]" if s.env else ""
        default = "" if s.default is None or s.secret else f" (default {s.default})"
        flags = [s.flag] + ([s.aihs_flag] if s.aihs_flag and s.aihs_flag != s.flag else [])
        groups[s.name in AZMLINFSRV].add_argument(*flags, dest=s.name, type=_named(s), default=None, metavar=s.name.upper(),
                            help=f"{s.doc}{env}{default}".replace("%", "%%"))  # argparse formats help with %
    # azmlinfsrv's hidden switch, accepted as it accepts it: it only sets TRANSPORT_PROTOCOL=rest (else grpc) for
    # the script (script_environment); both servers speak HTTP alone. Not a setting: it configures nothing.
    parser.add_argument("--rest", action="store_true", help=argparse.SUPPRESS)


def _named(setting: Setting) -> Callable[[str], Any]:
    """The setting's parser, with a message argparse shows as is (not 'invalid _bool value')."""
    def parse(text: str) -> Any:
        try:
            return setting.type(text)
        except ValueError as ex:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid: {ex}") from None

    parse.__name__ = setting.name
    return parse


def resolve(flags: Optional[Mapping[str, Any]] = None, environ: Optional[Mapping[str, str]] = None) -> Settings:
    """Flag beats environment beats the config file (azmlinfsrv's order) beats default; a malformed value is an
    error naming the variable (or the file and key)."""
    flags = flags or {}
    environ = os.environ if environ is None else environ

    def given(name: str) -> Any:
        env = BY_NAME[name].env
        return flags.get(name) if flags.get(name) is not None else environ.get(env or "", "") or None

    # The script's path as azmlinfsrv exports it before its workers look for config.json beside it: the flag's real
    # path, or AZUREML_ENTRY_SCRIPT as it is (from the current directory, not the app root, in that one lookup).
    script = os.path.realpath(flags["entry_script"]) if flags.get("entry_script") else given("entry_script")
    path, from_file = config_file(given("config_file"), given("app_root") or ".", script)
    values: dict[str, Any] = {}
    for s in SETTINGS:
        if flags.get(s.name) is not None:
            values[s.name] = flags[s.name]
        elif s.env and environ.get(s.env, "") != "":
            values[s.name] = _parsed(s, environ[s.env], f"environment variable {s.env}")
        elif s.env in from_file:
            values[s.name] = _parsed(s, str(from_file[s.env]), f"{path}: {s.env}")
        else:
            values[s.name] = s.default
    if path:
        values["config_file"] = path
    return Settings(values)


def script_environment(settings: Settings, flags: Mapping[str, Any],
                       environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The variables azmlinfsrv sets in its own environment before gunicorn forks the workers that run the script
    (AIHS 1.5.1's amlserver.py: merge_configuration, validate_environment_variables), with its values: the serve
    process sets them before it forks, so a script that reads them sees what Azure ML's server shows it. As there, a
    value given by flag is exported (the entry script and the config file as real paths, the model directory as
    given), one from the environment is left as it is, and one from the config file is not exported (its
    AZUREML_MODEL_DIR configures the server alone: a script that reads the variable fails there, so here too)."""
    environ = os.environ if environ is None else environ
    v = settings.values
    given = {name: value for name, value in flags.items() if value is not None}
    exported = {"WORKER_COUNT": str(v["workers"]), "SERVER_PORT": str(v["port"]),
                "AML_APP_INSIGHTS_ENABLED": "true" if v["appinsights_enabled"] else "false",
                "TRANSPORT_PROTOCOL": "rest" if given.get("rest") else "grpc"}
    if "app_root" in given or "AML_APP_ROOT" not in environ:
        exported["AML_APP_ROOT"] = given["app_root"] if "app_root" in given else os.getcwd()
    for name in ("entry_script", "config_file", "model_dir", "cors_origins", "appinsights_key"):
        if name in given:
            real = name in ("entry_script", "config_file")
            exported[BY_NAME[name].env] = os.path.realpath(given[name]) if real else str(given[name])
    # Without a separate health listener, azmlinfsrv's HEALTH_PORT is the port, except that without --port it keeps
    # one already set.
    separate = v["separate_health_endpoint"]
    if separate or "port" in given or "HEALTH_PORT" not in environ:
        exported["HEALTH_PORT"] = str(v["health_port"] if separate else v["port"])
    if v["server_version_header"]:
        exported["HTTP_X_MS_SERVER_VERSION"] = server_version(settings, environ)
    return exported


def server_version(settings: Settings, environ: Optional[Mapping[str, str]] = None) -> str:
    """x-ms-server-version (and HTTP_X_MS_SERVER_VERSION, which the script sees), as azmlinfsrv decides it: its own
    name and version while the header is on, replacing a value already set; off, the variable's value if one is set
    ("": no header). A review found a set value kept while on."""
    from . import __version__

    environ = os.environ if environ is None else environ
    return f"scorehost/{__version__}" if settings.server_version_header else environ.get("HTTP_X_MS_SERVER_VERSION", "")


def read_as_off(flags: Mapping[str, Any], environ: Optional[Mapping[str, str]] = None) -> list[str]:
    """The variables, not overridden by their flag, that look on ("True", "1") but that azmlinfsrv reads as off, and
    so does scorehost (`env_type`): one line each, for the console."""
    environ = os.environ if environ is None else environ
    return [f"scorehost: {s.env}={environ[s.env]} is off: azmlinfsrv reads it so (see --help), and so does scorehost"
            for s in SETTINGS if s.env_type and s.env and flags.get(s.name) is None
            and environ.get(s.env, "").lower() in TRUE_WORDS and not s.env_type(environ[s.env])]


def _parsed(setting: Setting, text: str, where: str) -> Any:
    """A variable's (or the config file's) value, read as azmlinfsrv reads it where that differs from the flag."""
    try:
        return (setting.env_type or setting.type)(text)
    except ValueError as ex:
        raise SystemExit(f"scorehost: {where}: {ex}") from None


# Keys azmlinfsrv reads from its config file (its config.py fields with an alias); HOSTNAME only names the
# container in its Application Insights records, which scorehost takes from the environment.
CONFIG_FILE_KEYS = ("AZUREML_SOURCE_DIRECTORY", "AZUREML_ENTRY_SCRIPT", "SERVICE_NAME", "WORKSPACE_NAME",
                    "SERVICE_PATH_PREFIX", "SERVICE_VERSION", "SCORING_TIMEOUT_MS", "AZUREML_LOG_LEVEL",
                    "APP_INSIGHTS_LOG_RESPONSE_ENABLED", "AZUREML_MODEL_DIR", "HOSTNAME", "AZUREML_DEBUG_PORT")


def config_file(given: Optional[str], app_root: str, entry_script: Optional[str]) -> tuple[Optional[str], dict]:
    """azmlinfsrv's config file and its values: the one given (--config-file, AZUREML_CONFIG_FILE), else a
    non-empty config.json in the app root or beside the entry script. Unknown keys: one warning naming them."""
    import json
    import sys

    candidates = [given] if given else [os.path.join(app_root, "config.json")] + (
        [os.path.join(os.path.dirname(os.path.abspath(entry_script)), "config.json")]
        if entry_script else [])
    path = next((p for p in candidates if os.path.isfile(p) and os.path.getsize(p)), None)
    if path is None:
        return None, {}
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        if not isinstance(values, dict):
            raise ValueError("expected a JSON object of settings")
    except (OSError, ValueError) as ex:
        raise SystemExit(f"scorehost: config file {path}: {ex}") from None
    unknown = sorted(set(values) - set(CONFIG_FILE_KEYS))
    if unknown:
        print(f"scorehost: config file {path}: keys not supported by Azure ML's server, ignored: "
              f"{', '.join(unknown)}", file=sys.stderr)
    return os.path.abspath(path), {k: v for k, v in values.items() if k in CONFIG_FILE_KEYS and v is not None}
