#!/usr/bin/env bash
# Create (once) a virtual environment and install requirement files into it.
# usage: scripts/bootstrap_venv.sh VENV_DIR REQUIREMENTS_FILE...
set -euo pipefail
venv="$1"; shift
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "bootstrap: creating virtual environment $venv" >&2
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check --quiet)
# Install torch on its own first, pinned: unpinned, pip would pick the newest
# release, which on some machines is a multi-GB CUDA build.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "bootstrap: installing torch==2.13.0" >&2
    "${pip[@]}" install "torch==2.13.0"
fi
args=()
for req in "$@"; do args+=(-r "$req"); done
"${pip[@]}" install "${args[@]}"
