"""The deployment's code folder. Azure ML's `code:` is a folder (the app root, AML_APP_ROOT), and a script imports
its own modules and reads its own files from beside it, as `scorehost serve` lets it (the script's directory is on
sys.path): so the whole entry script's directory travels, not the script alone, less what is not code: version
control, caches, virtualenvs, the model (registered or baked on its own) and what `deploy` wrote there (a `plan --out`
or `deploy k8s --out` folder inside the project holds the Secret with the API key). The reference score.py travels
alone: its directory is the scorehost checkout.

One copy serves `deploy plan`'s load check, `plan --out`, `deploy aks|managed` (SDK v2's code, SDK v1's
source_directory) and `deploy k8s`'s image, so what loads in the check is what is shipped. Azure ML's SDKs leave out
of the upload what the folder's `.amlignore` (else `.gitignore`) matches: the copy leaves it out too, matched by the
SDK's own code, so a file the script needs that Azure would drop fails the load check, not the endpoint."""

from __future__ import annotations

import fnmatch
import importlib
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

from deploy.settings import DeployError, DeploySettings, is_reference

SKIPPED = (".git", ".hg", ".svn", "__pycache__", "*.pyc", "*.pyo", ".venv", "venv", ".mypy_cache", ".pytest_cache",
           ".ipynb_checkpoints")
# Azure ML uploads the folder as a new code version on every change, and k8s bakes it into the image: more than this
# is data that belongs in the model directory (or the entry script belongs in a folder of its own).
MAX_BYTES = 100 * 1024 * 1024
# What Azure ML's SDKs read, in their order: the first found applies (the other is then uploaded like any file).
IGNORE_FILES = (".amlignore", ".gitignore")
# Written into each folder `deploy` writes (mark_output), which no code folder then includes.
OUTPUT_MARK = ".scorehost-output"


def root(entry_script: str) -> str:
    """What ships: the entry script's directory, or the reference score.py alone."""
    return entry_script if is_reference(entry_script) else os.path.dirname(os.path.abspath(entry_script))


def output_problem(folder: str) -> Optional[str]:
    """`--out` is replaced in part (code/, model/, the manifests): only a new or empty folder, or one scorehost wrote
    before (its OUTPUT_MARK), never a user's own files (`--out .` at a project's root)."""
    if not os.path.exists(folder) or os.path.isfile(os.path.join(folder, OUTPUT_MARK)):
        return None
    if not os.path.isdir(folder):
        return f"--out {folder} is a file, not a folder"
    if not os.listdir(folder):
        return None
    return (f"--out {folder} is not empty and was not written by scorehost (it has no {OUTPUT_MARK}); what is there "
            "would be overwritten: give a new or empty folder")


def mark_output(folder: str) -> None:
    """Mark `folder` as scorehost's before writing into it; refused (DeployError) where output_problem says so."""
    problem = output_problem(folder)
    if problem:
        raise DeployError(f"scorehost deploy: {problem}")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, OUTPUT_MARK), "w", encoding="utf-8") as f:
        f.write("written by scorehost deploy: left out of the code folder it sends\n")


def ignore_file(s: DeploySettings) -> Any:
    """The ignore file Azure ML's SDK applies to the code upload (.amlignore, else .gitignore, at the folder's top),
    as that SDK reads it (its own matcher: v2's get_ignore_file, v1's get_project_ignore_file); None without one.
    Either SDK will do when the chosen one is not installed (their rules are the same gitignore matching)."""
    top = os.path.realpath(root(s.entry_script))  # resolved, as the SDKs resolve the folder they walk
    found = _ignore_file_names(top)
    if not found:
        return None
    v2 = ("azure.ai.ml._utils._asset_utils", "get_ignore_file")
    v1 = ("azureml._project.ignore_file", "get_project_ignore_file")
    for module, function in (v1, v2) if s.sdk == "v1" else (v2, v1):
        try:
            return getattr(importlib.import_module(module), function)(top)
        except ImportError:
            continue
    raise DeployError(f"{os.path.join(top, found[0])} leaves files out of the code Azure ML uploads; applying it as "
                      "Azure ML does takes its SDK: pip install -e '.[deploy]'")


def _ignore_file_names(top: str) -> list[str]:
    return [name for name in IGNORE_FILES if os.path.isfile(os.path.join(top, name))] if os.path.isdir(top) else []


def _ignore(s: DeploySettings, dest: str = "",
            left_out_by_file: Optional[list[str]] = None) -> Callable[[str, list[str]], set[str]]:
    """shutil.copytree's ignore: what is not code, and the files the ignore file leaves out (collected, relative to
    the folder, into `left_out_by_file`)."""
    left_out = {os.path.realpath(p) for p in (s.model_dir, dest) if p}
    top, matcher = root(s.entry_script), ignore_file(s)

    def excluded(path: str) -> bool:  # the SDKs match files only, in the resolved folder, as their upload walks it
        if matcher is None or not os.path.isfile(path) or not matcher.is_file_excluded(
                os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))):
            return False
        if left_out_by_file is not None:
            left_out_by_file.append(os.path.relpath(path, top))
        return True

    def ignore(folder: str, names: list[str]) -> set[str]:
        return {name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in SKIPPED)
                or os.path.realpath(os.path.join(folder, name)) in left_out
                or os.path.isfile(os.path.join(folder, name, OUTPUT_MARK))
                or excluded(os.path.join(folder, name))}

    return ignore


def _scan(s: DeploySettings) -> tuple[int, list[str]]:
    """Bytes `copy` would write, and the files the ignore file leaves out."""
    top, left_out = root(s.entry_script), []
    if not os.path.isdir(top):
        return (os.path.getsize(top) if os.path.isfile(top) else 0), left_out
    ignore, total = _ignore(s, left_out_by_file=left_out), 0
    for folder, dirs, names in os.walk(top, followlinks=True):
        skipped = ignore(folder, dirs + names)
        dirs[:] = sorted(d for d in dirs if d not in skipped)
        total += sum(os.path.getsize(os.path.join(folder, n)) for n in names if n not in skipped)
    return total, sorted(left_out)


def size(s: DeploySettings) -> int:
    """Bytes `copy` would write."""
    return _scan(s)[0]


def left_out_line(s: DeploySettings, most: int = 10) -> str:
    """One line naming what the ignore file leaves out of the code folder ("" when nothing)."""
    names = _scan(s)[1]
    if not names:
        return ""
    shown = ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
    return (f"left out of the code folder by its {_ignore_file_names(root(s.entry_script))[0]}, as Azure ML's upload "
            f"leaves them out: {shown}")


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
        for folder, _, _ in os.walk(dest, topdown=False):  # the upload carries files: no empty folder
            if folder != dest and not os.listdir(folder):
                os.rmdir(folder)
    else:
        os.makedirs(dest)
        shutil.copy2(top, dest)
    return os.path.join(dest, os.path.basename(s.entry_script))


def shipped_line(s: DeploySettings, digest: str) -> str:
    """What `deploy` says it sends, whichever SDK sends it."""
    return (f"{os.path.basename(s.entry_script)} sha256 {digest} (the identical file goes to the cloud, in code from "
            f"{root(s.entry_script)})")
