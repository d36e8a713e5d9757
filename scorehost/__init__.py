"""scorehost: serve an Azure ML entry script locally, benchmark it, and promote it to GPU AKS.

This package holds what is not the server itself: the one console entry point (`cli`) and the offline builders of
the reference models (`models`). The server is `server/`, benchmarks `bench/`, cloud promotion `deploy/`.
"""

import os

from server import __version__  # noqa: F401 - one version for the whole project

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE_SCRIPT = os.path.join(REPO_ROOT, "score.py")
HOME = os.environ.get("SCOREHOST_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "scorehost")
