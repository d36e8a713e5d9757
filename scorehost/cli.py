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

from . import HOME, REFERENCE_SCRIPT, __version__


def demo_model_dir() -> str:
    """The embedded default model: the demo ResNet50, built on first use (said on the console, with its time)."""
    root = os.path.join(HOME, "models")
    if not os.path.exists(os.path.join(root, "resnet50", "1", "saved_model.pb")):
        from .models import build_resnet50

        print(f"scorehost: building the demo ResNet50 (random weights) in {root} ...", flush=True)
        started = time.perf_counter()
        build_resnet50(root)
        print(f"scorehost: demo model built in {time.perf_counter() - started:.1f} s", flush=True)
    return root


def _banner(settings) -> None:
    print(f"\nscorehost {__version__}: Azure ML inference server contract\n\nServer Settings\n---------------")
    for name, value in settings.describe():
        print(f"{name}: {value}")
    base = f"http://{settings.host}:{settings.port}"
    print(f"\nServer Routes\n---------------\nLiveness Probe: GET   {base}/\nScore:          POST  {base}/score\n"
          f"Swagger:        GET   {base}/swagger.json\nMetrics:        GET   {base}/metrics\n", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from server.gpus import default_workers
    from server.runner import serve
    from server.settings import BY_NAME, resolve

    if args.entry_script:  # a path typed on the command line means "from here", as azmlinfsrv takes it
        args.entry_script = os.path.abspath(args.entry_script)
    settings = resolve({name: getattr(args, name) for name in BY_NAME})
    if settings.entry_script is None:
        settings = settings.replace(entry_script=REFERENCE_SCRIPT)
    if settings.model_dir is None and os.path.realpath(settings.entry_script) == os.path.realpath(REFERENCE_SCRIPT):
        settings = settings.replace(model_dir=demo_model_dir())
    if settings.model_dir is not None:
        os.environ["AZUREML_MODEL_DIR"] = os.path.abspath(settings.model_dir)  # the script reads it, as in Azure ML
    if settings.workers is None:
        settings = settings.replace(workers=default_workers())
    _banner(settings)
    return serve(settings) or 0


def cmd_model(args: argparse.Namespace) -> int:
    import logging

    from .models import BUILDERS

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    path = BUILDERS[args.name](args.out)
    print(f"{path} ({time.perf_counter() - started:.1f} s)")
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

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
