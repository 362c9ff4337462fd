"""The `visualize-patches` command that `pip install` puts on the PATH: `python visualize_patches.py`,
installed. It runs the core's `if __name__ == "__main__"` block (the start-up: stop signals as one
line, one OpenBLAS thread, loguru without its default handler, then cli()) from the core's cached
bytecode, so the command compiles nothing and the two cannot drift apart."""

from __future__ import annotations

import runpy


def main() -> None:
    runpy.run_module("visualize_patches", run_name="__main__")
