"""The one console entry point: `scorehost serve | model | bench | deploy | parity`.

Each subcommand parses its own flags and hands over to the package that does the work; heavy imports (TensorFlow,
locust, the Azure SDKs) happen only inside the subcommand that needs them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

from . import REFERENCE_SCRIPT, __version__


def _banner(settings, mode: str) -> None:
    print(f"\nscorehost {__version__}: Azure ML inference server contract\n\nServer Settings\n---------------")
    for name, value in settings.describe():
        print(f"{name}: {value}")
    base = f"http://{settings.host}:{settings.port}"
    print(f"\nMode: {mode}")
    print(f"\nServer Routes\n---------------\nLiveness Probe: GET   {base}/\nReadiness:      GET   {base}/ready\n"
          f"Score:          POST  {base}/score\nSwagger:        GET   {base}/swagger.json\n"
          f"Metrics:        GET   {base}/metrics\n", flush=True)


def serving_plan(settings, gpus: list[str]) -> tuple[object, tuple, str]:
    """Fill the settings left to defaults, and say why: (settings, model slots, one line for the banner).

    With run_batch() and batching on (the default when a GPU is visible), one model process per GPU (one on the
    CPU) batches for HTTP workers on every core; otherwise each worker calls run() itself, as Azure ML does."""
    from server.entry_script import defines
    from server.gpus import default_workers

    has_batch = defines(settings.entry_script, "run_batch")
    if settings.batch_max is None:
        settings = settings.replace(batch_max=64 if gpus and has_batch else 0)
    if settings.batch_max > 1 and not has_batch:
        print(f"scorehost: --batch-max is set but {settings.entry_script} has no run_batch(): batching is off",
              file=sys.stderr)
    if settings.batch_max > 1 and has_batch:
        slots = tuple(gpus) or (None,)
        if settings.workers is None:
            settings = settings.replace(workers=os.cpu_count() or 1)
        if settings.threads is None:
            settings = settings.replace(threads=2 * settings.batch_max)
        if settings.batch_sizes is None:
            powers = tuple(2 ** i for i in range(settings.batch_max.bit_length()) if 2 ** i < settings.batch_max)
            settings = settings.replace(batch_sizes=powers + (settings.batch_max,) if gpus else ())
        where = f"one per GPU ({', '.join(gpus)})" if gpus else "one, on the CPU (no GPU visible)"
        mode = (f"batched: {len(slots)} model process(es), {where}, run init() and run_batch() (up to "
                f"{settings.batch_max} requests a call); {settings.workers} HTTP workers preprocess and feed them. "
                f"Why: the script has run_batch() and batching is on")
        return settings, slots, mode
    if settings.workers is None:
        settings = settings.replace(workers=default_workers())
    if settings.threads is None:
        settings = settings.replace(threads=1)
    if settings.batch_sizes is None:
        settings = settings.replace(batch_sizes=())
    if not has_batch:
        why = "the script has no run_batch()"
    elif gpus:
        why = "batching is off (--batch-max 0)"
    else:
        why = "no GPU is visible, so batching is off by default (--batch-max N turns it on)"
    mode = (f"per worker: {settings.workers} worker(s) each run init() and call run() "
            f"({settings.threads} at a time), as Azure ML does. Why: {why}")
    return settings, (), mode


def cmd_serve(args: argparse.Namespace) -> int:
    from server.gpus import visible_gpus
    from server.runner import serve
    from server.settings import BY_NAME, SettingError, check, resolve

    if args.entry_script:  # a path typed on the command line means "from here", as azmlinfsrv takes it
        args.entry_script = os.path.abspath(args.entry_script)
    settings = resolve({name: getattr(args, name) for name in BY_NAME})
    try:
        check(settings)
    except SettingError as ex:
        print(ex, file=sys.stderr)
        return ex.exit_code
    if settings.auth_key_file:
        with open(settings.auth_key_file, encoding="utf-8") as f:
            settings = settings.replace(auth_key=f.read().strip(), auth_key_file=None)
    if settings.entry_script is None:
        settings = settings.replace(entry_script=REFERENCE_SCRIPT)
    if settings.model_dir is None and os.path.realpath(settings.entry_script) == os.path.realpath(REFERENCE_SCRIPT):
        from .models import demo_model_dir

        settings = settings.replace(model_dir=demo_model_dir())
    if settings.model_dir is not None:
        os.environ["AZUREML_MODEL_DIR"] = os.path.abspath(settings.model_dir)  # the script reads it, as in Azure ML
    if settings.access_log is None:
        settings = settings.replace(access_log=sys.stdout.isatty())
    settings, model_slots, mode = serving_plan(settings, visible_gpus())
    _banner(settings, mode)
    return serve(settings, model_slots) or 0



def cmd_model(args: argparse.Namespace) -> int:
    import logging

    from .models import BUILDERS

    # Our own progress at INFO; TensorFlow's and absl's INFO lines (assets written, captured inputs renamed) are
    # nothing a user can act on.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("scorehost").setLevel(logging.INFO)
    started = time.perf_counter()
    path = BUILDERS[args.name](args.out)
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


def cmd_bench(args: argparse.Namespace) -> int:
    missing = _missing_for_bench(args)
    if missing:
        from .extras import install_line

        print(install_line("bench", missing, "bench"), file=sys.stderr)
        return 2
    from bench import report, run

    scripts: dict[str, tuple[str, Optional[str]]] = {}
    for name in [] if args.remote or args.url else args.scripts:  # a remote server brings its own script
        if name == "trivial":
            scripts[name] = (run.TRIVIAL, None)
        elif name == "resnet50":
            from .models import demo_model_dir

            scripts[name] = (REFERENCE_SCRIPT, demo_model_dir())
        else:
            label, _, path = name.partition("=")
            if not path:
                raise SystemExit(f"scorehost bench: unknown script {name!r}: use trivial, resnet50 or NAME=PATH")
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

    print(f"scorehost bench: {cells} cells of {args.seconds:g} s -> {out}", flush=True)
    results = run.run_matrix(scripts, args.servers, args.concurrency, args.seconds, key=args.key or "",
                             images=args.images or "", batch=args.batch, remote=args.remote or "",
                             progress=progress, scorehost_args=tuple(args.scorehost_arg), client=args.client,
                             workers=args.workers)
    path = report.write(results, out, "scorehost bench " + " ".join(args.argv), args.seconds)
    print(f"report: {path}")
    return 0


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

    bench = sub.add_parser("bench", help="benchmark scorehost against Azure ML's server (or a remote endpoint)")
    bench.add_argument("--servers", nargs="+", default=["scorehost", "aihs"], choices=["scorehost", "aihs"])
    bench.add_argument("--scripts", nargs="+", default=["trivial", "resnet50"],
                       help="trivial, resnet50 (the reference score.py on the demo model), or NAME=PATH")
    bench.add_argument("--model-dir", help="AZUREML_MODEL_DIR for NAME=PATH scripts")
    bench.add_argument("--concurrency", nargs="+", type=int, default=[1, 2, 4, 8])
    bench.add_argument("--seconds", type=float, default=15, help="budget per cell")
    bench.add_argument("--workers", type=int, default=1, help="worker processes of every local server (AIHS too)")
    bench.add_argument("--batch", type=int, default=1, help="images per request (>1: JSON batch form)")
    bench.add_argument("--images", help="directory of JPEG/PNG files to send (default: generated JPEGs)")
    bench.add_argument("--remote", help="load this endpoint instead of local servers, e.g. https://.../score's base")
    bench.add_argument("--key", help="bearer key (remote endpoint, or set on the local scorehost)")
    bench.add_argument("--scorehost-arg", action="append", default=[],
                       help="extra `scorehost serve` argument for the local scorehost (repeat), e.g. --batch-max=8")
    bench.add_argument("--client", choices=["locust", "loadgen"], default="locust",
                       help="load generator: Locust (bench/locustfile.py), or bench/loadgen.py (lighter, asyncio)")
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
    try:
        return args.func(args)
    except SystemExit as ex:  # DeployError and friends: their message, exit code 1, no traceback
        if isinstance(ex.code, str):
            print(ex.code, file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
