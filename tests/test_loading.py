"""Image loading: EXIF orientation and every PIL mode, against transformers' own conversion."""

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb

import visualize_patches as vp
from conftest import PEARL, random_photo_like


def reference(path):
    """transformers: load_image's exif_transpose, then the processor's convert_to_rgb."""
    with Image.open(path) as image:
        return hf_convert_to_rgb(ImageOps.exif_transpose(image), return_numpy=True)


def photo(size=(40, 60)):
    return random_photo_like(np.random.default_rng(7), *size)


@pytest.mark.parametrize(
    "name,make",
    [
        ("gray.png", lambda: Image.fromarray(photo()).convert("L")),
        ("gray_alpha.png", lambda: Image.fromarray(photo()).convert("LA")),
        ("palette.png", lambda: Image.fromarray(photo()).convert("P")),
        ("palette.gif", lambda: Image.fromarray(photo()).convert("P")),
        ("rgba.png", lambda: Image.fromarray(np.dstack([photo(), np.linspace(0, 255, 60, dtype=np.uint8)[None, :]
                                                        .repeat(40, 0)]))),
        ("cmyk.jpg", lambda: Image.fromarray(photo()).convert("CMYK")),
        ("bilevel.png", lambda: Image.fromarray(photo()).convert("1")),
        ("rgb.webp", lambda: Image.fromarray(photo())),
        ("rgb.bmp", lambda: Image.fromarray(photo())),
        ("rgb.tiff", lambda: Image.fromarray(photo())),
    ],
)
def test_modes_match_transformers(write_image, name, make):
    path = write_image(name, make())
    got = np.asarray(vp.load_image(path))
    np.testing.assert_array_equal(got, reference(path))


def test_palette_with_transparency_composited_on_white(tmp_path):
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    image.putpixel((1, 1), 1)
    path = tmp_path / "transparent.png"
    image.save(path, transparency=0)
    got = np.asarray(vp.load_image(path))
    np.testing.assert_array_equal(got, reference(path))
    assert tuple(got[0, 0]) == (255, 255, 255) and tuple(got[1, 1]) == (200, 100, 50)


def test_sixteen_bit_png_loads_like_transformers(tmp_path):
    values = (np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) * 40).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(vp.load_image(path)), reference(path))


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((20, 30, 3), v, dtype=np.uint8)) for v in (10, 200, 90)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    got = np.asarray(vp.load_image(path))
    assert got.shape == (20, 30, 3)
    assert abs(int(got.mean()) - 10) <= 2


@pytest.mark.parametrize("orientation", [3, 6, 8, 5])
def test_exif_orientation_applied(tmp_path, orientation):
    array = np.asarray(Image.open(PEARL))[:200, :120]
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"rot{orientation}.jpg"
    image.save(path, exif=exif, quality=95)
    got = vp.load_image(path)
    expected_size = (200, 120) if orientation in (5, 6, 7, 8) else (120, 200)
    assert got.size == expected_size
    np.testing.assert_array_equal(np.asarray(got), reference(path))


def test_tiny_image_runs(write_image, tmp_path):
    path = write_image("one.png", np.array([[[200, 10, 10]]], dtype=np.uint8))
    out = tmp_path / "out"
    assert vp.main([str(path), "-o", str(out), "-q"]) == 0
    import json
    stats = json.loads((out / "stats.json").read_text())
    assert stats["original_size"] == [1, 1] and stats["resized_size"] == [56, 56]
    assert stats["apt_patches"] == 1 and stats["patches_per_scale"] == {"14": 0, "28": 0, "56": 1}


def test_corrupt_exif_is_one_logged_line_not_a_raw_warning(tmp_path):
    """PIL warns (warnings.warn) about a truncated EXIF block: found by tests/test_fuzz.py.
    The image still loads, unrotated, as PIL gives it to any processor: the warning is one debug
    line naming the file."""
    from conftest import run_cli

    exif = Image.Exif()
    exif[0x0112], exif[0x010E] = 6, "x" * 40  # orientation, image description
    path = tmp_path / "bad_exif.jpg"
    Image.fromarray(photo()).save(path, exif=exif.tobytes()[:30], quality=95)  # cut inside the tag data
    proc = run_cli(path, "-o", tmp_path / "out", "--stats-only", "-v")
    assert proc.returncode == 0, proc.stderr
    assert "Warning: " not in proc.stderr and "warnings.warn" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "Corrupt EXIF data" in line]
    assert len(lines) == 1 and lines[0].startswith("DEBUG") and str(path) in lines[0], proc.stderr
