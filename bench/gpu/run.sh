#!/usr/bin/env bash
# One command for the GPU measurement (bench/gpu/measure.py), on a machine with an NVIDIA GPU and PyTorch.
# What scorehost imports and that machine lacks (Flask, gunicorn, httptools...) comes from .whl/ when present:
# fetch it with `bash bench/gpu/wheels.sh` where PyPI is reachable, and carry .whl to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m scorehost.cli "$@"\n' > /tmp/bin/scorehost && chmod +x /tmp/bin/scorehost
  export PATH=/tmp/bin:$PATH
fi
missing=$(python3 - <<'PY'
import importlib.util
needed = ["torch", "torchvision", "flask", "gunicorn", "httptools", "flask_cors", "azureml.contrib.services",
          "inference_schema", "prometheus_client", "pynvml", "PIL", "numpy"]
def present(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False
print(" ".join(n for n in needed if not present(n)))
PY
)
if [ -n "$missing" ]; then
  echo "bench/gpu/run.sh: missing here: $missing. PyTorch and torchvision come with the GPU image; the rest: bash bench/gpu/wheels.sh where PyPI is reachable, then bring .whl/ here." >&2
  exit 2
fi
PYTHONUNBUFFERED=1 python3 bench/gpu/measure.py "$@"
