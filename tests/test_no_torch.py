"""A CPU run never imports torch (issue 10): not the single-image run, not batch workers; --device
auto imports it only when an NVIDIA GPU is visible to the process."""

import os
from pathlib import Path

import pytest
from PIL import Image

import visualize_patches as vp
from apt_vis import machine
from conftest import PEARL, run_cli

# Loaded by every interpreter the tool starts (the main process, the forkserver and its workers):
# any import of torch writes the importing process's id to $TORCH_IMPORTS/<pid>.
HOOK = '''
import os, sys

class _ReportTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            folder = os.environ["TORCH_IMPORTS"]
            with open(os.path.join(folder, str(os.getpid())), "w") as f:
                f.write(" ".join(sys.argv))
        return None

sys.meta_path.insert(0, _ReportTorch())
'''


@pytest.fixture
def watched(tmp_path) -> tuple[dict, Path]:
    """An environment whose interpreters report torch imports into the returned folder."""
    hook, reports = tmp_path / "hook", tmp_path / "torch_imports"
    hook.mkdir()
    reports.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK)
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "TORCH_IMPORTS": str(reports)}, reports


def test_the_watch_sees_a_torch_import(watched):
    """The watch itself works: a process that imports torch is reported."""
    env, reports = watched
    run_cli("--help", env=env)  # the hook is loaded by the tool's interpreter without changing it
    assert not list(reports.iterdir())
    import subprocess
    import sys
    subprocess.run([sys.executable, "-c", "import torch"], env={**os.environ, **env}, check=True)
    assert len(list(reports.iterdir())) == 1


def test_single_image_every_output_imports_no_torch(watched, tmp_path):
    env, reports = watched
    out = tmp_path / "out"
    proc = run_cli(PEARL, "-o", out, "-q", env=env)  # --device auto, the default
    assert proc.returncode == 0, proc.stderr
    assert (out / "stats.json").is_file() and list(out.glob("*.png"))
    assert [p.read_text() for p in reports.iterdir()] == []


def test_batch_with_two_workers_imports_no_torch(watched, tmp_path):
    env, reports = watched
    folder = tmp_path / "in"
    folder.mkdir()
    with Image.open(PEARL) as photo:
        for k, size in enumerate(((300, 260), (420, 380), (260, 300))):
            photo.resize(size).save(folder / f"p{k}.jpg")
    out = tmp_path / "out"
    proc = run_cli(folder, "-o", out, "-q", "--workers", "2", "--device", "cpu", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (out / "summary.csv").is_file()
    assert [p.read_text() for p in reports.iterdir()] == []


@pytest.mark.parametrize("visible, driver, expected", [
    (None, True, True), ("0", True, True), ("", True, False), ("-1", True, False), ("0", False, False),
])
def test_auto_looks_for_a_gpu_before_importing_torch(monkeypatch, visible, driver, expected):
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(machine.os.path, "exists", lambda p: driver and p == "/proc/driver/nvidia")
    monkeypatch.setattr(machine.Path, "glob", lambda self, pattern: iter(()))
    assert machine.nvidia_gpu_visible() is expected


def test_default_cpu_run_does_not_load_the_torch_module():
    """Without a visible GPU, --device auto decides from the machine probe alone: it does not even
    import apt_vis/torch_backend.py (3.7 ms of every run), let alone torch."""
    import subprocess
    import sys

    code = ("import sys, visualize_patches as vp; vp.parse_args([sys.argv[1]]); "
            "print(sorted(m for m in ('apt_vis.torch_backend', 'torch') if m in sys.modules))")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU visible, whatever this machine has
    proc = subprocess.run([sys.executable, "-c", code, str(PEARL)], capture_output=True, text=True, env=env,
                          cwd=Path(vp.__file__).parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
