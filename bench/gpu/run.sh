#!/usr/bin/env bash
# One command for the GPU measurement (bench/gpu/measure.py), on a machine with an NVIDIA GPU and PyTorch.
# scorehost's own small dependencies come from .whl/ when present (the device machine has no PyPI), else from pip:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl flask werkzeug gunicorn flask-cors azureml-contrib-services \
#     inference-schema prometheus-client nvidia-ml-py pillow blinker itsdangerous click jinja2 markupsafe httptools \
#     python-dateutil pytz wrapt numpy six packaging
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
  mkdir -p /tmp/bin && printf '#!/bin/sh\nexec python3 -m scorehost.cli "$@"\n' > /tmp/bin/scorehost && chmod +x /tmp/bin/scorehost
  export PATH=/tmp/bin:$PATH
fi
PYTHONUNBUFFERED=1 python3 bench/gpu/measure.py "$@"
