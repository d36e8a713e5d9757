"""What an optional command needs (the `deploy`, `bench`... extras of setup.cfg), checked before it starts: one line
naming what is missing and the pip command that brings it, instead of an ImportError traceback halfway through."""

from __future__ import annotations

import importlib.util


def missing(modules: tuple[str, ...]) -> list[str]:
    def present(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package is missing, or the module is blocked
            return False

    return [m for m in modules if not present(m)]


def install_line(command: str, what: list[str], extra: str) -> str:
    return f"scorehost {command} needs {', '.join(what)}: pip install -e '.[{extra}]'"
