"""`pip install .`: the wheel holds the core, the apt_vis package with its pages and sample photo, and a
`visualize-patches` command equal to `python visualize_patches.py`; nothing is downloaded.

The wheel is built from a copy of the files it is made of (so the build leaves nothing in the clone) and
installed into a fresh virtual environment whose only link to this one is a .pth file: numpy, torch, pip
and setuptools come from here, the tool only from the wheel.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import PEARL, ROOT, TOOL

import visualize_patches as vp

# What the wheel is built from: everything pyproject.toml names.
SOURCES = ("pyproject.toml", "README.md", "visualize_patches.py", "apt_vis")


def _run(*args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _copy_sources(target: Path) -> Path:
    target.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, target / name)
    return target


def _fresh_venv(path: Path) -> Path:
    """A virtual environment without pip of its own; this environment's packages reached through a .pth."""
    proc = _run(sys.executable, "-m", "venv", "--without-pip", path, cwd=path.parent)
    assert proc.returncode == 0, proc.stderr
    python = path / "bin" / "python"
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=path)
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (Path(purelib.stdout.strip()) / "borrowed.pth").write_text("".join(f"{p}\n" for p in ours))
    return python


def _pip(python: Path, *args, cwd) -> subprocess.CompletedProcess:
    return _run(python, "-m", "pip", "--disable-pip-version-check", "--no-input", *args,
                "--no-index", "--no-deps", "--no-build-isolation", cwd=cwd)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    src = _copy_sources(work / "src")
    proc = _run(sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--no-deps",
                "--no-build-isolation", "--no-index", "-w", work / "dist", src, cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (found,) = (work / "dist").glob("*.whl")
    return found


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The fresh environment's bin/ folder, the wheel installed into it."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    python = _fresh_venv(venv)
    proc = _pip(python, "install", wheel, cwd=venv.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return venv / "bin"


def _fake_missing_torch(folder: Path) -> dict:
    """Environment variables under which `import torch` fails as it does where torch is not installed."""
    folder.mkdir()
    (folder / "torch.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\", name='torch')\n")
    return {"PYTHONPATH": str(folder)}


def test_wheel_holds_the_core_the_package_and_its_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert wheel.name.startswith(f"visualize_patches-{vp.__version__}-")
    assert "visualize_patches.py" in names
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "apt_vis").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert {"apt_vis/pages.py", "apt_vis/static/explorer.html", "apt_vis/data/pearl_earring.jpg",
            "apt_vis/data/README.md"} <= shipped
    assert shipped <= names, shipped - names  # every module, page template and data file of apt_vis
    assert not any(n.startswith(("tests/", "docs/", "benchmarks/", "scripts/")) for n in names)


def test_wheel_requires_what_requirements_txt_lists_torch_as_an_extra(wheel):
    """A plain `pip install .` never pulls torch (a CUDA build can be several GB); [torch] does."""
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        text = z.read(meta).decode()
    requires = re.findall(r"^Requires-Dist: (.+)$", text, re.M)
    plain = {r.replace(" ", "") for r in requires if "extra ==" not in r}
    torch_extra = {r.split(";")[0].replace(" ", "") for r in requires if "extra == \"torch\"" in r}
    listed = {line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()}
    listed.discard("")
    assert torch_extra == {r for r in listed if r.startswith("torch")}
    assert plain == {r for r in listed if not r.startswith("torch")}
    assert "Provides-Extra: torch" in text
    entry_points = zipfile.ZipFile(wheel).read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert re.search(r"^visualize-patches = apt_vis\.cli:main$", entry_points, re.M)


def test_command_on_the_path_from_another_directory(installed, tmp_path):
    proc = _run(installed / "visualize-patches", "--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["visualize-patches", vp.__version__]

    # no argument: the sample photo from the installed package, every output (the pages read apt_vis/static)
    proc = _run(installed / "visualize-patches", "-q", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = tmp_path / "visualizations"
    stats = json.loads((out / "stats.json").read_text())
    assert Path(stats["image"]).is_relative_to(installed.parent)
    assert stats["apt_patches"] < 0.8 * stats["uniform_patches"]
    assert "<canvas" in (out / "explorer.html").read_text()

    # bad usage and a bad input: the same exit codes as the script
    assert _run(installed / "visualize-patches", "--patch-size", "0", cwd=tmp_path).returncode == 2
    proc = _run(installed / "visualize-patches", "missing.jpg", cwd=tmp_path)
    assert proc.returncode == 1 and "no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_import_from_another_directory(installed, tmp_path):
    code = "import visualize_patches, apt_vis.pages; print(visualize_patches.__file__); print(apt_vis.pages.STATIC)"
    proc = _run(installed / "python", "-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    core, static = map(Path, proc.stdout.split())
    assert core.is_relative_to(installed.parent) and static.is_relative_to(installed.parent)
    assert (static / "explorer.html").is_file()


def test_without_torch_images_run_and_torch_uses_say_so_in_one_line(installed, tmp_path):
    """Torch is an extra: without it images on the CPU are analysed (the command and the script);
    --device cuda (exit 2) and a video (exit 1) say in one line that they need torch."""
    env = _fake_missing_torch(tmp_path / "no_torch")
    for k, command in enumerate(([installed / "visualize-patches"], [sys.executable, TOOL])):
        proc = _run(*command, PEARL, "-o", tmp_path / f"out{k}", "-q", cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        assert (tmp_path / f"out{k}" / "stats.json").is_file()
        proc = _run(*command, PEARL, "-o", tmp_path / f"cuda{k}", "--device", "cuda", cwd=tmp_path, env=env)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
        assert "--device cuda needs torch" in proc.stderr and "pip install" in proc.stderr
    proc = _run(sys.executable, TOOL, ROOT / "tests" / "golden" / "clip.mp4", "-o", tmp_path / "video", "-q", cwd=tmp_path, env=env)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "video needs torch, which is not installed" in proc.stderr and "pip install" in proc.stderr
    assert not list((tmp_path / "video").rglob("stats.json"))


def test_editable_install(tmp_path):
    """`pip install -e .`: the command runs the clone's files, so an edit shows without reinstalling."""
    src = _copy_sources(tmp_path / "src")
    python = _fresh_venv(tmp_path / "venv")
    proc = _pip(python, "install", "-e", src, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    code = "import visualize_patches as vp; print(vp.__file__); print(vp.sample_image_path().is_file())"
    proc = _run(python, "-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(src / "visualize_patches.py"), "True"]
    proc = _run(tmp_path / "venv" / "bin" / "visualize-patches", "--version", cwd=tmp_path)
    assert proc.returncode == 0 and vp.__version__ in proc.stdout, proc.stderr
