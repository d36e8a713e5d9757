"""The deployment's code folder. Azure ML's `code:` is a folder (the app root, AML_APP_ROOT), and a script imports
its own modules and reads its own files from beside it, as `scorehost serve` lets it (the script's directory is on
sys.path): so the whole entry script's directory travels, not the script alone, less what is not code: version
control, caches, virtualenvs, the model (registered or baked on its own) and what `deploy` wrote there (a `plan --out`
or `deploy k8s --out` folder inside the project holds the Secret with the API key). The reference score.py travels
alone: its directory is the scorehost checkout.

One copy serves `deploy plan`'s load check, `plan --out`, `deploy aks|managed` (SDK v2's code, SDK v1's
source_directory) and `deploy k8s`'s image, so what loads in the check is what is shipped."""

from __future__ import annotations

import fnmatch
import os
import shutil
import tempfile
from typing import Callable, Optional

from deploy.settings import DeploySettings, is_reference

SKIPPED = (".git", ".hg", ".svn", "__pycache__", "*.pyc", "*.pyo", ".venv", "venv", ".mypy_cache", ".pytest_cache",
           ".ipynb_checkpoints")
# Azure ML uploads the folder as a new code version on every change, and k8s bakes it into the image: more than this
# is data that belongs in the model directory (or the entry script belongs in a folder of its own).
MAX_BYTES = 100 * 1024 * 1024
# Written into each folder `deploy` writes (mark_output), which no code folder then includes.
OUTPUT_MARK = ".scorehost-output"


def root(entry_script: str) -> str:
    """What ships: the entry script's directory, or the reference score.py alone."""
    return entry_script if is_reference(entry_script) else os.path.dirname(os.path.abspath(entry_script))


def mark_output(folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, OUTPUT_MARK), "w", encoding="utf-8") as f:
        f.write("written by scorehost deploy: left out of the code folder it sends\n")


def _ignore(s: DeploySettings, dest: str = "") -> Callable[[str, list[str]], set[str]]:
    left_out = {os.path.realpath(p) for p in (s.model_dir, dest) if p}

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in SKIPPED)
                or os.path.realpath(os.path.join(folder, name)) in left_out
                or os.path.isfile(os.path.join(folder, name, OUTPUT_MARK))}

    return ignore


def size(s: DeploySettings) -> int:
    """Bytes `copy` would write."""
    top = root(s.entry_script)
    if not os.path.isdir(top):
        return os.path.getsize(top) if os.path.isfile(top) else 0
    ignore, total = _ignore(s), 0
    for folder, dirs, names in os.walk(top, followlinks=True):
        skipped = ignore(folder, dirs + names)
        dirs[:] = [d for d in dirs if d not in skipped]
        total += sum(os.path.getsize(os.path.join(folder, n)) for n in names if n not in skipped)
    return total


def problem(s: DeploySettings) -> Optional[str]:
    """Too big to ship, said before anything is copied or uploaded."""
    if not os.path.isfile(s.entry_script):
        return None  # said by the caller's own check
    total = size(s)
    if total <= MAX_BYTES:
        return None
    return (f"the code folder {root(s.entry_script)} (the entry script's directory, shipped as Azure ML's code) holds "
            f"{total / 2**20:.0f} MB, over {MAX_BYTES // 2**20} MB: move data into the model directory, or put the "
            f"entry script in a folder of its own")


def copy(s: DeploySettings, dest: Optional[str] = None) -> str:
    """Write the code folder into `dest` (replacing what it held; never into itself), by default a new temporary
    folder that the caller removes. Returns the entry script's path in it, whose directory is the folder."""
    dest = dest or tempfile.mkdtemp(prefix="scorehost-code-")
    ignore = _ignore(s, dest)
    shutil.rmtree(dest, ignore_errors=True)
    top = root(s.entry_script)
    if os.path.isdir(top):
        shutil.copytree(top, dest, ignore=ignore)
    else:
        os.makedirs(dest)
        shutil.copy2(top, dest)
    return os.path.join(dest, os.path.basename(s.entry_script))


def shipped_line(s: DeploySettings, digest: str) -> str:
    """What `deploy` says it sends, whichever SDK sends it."""
    return (f"{os.path.basename(s.entry_script)} sha256 {digest} (the identical file goes to the cloud, in code from "
            f"{root(s.entry_script)})")
