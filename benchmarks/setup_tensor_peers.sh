#!/usr/bin/env bash
# Builds the tensor-serving peers that benchmarks/predict.py measures fleetserve against, each
# in its own venv under the git-ignored .peers/ (nothing outside it is written):
#
#   .peers/litserve/   LitServe 0.2.19 + transformers 5.24.0 on torch 2.13.0 (CPU)
#   .peers/rayserve/   Ray Serve 2.60.0 + transformers 5.24.0 on torch 2.13.0 (CPU)
#
# torch goes first and alone, so that no resolver can pull a CUDA build of it later.
# Rerunning keeps a finished venv; delete its folder to rebuild it.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=$PWD/.peers
PYTHON=${PYTHON:-python3}
mkdir -p "$PEERS/cache"
export PIP_CACHE_DIR=$PEERS/cache/pip

build() {
    local venv=$1
    shift
    if [ -f "$venv/.installed" ]; then
        return
    fi
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet torch==2.13.0
    "$venv/bin/python" -m pip install --quiet transformers==5.24.0 "$@"
    touch "$venv/.installed"
}

build "$PEERS/litserve" litserve==0.2.19
build "$PEERS/rayserve" "ray[serve]==2.60.0"
