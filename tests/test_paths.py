"""Where the tool writes: never onto an input, never outside -o."""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visualize_patches as vp


def tiny_png(path: Path, seed: int) -> Path:
    """A 64 x 64 noise PNG (content matters only as far as being an image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, format="PNG")
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: files by content hash, links by target, folders by name."""
    entries = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_symlink():
            entries[key] = "-> " + os.readlink(path)
        elif path.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


def refused(capsys, *args) -> str:
    """Run main in this process (refusals happen before any image is read) and return its one
    stderr line, checking exit status 1."""
    capsys.readouterr()
    code = vp.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- outputs never land on an input --------------------------------------------------------------


def test_batch_summary_never_replaces_an_input(tmp_path, capsys):
    """The reported case: per-input folders collide with the inputs, then summary.png replaced one."""
    d = tmp_path / "d"
    tiny_png(d / "summary.png", 1)
    tiny_png(d / "x.png", 2)
    before = snapshot(d)
    assert "summary.png" in refused(capsys, d / "summary.png", d / "x.png", "-o", d, "--stats-only")
    assert snapshot(d) == before  # inputs byte-identical, nothing written


@pytest.mark.parametrize("name, extra", [("summary.csv", ()), ("report.html", ()),
                                         ("threshold_sweep.png", ("--sweep",))])
def test_input_named_like_a_batch_file_in_the_output(tmp_path, capsys, name, extra):
    """d/<name> is an input (a PNG by content) whose own folder goes to d/d/<name>; the batch file
    d/<name> would still replace it."""
    d, e = tmp_path / "d", tmp_path / "e"
    tiny_png(d / name, 1)
    tiny_png(e / "x.png", 2)
    before = snapshot(tmp_path)
    assert name in refused(capsys, d / name, e / "x.png", "-o", d, "--stats-only", *extra)
    assert snapshot(tmp_path) == before


def test_input_inside_a_per_input_folder(tmp_path, capsys, monkeypatch):
    """out/x.png/original_image.jpg is an input, and out/x.png/ is where x.png's outputs go."""
    tiny_png(tmp_path / "x.png", 1)
    victim = tiny_png(tmp_path / "out" / "x.png" / "original_image.jpg", 2)
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert "original_image.jpg" in refused(capsys, "x.png", victim.relative_to(tmp_path), "-o", "out")
    assert snapshot(tmp_path) == before


def test_link_in_the_output_cannot_lead_outside(tmp_path, capsys):
    """A link left in the output folder must not carry the outputs elsewhere."""
    tiny_png(tmp_path / "in" / "a.png", 1)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").symlink_to(tmp_path / "elsewhere")
    assert "outside" in refused(capsys, tmp_path / "in", "-o", tmp_path / "out", "--stats-only")
    assert list((tmp_path / "elsewhere").iterdir()) == []
