"""Shared fixtures: real photos, a CLI runner, and one full run reused by the output tests."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visualize_patches as vp

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "visualize_patches.py"
DATA = Path(__file__).resolve().parent / "data"
PEARL = DATA / "pearl_earring.jpg"  # 826 x 970 real photo, see tests/data/README.md


def sample_photo() -> Path:
    """A second real photo, unlike PEARL: matplotlib's grace_hopper.jpg (512 x 600; fine texture and
    JPEG noise everywhere, so nothing merges at the default thresholds). The tool's own sample photo,
    vp.sample_image_path(), is a copy of PEARL."""
    from matplotlib import cbook

    return Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def run_cli(*args, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """Run the tool in a fresh interpreter, as a user would."""
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)],
        cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


def finished_inputs(out: Path) -> int:
    """stats.json files in place under out, for polling a run while it writes: its staging folders
    (hidden) are skipped, and os.walk passes over folders that vanish as they are renamed."""
    count = 0
    for folder, subfolders, files in os.walk(out):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        count += "stats.json" in files
    return count


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


def random_photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8: smooth gradients plus noise, so entropy varies across patches."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 3 + y) % 256, (y * 2) % 256, (x + y * 5) % 256], axis=-1).astype(np.float64)
    noise = rng.normal(0, rng.uniform(0, 40), size=(height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def pearl_run(tmp_path_factory):
    """One full CLI run on the real photo: (output dir, completed process)."""
    out = tmp_path_factory.mktemp("pearl_out")
    proc = run_cli(PEARL, "-o", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.fixture
def write_image(tmp_path):
    """Save an array or PIL image under tmp_path and return the path."""

    def _write(name, image, **save_kwargs):
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        path = tmp_path / name
        image.save(path, **save_kwargs)
        return path

    return _write


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium (Debian's package), started by the tests; skipped where none is installed."""
    from browser import Chromium, find_chromium

    executable = find_chromium()
    if executable is None:
        pytest.skip("no Chromium installed (tests/run.sh installs Debian's chromium when run as root)")
    chromium = Chromium(executable)
    yield chromium
    chromium.close()
