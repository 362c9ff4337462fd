"""The `visualize-patches` command that `pip install` puts on the PATH: `python visualize_patches.py`, installed."""

from __future__ import annotations

import os
import signal
import sys

# Dependencies that `pip install .` leaves to the user, with what to run (the others come with the package).
INSTALL_HINTS = {
    "torch": "pip install torch (CPU only: pip install torch --index-url https://download.pytorch.org/whl/cpu); "
             "see the README's Set-up",
}


def _stop_during_start_up(signum, frame):
    sys.stderr.write(f"ERROR   interrupted ({signal.Signals(signum).name}) during start-up\n")
    os._exit(128 + signum)


def main() -> None:
    # as the script does until cli() installs its own handlers: a stop signal while torch imports
    # (over a second) ends the run with one line instead of a traceback
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop_during_start_up)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the script does: see visualize_patches.py
    autoinit = os.environ.get("LOGURU_AUTOINIT")
    os.environ["LOGURU_AUTOINIT"] = "False"  # as the script does: cli() adds the one handler
    try:
        import visualize_patches
    except ModuleNotFoundError as exc:
        if exc.name not in INSTALL_HINTS:
            raise
        sys.stderr.write(f"ERROR   {exc.name} is not installed: {INSTALL_HINTS[exc.name]}\n")
        sys.exit(1)
    finally:
        if autoinit is None:
            del os.environ["LOGURU_AUTOINIT"]
        else:
            os.environ["LOGURU_AUTOINIT"] = autoinit
    sys.exit(visualize_patches.cli())
