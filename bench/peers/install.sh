#!/usr/bin/env bash
# The peer servers of `scorehost bench --servers ...` and bench/batching_table.py, each in its own virtualenv
# under DIR (default $SCOREHOST_PEERS_DIR or ~/.cache/scorehost-peers): DIR/NAME/bin/python. Not scorehost's
# dependencies.
#   bash bench/peers/install.sh [DIR] [NAME ...]     NAME: torchserve litserve mlserver bentoml rayserve
# TorchServe also needs Java 17 (apt-get install openjdk-17-jre-headless) and a CPU build of torch (its Python
# worker imports torch even for a handler that does not use it).
set -euo pipefail
dir=${1:-${SCOREHOST_PEERS_DIR:-$HOME/.cache/scorehost-peers}}
shift || true
names=${*:-torchserve litserve mlserver bentoml rayserve}
declare -A packages=(
  [torchserve]="torchserve torch-model-archiver torch==2.13.0+cpu pyyaml"
  [litserve]="litserve"
  [mlserver]="mlserver"
  [bentoml]="bentoml"
  [rayserve]="ray[serve]"
)
mkdir -p "$dir"
for name in $names; do
  python3.11 -m venv "$dir/$name"
  "$dir/$name/bin/pip" install -q ${packages[$name]} pillow numpy && echo "$name: $dir/$name/bin/python"
done
