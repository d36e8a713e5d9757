"""What `deploy` writes for a user to read or apply: YAML with every mapping in full (no &id001 anchors, which
confuse readers and some tools), and files with secrets readable by their owner alone."""

from __future__ import annotations

import os
from typing import Any, Optional

import yaml


class _NoAliases(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def write_yaml(path: str, data: Any, mode: Optional[int] = None) -> str:
    """Write `data` as YAML; with `mode` (0o600 for a secret), the file is created with it, never wider."""
    opener = (lambda p, flags: os.open(p, flags, mode)) if mode is not None else None
    with open(path, "w", encoding="utf-8", opener=opener) as f:
        yaml.dump(data, f, Dumper=_NoAliases, sort_keys=False)
    if mode is not None:
        os.chmod(path, mode)  # also when the file was there before, with other bits
    return path
