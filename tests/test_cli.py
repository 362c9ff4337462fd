"""The command line end to end: first run with no arguments, logging, the wrapper script, import."""

import json
import os
import subprocess
import sys

from conftest import PEARL, ROOT, files_under, run_cli

import visualize_patches as vp


def test_version():
    proc = run_cli("--version")
    assert proc.returncode == 0 and vp.__version__ in proc.stdout


def test_help_lists_every_option():
    proc = run_cli("--help")
    assert proc.returncode == 0
    for flag in ("-o", "--patch-size", "--temporal-patch-size", "--merge-size", "--thresholds", "--device",
                 "--min-pixels", "--max-pixels", "-q", "-v", "--version"):
        assert flag in proc.stdout


def test_no_arguments_runs_on_sample_photo(tmp_path):
    """A newcomer's first run shows APT at work: the defaults merge the sample photo visibly."""
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "visualizations"
    stats = json.loads((out / "stats.json").read_text())
    assert stats["image"].endswith("pearl_earring.jpg")
    assert stats["original_size"] == [826, 970]
    assert "pearl_earring.jpg" in proc.stderr and "wrote" in proc.stderr
    assert stats["thresholds"] == [3.0, 2.0]
    assert stats["apt_patches"] < 0.8 * stats["uniform_patches"]
    assert stats["patches_per_scale"]["28"] > 0 and stats["patches_per_scale"]["56"] > 0
    assert "no patch merged" not in proc.stderr


def test_sample_photo_ships_inside_the_package():
    """Found after `pip install` too (no matplotlib sample data), small, with its provenance beside it."""
    path = vp.sample_image_path()
    assert path.parent == ROOT / "apt_vis" / "data" and path.is_file()
    assert path.stat().st_size <= 300 * 1024
    notes = (path.parent / "README.md").read_text()
    assert path.name in notes and "public domain" in notes.lower()


def test_quiet_prints_nothing_on_success(tmp_path):
    proc = run_cli(PEARL, "-o", tmp_path / "o", "-q")
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == ""


def test_progress_and_summary_logged(pearl_run):
    out, proc = pearl_run
    assert "840x980" in proc.stderr
    assert "APT patches" in proc.stderr and str(out) in proc.stderr
    assert proc.stdout == ""


def test_rerun_replaces_outputs(tmp_path):
    out = tmp_path / "o"
    assert run_cli(PEARL, "-o", out, "-q").returncode == 0
    first = json.loads((out / "stats.json").read_text())
    assert run_cli(PEARL, "-o", out, "-q", "--thresholds", "6", "5").returncode == 0
    second = json.loads((out / "stats.json").read_text())
    assert second["thresholds"] == [6.0, 5.0] and second["apt_patches"] < first["apt_patches"]


def test_thresholds_set_number_of_scales(tmp_path):
    out = tmp_path / "o"
    assert run_cli(PEARL, "-o", out, "-q", "--thresholds", "4").returncode == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["patch_sizes"] == [14, 28]
    assert {p.name for p in out.glob("importance_map_scale_*.png")} == {
        "importance_map_scale_14.png", "importance_map_scale_28.png"}
    assert run_cli(PEARL, "-o", tmp_path / "o4", "-q", "--thresholds", "4", "3", "2").returncode == 0
    assert (tmp_path / "o4" / "importance_map_scale_112.png").exists()


def test_import_has_no_side_effects(tmp_path):
    code = "import visualize_patches, loguru; print(len(loguru.logger._core.handlers))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.strip() == "1"  # loguru's default handler, untouched
    assert files_under(tmp_path) == []


def test_wrapper_script_from_another_directory(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    wrapper = ROOT / "run_visualize.sh"
    proc = subprocess.run([str(wrapper), str(PEARL), "-o", "w", "-q"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "w" / "stats.json").exists()
    proc = subprocess.run([str(wrapper), str(tmp_path / "missing.jpg")], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no such file" in proc.stderr
    proc = subprocess.run([str(wrapper), "--patch-size", "0"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 2


def test_wrapper_script_without_arguments_uses_sample(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "run_visualize.sh"), "-q"], cwd=tmp_path, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "visualizations" / "stats.json").read_text())["image"].endswith(
        "pearl_earring.jpg")


def test_wrapper_uses_conda_env_when_the_interpreter_lacks_dependencies(tmp_path):
    """Without the dependencies in $PYTHON, the wrapper goes through `conda run -n apt`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "conda.log"
    conda = bin_dir / "conda"
    conda.write_text(f"""#!/bin/sh
echo "$@" >> {log}
if [ "$1" = env ] && [ "$2" = list ]; then echo "apt   /opt/conda/envs/apt"; exit 0; fi
if [ "$1" = run ]; then shift 5; exec {sys.executable} "$@"; fi
exit 3
""")
    conda.chmod(0o755)
    bare = bin_dir / "bare-python"  # an interpreter that finds none of the dependencies
    bare.write_text("#!/bin/sh\nexit 1\n")
    bare.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bare)}
    proc = subprocess.run([str(ROOT / "run_visualize.sh"), str(PEARL), "-o", "c", "-q"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "env list" and calls[1].startswith("run --no-capture-output -n apt python ")
    assert (tmp_path / "c" / "stats.json").exists()
