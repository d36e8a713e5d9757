"""What an optional command needs (the `deploy`, `bench`... extras of setup.cfg), checked before it starts: one line
naming what is missing and the pip command that brings it, instead of an ImportError traceback halfway through."""

from __future__ import annotations

import importlib.util


# Where a module's distribution is not its dotted name with dashes (azure.ai.ml -> azure-ai-ml).
DISTRIBUTIONS = {"yaml": "pyyaml"}


def missing(modules: tuple[str, ...]) -> list[str]:
    """The distributions (pip names) of the modules that cannot be imported here."""
    def present(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing, or the module is blocked
            return False

    return [DISTRIBUTIONS.get(m, m.replace(".", "-")) for m in modules if not present(m)]


def install_line(command: str, what: list[str], extra: str) -> str:
    return f"scorehost {command} needs {', '.join(what)}: pip install -e '.[{extra}]'"
