#!/usr/bin/env bash
# Run visualize_patches.py from any directory, with an interpreter that has its dependencies:
#   1. the current python3, if the dependencies are importable;
#   2. else the conda env "apt", when conda has one (via `conda run`: `conda activate`
#      does not work inside a script);
#   3. else a local virtual environment .venv next to this script, created on first use.
# All arguments are forwarded; the exit code is the tool's.  No arguments: the sample photo.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
tool="$here/visualize_patches.py"
python="${PYTHON:-python3}"
modules="torch numpy matplotlib PIL cv2 loguru tqdm"
# find_spec only locates the modules: importing torch here would double the start-up time
has_deps() {
    "$1" -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
        $modules 2>/dev/null
}
if command -v "$python" >/dev/null 2>&1 && has_deps "$python"; then
    exec "$python" "$tool" "$@"
fi
if command -v conda >/dev/null 2>&1 && conda env list 2>/dev/null | grep -qE '^apt[[:space:]]'; then
    exec conda run --no-capture-output -n apt python "$tool" "$@"
fi
if ! has_deps "$here/.venv/bin/python"; then
    "$here/scripts/bootstrap_venv.sh" "$here/.venv" "$here/requirements.txt" >&2
fi
exec "$here/.venv/bin/python" "$tool" "$@"
