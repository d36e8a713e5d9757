"""The one console entry point: `scorehost serve | model | bench | tune | deploy | parity`.

Each subcommand parses its own flags and hands over to the package that does the work; heavy imports (TensorFlow,
locust, the Azure SDKs) happen only inside the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from typing import Optional

from . import REFERENCE_SCRIPT, __version__


def _banner(settings, mode: str) -> None:
    print(f"\nscorehost {__version__}: Azure ML inference server contract\n\nServer Settings\n---------------")
    for name, value in settings.describe():
        print(f"{name}: {value}")
    base = f"http://{settings.host}:{settings.port}"
    health = f"http://{settings.host}:{settings.health_port}" if settings.separate_health_endpoint else base
    print(f"\nMode: {mode}")
    print(f"\nServer Routes\n---------------\nLiveness Probe: GET   {health}/\nReadiness:      GET   {base}/ready\n"
          f"Score:          POST  {base}/score\nSwagger:        GET   {base}/swagger.json\n"
          f"Metrics:        GET   {base}/metrics\n", flush=True)


KEY_FD_PREFIX = "/proc/self/fd/"


def _restart_without_visible_key(args: argparse.Namespace) -> None:
    """The entry script runs in this process's children, which see its command line and environment (os.environ,
    sys.argv, /proc/<pid>/cmdline and /proc/<pid>/environ). A key given with --auth-key or SCOREHOST_AUTH_KEY
    would be readable there: start again without it, the key in an anonymous in-memory file instead
    (--auth-key-file /proc/self/fd/N), which cmd_serve reads once and closes."""
    key = args.auth_key or os.environ.get("SCOREHOST_AUTH_KEY")
    if not key or not args.from_command_line:
        return
    fd = os.memfd_create("scorehost-auth-key", 0)  # inherited across exec, then closed once read
    os.write(fd, key.encode())
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip or arg.startswith("--auth-key="):
            skip = False
            continue
        if arg == "--auth-key":
            skip = True
            continue
        argv.append(arg)
    environ = {name: value for name, value in os.environ.items() if name != "SCOREHOST_AUTH_KEY"}
    os.execve(sys.executable, [sys.executable, "-m", "scorehost.cli", *argv, "--auth-key-file",
                               f"{KEY_FD_PREFIX}{fd}"], environ)


def announce_ready(host: str, port: int, every_s: float = 0.25) -> None:
    """Print one line, `scorehost: ready on http://HOST:PORT`, once GET /ready first answers 200: the moment the
    server takes traffic, in both modes (with model processes, HTTP workers are up seconds before the model is).

    A daemon thread of the master, started before gunicorn forks: a forked worker does not inherit it, and it
    takes no lock a worker could inherit held (http.client is imported here, the line is one os.write)."""
    import http.client
    import threading

    poll_host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    url = f"http://{f'[{poll_host}]' if ':' in poll_host else poll_host}:{port}"

    def poll() -> None:
        while True:
            time.sleep(every_s)
            connection = http.client.HTTPConnection(poll_host, port, timeout=5)
            try:
                connection.request("GET", "/ready")
                if connection.getresponse().status == 200:
                    os.write(1, f"scorehost: ready on {url}\n".encode())
                    return
            except OSError:
                pass
            finally:
                connection.close()

    threading.Thread(target=poll, name="announce-ready", daemon=True).start()


# What a script's load error says when it is about a model directory it was not given: it names the variable
# (os.environ["AZUREML_MODEL_DIR"]), or a path was built from None (os.path.join(os.getenv(...), ...), f"{None}/...").
MODEL_DIR_SIGNS = ("AZUREML_MODEL_DIR", "os.PathLike object, not NoneType", "'None/")


def cmd_serve(args: argparse.Namespace) -> int:
    _restart_without_visible_key(args)
    from server import record
    from server.gpus import visible_gpus
    from server import telemetry
    from server.runner import debugging, plan, serve

    from .extras import install_line, missing
    from server.settings import BY_NAME, SettingError, check, read_as_off, resolve, script_environment

    flags = {name: getattr(args, name) for name in BY_NAME}
    settings = resolve(flags)
    if args.appinsights_key:  # as azmlinfsrv: giving the key on the command line turns Application Insights on
        settings = settings.replace(appinsights_enabled=True)
    # the key's flag turns Application Insights on, as its own flag would: AML_APP_INSIGHTS_ENABLED is not read then
    for line in read_as_off({**flags, "appinsights_enabled": True} if args.appinsights_key else flags):
        print(line, file=sys.stderr)
    if settings.appinsights_enabled and not telemetry.connection_string(settings):
        print("scorehost: Application Insights is disabled: AML_APP_INSIGHTS_KEY (--appinsights-instrumentation-"
              "key) is missing or not a valid instrumentation key (a GUID)", file=sys.stderr)
        settings = settings.replace(appinsights_enabled=False)  # as azmlinfsrv
    if args.entry_script:  # as azmlinfsrv: the flag from the current directory (its real path, as it exports it)
        settings = settings.replace(entry_script=os.path.realpath(args.entry_script))
    elif settings.entry_script and not os.path.isabs(settings.entry_script):
        # AZUREML_ENTRY_SCRIPT (or the config file's): under --app-root (AML_APP_ROOT, default "."), as azmlinfsrv
        settings = settings.replace(entry_script=os.path.abspath(os.path.join(settings.app_root,
                                                                              settings.entry_script)))
    try:
        check(settings)
        record.check(settings)
    except SettingError as ex:
        print(ex, file=sys.stderr)
        return ex.exit_code
    if settings.auth_key_file:
        with open(settings.auth_key_file, encoding="utf-8") as f:
            settings = settings.replace(auth_key=f.read().strip(), auth_key_file=None)
        if args.auth_key_file and args.auth_key_file.startswith(KEY_FD_PREFIX):
            os.close(int(args.auth_key_file[len(KEY_FD_PREFIX):]))  # the key is in memory now, nowhere else
    # scorehost's own defaults (azmlinfsrv has none) are exported to the script as the flags they stand for.
    if settings.entry_script is None:
        settings = settings.replace(entry_script=default_entry_script(settings.app_root))
        flags["entry_script"] = settings.entry_script
    if settings.model_dir is None and os.path.realpath(settings.entry_script) == os.path.realpath(REFERENCE_SCRIPT):
        from .models import demo_model_dir

        settings = settings.replace(model_dir=demo_model_dir())
        flags["model_dir"] = settings.model_dir
    settings, debug_line = debugging(settings)  # first: the mode below counts the one worker it leaves
    settings, model_slots, mode = plan(settings, visible_gpus())
    absent = missing((("debugpy",) if settings.debug_port else ()) + telemetry.needs(settings))
    if absent:
        print(install_line("serve", absent, "debug" if "debugpy" in absent else "telemetry"), file=sys.stderr)
        return 2
    # Azure ML's variables, for the workers and model processes forked below. AZUREML_MODEL_DIR stays as given,
    # relative or not, as azmlinfsrv passes it: no process of scorehost changes directory.
    os.environ.update(script_environment(settings, {**flags, "rest": args.rest}))
    _banner(settings, f"{mode}\n{debug_line}" if debug_line else mode)
    announce_ready(settings.host, settings.port)
    code, error = serve(settings, model_slots)
    if code != 3:
        return code
    # gunicorn's "Worker failed to boot" would be the last line: say what failed (the worker's own line), and where
    if "AZUREML_MODEL_DIR" not in os.environ and any(sign in error for sign in MODEL_DIR_SIGNS):
        why = ("the config file's AZUREML_MODEL_DIR configures the server alone, as in azmlinfsrv"
               if settings.model_dir else "no model directory was given")
        print(f"scorehost: {error}\nscorehost: {why}, and {os.path.basename(settings.entry_script)} needs one: "
              "pass --model-dir DIR (or set AZUREML_MODEL_DIR=DIR)", file=sys.stderr)
    else:
        print(f"scorehost: {error or settings.entry_script + ' did not load: its error is above'}", file=sys.stderr)
    return code


def default_entry_script(app_root: str) -> str:
    """Without --entry-script: the score.py in the app root when there is one (a user in their project's folder
    means theirs; serving the demo instead misled them), else the reference score.py."""
    own = os.path.abspath(os.path.join(app_root, "score.py"))
    if os.path.isfile(own) and os.path.realpath(own) != os.path.realpath(REFERENCE_SCRIPT):
        print(f"scorehost: no --entry-script given: serving {own}, the score.py in the app root", file=sys.stderr)
        return own
    if not os.path.isfile(own):  # a user who meant their own script learns at once that the demo is served
        print(f"scorehost: no --entry-script given and no score.py in the app root ({os.path.abspath(app_root)}): "
              f"serving the reference demo script {REFERENCE_SCRIPT}", file=sys.stderr)
    return REFERENCE_SCRIPT


def cmd_model(args: argparse.Namespace) -> int:
    import logging

    from .models import build

    # Our own progress at INFO; TensorFlow's and absl's INFO lines (assets written, captured inputs renamed) are
    # nothing a user can act on.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("scorehost").setLevel(logging.INFO)
    started = time.perf_counter()
    path = build(args.name, args.out)
    print(f"{path} ({time.perf_counter() - started:.1f} s)")
    return 0


def _missing_for_bench(args: argparse.Namespace) -> list[str]:
    """What this `scorehost bench` run needs and this environment lacks (said in one line, not a traceback)."""
    import shutil

    from .extras import missing

    absent = missing(("matplotlib", "locust") if args.client == "locust" and not args.scenario else ("matplotlib",))
    if "aihs" in args.servers and not (args.remote or args.url) and not (
            shutil.which("azmlinfsrv") or os.path.exists(os.path.join(os.path.dirname(sys.executable), "azmlinfsrv"))):
        absent.append("azureml-inference-server-http (azmlinfsrv)")
    return absent


def _bench_checks(args: argparse.Namespace) -> None:
    """Defaults that follow from --servers, and flags that contradict them, refused in one line: the proxy script
    takes one JPEG a request, and its batch bound is every server's alike; the peers (bench/peers/) serve the
    proxy only, each with bodies of its own, which bench/loadgen.py sends (Locust does not)."""
    from bench import peers

    if args.url and not args.scenario:
        raise SystemExit("scorehost bench: --url is for the scenarios (--scenario ...); the concurrency matrix "
                         "loads a remote endpoint with --remote")
    if args.remote and args.scenario:
        raise SystemExit("scorehost bench: the scenarios load a running server with --url, not --remote")
    local = not (args.remote or args.url)
    named = [server for server in args.servers if server in peers.NAMES] if local else []
    if args.scripts is None:
        args.scripts = ["proxy"] if named else ["trivial", "resnet50"]
    if args.client is None:
        args.client = "loadgen" if named else "locust"
    if args.images:
        args.images = os.path.abspath(args.images)  # Locust runs in a directory of its own
    if args.requests:
        args.requests = os.path.abspath(args.requests)  # Locust runs in a directory of its own
    from bench.scenarios import bodies_of

    bodies_of(args, "bench")  # read once, now: a directory that holds no requests is said before any server starts
    who = ", ".join(named)
    others = [name for name in args.scripts if name != "proxy"]
    if named and others:
        raise SystemExit(f"scorehost bench: {who} serve the proxy script only (bench/peers/): use --scripts proxy, "
                         f"without {', '.join(others)}")
    if "proxy" in args.scripts and local:
        if not os.path.exists(peers.PROXY_SCRIPT):
            raise SystemExit(f"scorehost bench: the proxy script ({peers.PROXY_SCRIPT}) comes with a checkout of "
                             "scorehost, not with the installed package: run from a clone")
        if args.batch > 1:
            raise SystemExit(f"scorehost bench: the proxy script takes one JPEG a request: drop --batch {args.batch}")
        if any(arg.split("=")[0] == "--batch-max" for arg in args.scorehost_arg):
            raise SystemExit("scorehost bench: on the proxy script the batch bound is every server's alike: use "
                             "--proxy-batch-max N, not --scorehost-arg=--batch-max")
    if named and args.client != "loadgen" and not args.scenario:
        raise SystemExit(f"scorehost bench: {who} are loaded by bench/loadgen.py (their bodies differ from "
                         "scorehost's): drop --client locust")
    from bench.run import refused_serve_arg

    refused = refused_serve_arg(args.scorehost_arg)
    if refused:
        raise SystemExit(refused)
    if args.client == "locust" and not args.scenario and (args.seconds != int(args.seconds) or args.seconds < 1):
        raise SystemExit(f"scorehost bench: Locust runs whole seconds (its -t): --seconds {args.seconds:g} would "
                         "run another length than the report says; give a whole number, or --client loadgen")


def cmd_bench(args: argparse.Namespace) -> int:
    _bench_checks(args)
    missing = _missing_for_bench(args)
    if missing:
        from .extras import install_line

        print(install_line("bench", missing, "bench"), file=sys.stderr)
        return 2
    from bench import peers, report, run

    args.proxy = run.Proxy(args.proxy_cost_ms, args.proxy_batch_max, args.peer_delay_ms, args.peers_dir)
    scripts: dict[str, tuple[str, Optional[str]]] = {}
    for name in [] if args.remote or args.url else args.scripts:  # a remote server brings its own script
        if name == "trivial":
            scripts[name] = (run.TRIVIAL, None)
        elif name == "proxy":
            scripts[name] = (peers.PROXY_SCRIPT, None)
        elif name == "resnet50":
            from .models import demo_model_dir

            scripts[name] = (REFERENCE_SCRIPT, demo_model_dir())
        else:
            label, _, path = name.partition("=")
            if not path and os.path.isfile(name):  # a bare path: named after its file
                label, path = os.path.splitext(os.path.basename(name))[0], name
            if (path and not os.path.isfile(path)) or (not path and (name.endswith(".py") or os.sep in name)):
                raise SystemExit(f"scorehost bench: --scripts {name}: no such file" + (f" ({path})" if path else ""))
            if not path:
                raise SystemExit(f"scorehost bench: unknown script {name!r}: use trivial, resnet50, proxy, "
                                 "NAME=PATH or the path of an entry script")
            scripts[label] = (path, args.model_dir)
    out = args.out or os.path.join("reports", time.strftime("bench-%Y%m%d-%H%M%S"))
    if args.scenario:
        from bench import scenarios

        return scenarios.cmd(args, scripts, out)
    cells = len(args.concurrency) * (1 if args.remote else len(scripts) * len(args.servers))

    def progress(i: int, n: int, r) -> None:
        bar = "#" * round(20 * i / n) + "-" * (20 - round(20 * i / n))
        print(f"[{bar}] {i}/{n} {r.cell.server:9} {r.cell.script:10} clients={r.cell.concurrency:<3} "
              f"{r.req_s:8.1f} req/s  p99 {r.p99_ms:6.0f} ms  errors {r.failures}", flush=True)
        if report.erred([r]):
            print(f"WARNING: {report.errors_line(r)}", file=sys.stderr, flush=True)

    print(f"scorehost bench: up to {cells} cells of {args.seconds:g} s -> {out}", flush=True)
    roster = run.Roster()
    results = run.run_matrix(scripts, args.servers, args.concurrency, args.seconds, args.bodies, key=args.key or "",
                             images=args.images or "", batch=args.batch, requests=args.requests or "",
                             remote=args.remote or "",
                             progress=progress, scorehost_args=tuple(args.scorehost_arg), client=args.client,
                             workers=args.workers, proxy=args.proxy, roster=roster)
    path = report.write(results, out, "scorehost bench " + " ".join(args.argv), args.seconds, roster.markdown())
    print(f"report: {path}")
    failed = report.failed_scripts(results)
    if failed:
        print(f"scorehost bench: {', '.join(failed)}: no cell had most of its answers succeed (2xx): nothing was "
              "measured"
              + ("" if args.requests else f"; {report.OWN_REQUESTS}"), file=sys.stderr)
    return 1 if failed else 0


class ShowDefaults(argparse.HelpFormatter):
    """Help that ends each flag's line with its default, as it would be typed; flags without one show none."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        default, text = action.default, action.help or ""
        if default in (None, [], False) or default is argparse.SUPPRESS or "default" in text:
            return action.help
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def main(argv: Optional[list[str]] = None) -> int:
    from server.settings import add_arguments

    parser = argparse.ArgumentParser(prog="scorehost", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"scorehost {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve an entry script with the Azure ML contract (default: the demo model)")
    add_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    model = sub.add_parser("model", help="build a reference SavedModel offline, in Azure ML's <dir>/<name>/<version>/")
    model.add_argument("name", choices=["resnet50", "colors"])
    model.add_argument("--out", required=True, help="directory to write <name>/<version>/ into")
    model.set_defaults(func=cmd_model)

    bench = sub.add_parser("bench", help="benchmark scorehost against Azure ML's server (or a remote endpoint)",
                           formatter_class=ShowDefaults)
    from bench import peers

    bench.add_argument("--servers", nargs="+", default=["scorehost", "aihs"],
                       choices=["scorehost", "aihs", *peers.NAMES],
                       help="local servers to compare; the peers (each with its own batching, from its own "
                            "virtualenv under --peers-dir: bash bench/peers/install.sh) serve the proxy script only")
    bench.add_argument("--scripts", nargs="+",
                       help="trivial, resnet50 (the reference score.py on the demo model), proxy (issue 22's proxy "
                            "of a GPU script: a Pillow decode per request, run_batch() costing --proxy-cost-ms "
                            "whatever its size; scorehost batches it with one model process), NAME=PATH, or PATH "
                            "(named after its file) (default: trivial resnet50; proxy when a peer is among --servers)")
    bench.add_argument("--model-dir", help="AZUREML_MODEL_DIR for NAME=PATH and PATH scripts")
    bench.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8],
                       help="closed-loop clients of each cell")
    bench.add_argument("--seconds", type=float, default=15, help="budget per cell")
    bench.add_argument("--workers", type=int, default=1,
                       help="worker processes of every local server (AIHS too); not on the proxy script, where "
                            "every server has one model copy (scorehost: one model process, its own HTTP workers)")
    bench.add_argument("--batch", type=int, default=1, help="images per request (>1: JSON batch form)")
    bench.add_argument("--images", help="directory of JPEG/PNG files to send (default: generated JPEGs)")
    bench.add_argument("--requests", metavar="DIR",
                       help="send these requests in turn instead of images: those `scorehost serve --record DIR` "
                            "kept (a script that takes JSON, or anything but images, needs its own)")
    bench.add_argument("--remote", help="load this endpoint instead of local servers, e.g. https://.../score's base")
    bench.add_argument("--key", help="bearer key (remote endpoint, or set on the local scorehost)")
    bench.add_argument("--scorehost-arg", action="append", default=[],
                       help="extra `scorehost serve` argument for the local scorehost (repeat), e.g. --batch-max=8")
    bench.add_argument("--client", choices=["locust", "loadgen"],
                       help="load generator: Locust (bench/locustfile.py), or bench/loadgen.py (lighter, asyncio; "
                            "the default when a peer is among --servers, else Locust)")
    from bench.run import Proxy

    proxy = Proxy()
    bench.add_argument("--peers-dir", default=proxy.peers_dir,
                       help="the peers' virtualenvs, DIR/NAME/bin/python (a peer not there is skipped, said so)")
    bench.add_argument("--proxy-cost-ms", type=float, default=proxy.cost_ms,
                       help="the proxy script's run_batch() time, whatever the batch size")
    bench.add_argument("--proxy-batch-max", type=int, default=proxy.batch_max,
                       help="the proxy script: the most a batch takes, in scorehost and every peer alike")
    bench.add_argument("--peer-delay-ms", type=float, default=proxy.peer_delay_ms,
                       help="the peers' own batching delay bound")
    bench.add_argument("--out", help="report folder (default: reports/bench-<time>)")
    bench.set_defaults(func=cmd_bench)
    from bench.scenarios import add_arguments as add_scenario_arguments
    from bench.tune import register as register_tune

    add_scenario_arguments(bench)
    register_tune(sub)

    from deploy.cli import register

    register(sub)

    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)[1:]
    args.from_command_line = argv is None
    # bench and tune start servers in sessions of their own, stopped on the way out (run.started, tune.serving):
    # SIGTERM (kill, a CI's timeout) unwinds them as Ctrl-C does, instead of ending this process and leaving them.
    # serve's master handles SIGTERM itself (a graceful stop).
    terminated = signal.signal(signal.SIGTERM, _terminate) if args.command in ("bench", "tune") else None
    try:
        return args.func(args)
    except KeyboardInterrupt as ex:  # Ctrl-C (or SIGTERM) at any moment: one line, the shell's code for the signal
        print("\nscorehost: " + ("terminated" if isinstance(ex, Terminated) else "interrupted"), file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(ex, Terminated) else signal.SIGINT)
    except SystemExit as ex:  # DeployError and friends: their message, exit code 1, no traceback
        if isinstance(ex.code, str):
            print(ex.code, file=sys.stderr)
            return 1
        raise
    finally:
        if terminated is not None:
            signal.signal(signal.SIGTERM, terminated)


class Terminated(KeyboardInterrupt):
    """SIGTERM in bench or tune, raised where the main thread is, so that what it started is stopped."""


def _terminate(signum: int, frame: object) -> None:
    if os.getpid() != _MAIN_PID:  # a process bench forked (a trivial server) inherits this: it just ends
        os._exit(128 + signal.SIGTERM)
    raise Terminated()


_MAIN_PID = os.getpid()


if __name__ == "__main__":
    sys.exit(main())
