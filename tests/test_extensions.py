"""The core and its package apt_vis: found from any directory, one line when it is missing, and one module
object for the core whether it runs as a script or is imported."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from conftest import PEARL, ROOT, files_under, random_photo_like

SCRIPT = ROOT / "visualize_patches.py"


def run_copy(folder, *args, cwd):
    """Run folder/visualize_patches.py as a script, with nothing of the repository on the path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(folder / "visualize_patches.py"), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]


def test_the_core_alone_analyses_a_photo_and_says_what_needs_the_package(tmp_path):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(SCRIPT, alone)
    photo = tmp_path / "photo.jpg"
    shutil.copy(PEARL, photo)  # the sample photo, which ships inside apt_vis
    proc = run_copy(alone, photo, "-o", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = {p.name for p in files_under(tmp_path / "out")}
    assert written == {"importance_map_scale_14.png", "importance_map_scale_28.png", "importance_map_scale_56.png",
                       "patches_visualization.jpg", "original_image.jpg",
                       "resized_image.jpg", "stats.json", "importance_maps.npz"}
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["patches_per_scale"] == {"14": 2876, "28": 275, "56": 14}  # the authors' figures
    for extra in (["--sweep"], ["--target-ratio", "0.5"], []):
        what = tmp_path / "clip.mp4" if not extra else photo
        if not extra:
            shutil.copy(ROOT / "tests" / "golden" / "clip.mp4", what)
        proc = run_copy(alone, what, "-o", tmp_path / f"out{len(extra)}", *extra, cwd=tmp_path)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert error_lines(proc) == [proc.stderr.strip()] and "needs the apt_vis package" in proc.stderr
        assert files_under(tmp_path / f"out{len(extra)}") == []


def test_importing_the_core_loads_no_optional_library():
    code = ("import sys, visualize_patches; print(sorted(m for m in "
            "('cv2', 'matplotlib', 'tqdm', 'transformers', 'torch', 'apt_vis') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr + proc.stdout


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



def test_the_core_alone_says_what_needs_the_package_for_torch_and_processor_options(tmp_path):
    """upsample_mse and --processor live in apt_vis: without it, one line naming the package, no
    output; the lazy names (analyze, PatchTokenizer) are then simply absent, not an error."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(SCRIPT, alone)
    photo = tmp_path / "photo.jpg"
    shutil.copy(PEARL, photo)
    for k, extra in enumerate((["--method", "upsample_mse", "--thresholds", "0.01", "0.005"],
                               ["--processor", tmp_path / "preprocessor_config.json"])):
        (tmp_path / "preprocessor_config.json").write_text("{}")
        proc = run_copy(alone, photo, "-o", tmp_path / f"out{k}", *extra, cwd=tmp_path)
        assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "needs the apt_vis package" in proc.stderr
        assert files_under(tmp_path / f"out{k}") == []
    code = "import visualize_patches as vp; print(hasattr(vp, 'analyze'), 'analyze' in dir(vp))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=alone, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.stdout.split() == ["False", "False"], proc.stderr


def test_device_auto_without_the_package_stays_on_the_cpu(monkeypatch):
    """The CUDA path lives in apt_vis: a copied core on a GPU machine analyses on the CPU by
    default instead of failing; --device cuda says what it needs."""
    import visualize_patches as vp
    from apt_vis import machine, torch_backend

    def missing(name):
        raise vp.ToolError(f"apt_vis.{name} not found: visualize_patches.py needs the apt_vis package next to it")

    monkeypatch.setattr(vp, "has_extensions", lambda: False)
    monkeypatch.setattr(vp, "extension", missing)
    for module in (machine, torch_backend):  # a GPU machine, as far as the tool can tell
        monkeypatch.setattr(module, "nvidia_gpu_visible", lambda: True)
    monkeypatch.setattr(torch_backend, "cuda_available", lambda: True)
    assert vp.parse_args([str(PEARL)])[3].device == "cpu"
    try:
        vp.parse_args([str(PEARL), "--device", "cuda"], raise_errors=True)
    except ValueError as exc:
        assert "needs the apt_vis package" in str(exc)
    else:
        raise AssertionError("--device cuda without apt_vis was accepted")
