"""The core and its package apt_vis: found from any directory, one line when it is missing, and one module
object for the core whether it runs as a script or is imported."""

import os
import shutil
import subprocess
import sys

import numpy as np

from conftest import ROOT, files_under, random_photo_like

SCRIPT = ROOT / "visualize_patches.py"


def run_copy(folder, *args, cwd):
    """Run folder/visualize_patches.py as a script, with nothing of the repository on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(folder / "visualize_patches.py"), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]


def test_without_the_package_one_line_and_the_core_still_runs(tmp_path, write_image):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(SCRIPT, alone)
    photo = write_image("photo.png", random_photo_like(np.random.default_rng(0), 64, 96))
    proc = run_copy(alone, photo, "-o", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert error_lines(proc) == [
        "ERROR   apt_vis.pages not found: visualize_patches.py needs the apt_vis package next to it "
        "(No module named 'apt_vis')"]
    assert files_under(tmp_path / "out") == []
    proc = run_copy(alone, photo, "-o", tmp_path / "stats", "--stats-only", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "stats" / "stats.json").is_file()


def test_an_extensions_tool_error_is_one_line_when_the_core_runs_as_a_script(tmp_path, write_image):
    # python visualize_patches.py runs the core as __main__; apt_vis does `import visualize_patches`. Were
    # that a second copy of the core, its ToolError would be another class, which main() does not catch.
    copy = tmp_path / "tool"
    copy.mkdir()
    shutil.copy(SCRIPT, copy)
    shutil.copytree(ROOT / "apt_vis", copy / "apt_vis", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "apt_vis" / "static" / "explorer.css").unlink()
    photo = write_image("photo.png", random_photo_like(np.random.default_rng(0), 64, 96))
    proc = run_copy(copy, photo, "-o", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert error_lines(proc) == [
        f"ERROR   cannot read the page template {copy / 'apt_vis' / 'static' / 'explorer.css'}: "
        "No such file or directory"]
    assert files_under(tmp_path / "out") == []

