#!/usr/bin/env bash
# The whole test suite on a fresh machine, set-up included:
#   creates .venv (runtime + test dependencies) at the repository root, then runs pytest.
# As root with apt-get and no Chromium, it also installs Debian's chromium so that the
# browser tests run; elsewhere those tests skip (set APT_VIS_NO_BROWSER_INSTALL=1 to opt out).
# Extra arguments go to pytest, e.g. tests/run.sh -k entropy
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/bootstrap_venv.sh" "$root/.venv" "$root/requirements.txt" "$root/requirements-dev.txt"
if [ -z "${APT_VIS_NO_BROWSER_INSTALL:-}" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && ! command -v chromium >/dev/null; then
    echo "tests/run.sh: installing Debian's chromium for the browser tests" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "tests/run.sh: chromium install failed; browser tests will skip" >&2
fi
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
