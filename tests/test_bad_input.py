"""Bad input: one clear line naming the problem, non-zero exit, no traceback, nothing written,
the input untouched."""

import hashlib
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import PEARL, files_under, run_cli


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds almost no data."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def corrupt_png(tmp_path):
    path = tmp_path / "corrupt.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    for k in range(200, 400):
        data[k] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


def make(tmp_path, kind):
    if kind == "missing":
        return tmp_path / "nope.jpg"
    if kind == "empty dir":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if kind == "zero bytes":
        (tmp_path / "zero.jpg").write_bytes(b"")
        return tmp_path / "zero.jpg"
    if kind == "truncated jpeg":
        data = PEARL.read_bytes()
        (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 3])
        return tmp_path / "cut.jpg"
    if kind == "corrupt png":
        return corrupt_png(tmp_path)
    if kind == "text as jpg":
        (tmp_path / "notes.jpg").write_text("this is not an image\n")
        return tmp_path / "notes.jpg"
    if kind == "decompression bomb":
        (tmp_path / "bomb.png").write_bytes(png_header_only(20000, 20000))
        return tmp_path / "bomb.png"
    if kind == "aspect ratio":
        Image.new("RGB", (300, 1), (9, 9, 9)).save(tmp_path / "thin.png")
        return tmp_path / "thin.png"
    raise ValueError(kind)


CASES = {
    "missing": "no such file",
    "empty dir": "no images",
    "zero bytes": "empty",
    "truncated jpeg": "cannot decode",
    "corrupt png": "cannot decode",
    "text as jpg": "not an image",
    "decompression bomb": "decompression bomb",
    "aspect ratio": "aspect ratio",
}


def fingerprint(path):
    if not path.exists():
        return None
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*"))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_clean_failure(proc, out, expect_code=1):
    assert proc.returncode == expect_code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_under(out) == []


@pytest.mark.parametrize("kind", list(CASES))
def test_bad_image_input(tmp_path, kind):
    path = make(tmp_path, kind)
    before = fingerprint(path)
    out = tmp_path / "out"
    proc = run_cli(path, "-o", out)
    assert_clean_failure(proc, out)
    assert CASES[kind] in proc.stderr.lower()
    assert path.name in proc.stderr  # the path is named
    assert fingerprint(path) == before


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--patch-size", "abc"], "--patch-size"),
        (["--patch-size", "0"], "positive integer"),
        (["--merge-size", "-2"], "positive integer"),
        (["--max-pixels", "1.5"], "positive integer"),
        (["--min-pixels", "5000", "--max-pixels", "4000"], "--min-pixels"),
        (["--thresholds", "two"], "expected a number"),
        (["--thresholds", "nan"], "finite"),
        (["--device", "tpu"], "invalid choice"),
    ],
)
def test_bad_arguments_are_usage_errors(tmp_path, args, needle):
    out = tmp_path / "out"
    proc = run_cli(PEARL, "-o", out, *args)
    assert_clean_failure(proc, out, expect_code=2)
    assert needle in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path):
    out = tmp_path / "out"
    proc = run_cli(PEARL, "-o", out, "--device", "cuda")
    assert_clean_failure(proc, out, expect_code=2)
    assert "CUDA is not available" in proc.stderr


def test_output_path_is_a_file(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    proc = run_cli(PEARL, "-o", blocker / "sub")
    assert proc.returncode == 1 and "not a directory" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert blocker.read_text() == "keep me"


def test_unwritable_output_directory(tmp_path):
    target = "/sys/visualize_patches_out"  # not writable, even by root
    proc = run_cli(PEARL, "-o", target)
    assert proc.returncode == 1 and "not writable" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    proc = run_cli(PEARL, "-o", ro / "out")
    assert proc.returncode == 1 and "not writable" in proc.stderr


def test_refuses_to_overwrite_its_input(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = out / "resized_image.jpg"
    victim.write_bytes(PEARL.read_bytes())
    before = fingerprint(victim)
    proc = run_cli(victim, "-o", out)
    assert proc.returncode == 1 and "is one of the outputs" in proc.stderr
    assert fingerprint(victim) == before
    assert [p.name for p in out.iterdir()] == ["resized_image.jpg"]
