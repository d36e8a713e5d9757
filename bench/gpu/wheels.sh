#!/usr/bin/env bash
# Fetch, on a machine that reaches PyPI, the wheels that bench/gpu/run.sh needs on a GPU machine that does not: what
# `scorehost serve` imports and the GPU image (PyTorch, torchvision, werkzeug...) lacks, for its Python 3.12 on
# x86-64, at the versions of this checkout's .venv (the ones the tests ran with). They land in .whl/ (git-ignored);
# carry that folder to the GPU machine, where run.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/../.."
names="flask werkzeug gunicorn httptools flask-cors azureml-contrib-services inference-schema prometheus-client
nvidia-ml-py blinker itsdangerous click jinja2 markupsafe python-dateutil pytz wrapt six packaging"
pins=$(.venv/bin/python -m pip freeze 2>/dev/null || true)
specs=()
for name in $names; do
  pin=$(printf '%s\n' "$pins" | grep -i -E "^${name//-/[-_.]}==" | head -1 || true)
  specs+=("${pin:-$name}")
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${specs[@]}"
ls .whl
