"""Every output file of a real run, opened and checked; the renderers on hand-made inputs."""

import io
import json

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import visualize_patches as vp
from apt_vis import encode, machine

SIZES = (14, 28, 56)
EXPECTED_FILES = {f"importance_map_scale_{s}.png" for s in SIZES} | {
    "patches_visualization.jpg", "original_image.jpg", "resized_image.jpg", "importance_maps.npz", "stats.json",
}


def test_files_written(pearl_run):
    out, _ = pearl_run
    assert EXPECTED_FILES <= {p.name for p in out.iterdir()}
    assert not [p for p in out.iterdir() if p.name.startswith(".staging")]


def test_stats_json(pearl_run):
    out, _ = pearl_run
    stats = json.loads((out / "stats.json").read_text())
    assert stats["image"].endswith("pearl_earring.jpg")
    assert stats["original_size"] == [826, 970] and stats["resized_size"] == [840, 980]
    assert (stats["patch_size"], stats["merge_size"], stats["temporal_patch_size"]) == (14, 2, 2)
    assert stats["thresholds"] == [3.0, 2.0] and stats["patch_sizes"] == [14, 28, 56]
    counts = stats["patches_per_scale"]
    assert set(counts) == {"14", "28", "56"}
    assert stats["apt_patches"] == sum(counts.values())
    assert stats["uniform_patches"] == (980 // 14) * (840 // 14) == 4200
    assert stats["retained_ratio"] == pytest.approx(stats["apt_patches"] / 4200)
    assert stats["qwen2vl_tokens"] == 4200 // 4 == 1050
    # the patches cover the image exactly: 14 px cells covered by each scale add up
    assert counts["14"] + 4 * counts["28"] + 16 * counts["56"] == 4200
    assert stats["device"] == "cpu"
    assert {"load", "resize", "importance", "render", "total"} <= set(stats["timings_ms"])


def test_npz_maps_and_masks(pearl_run):
    out, _ = pearl_run
    stats = json.loads((out / "stats.json").read_text())
    data = np.load(out / "importance_maps.npz")
    assert set(data.files) == {f"scale_{s}" for s in SIZES} | {f"mask_{s}" for s in SIZES}
    for s in SIZES:
        values, mask = data[f"scale_{s}"], data[f"mask_{s}"]
        assert values.dtype == np.float32 and values.shape == vp.grid_shape(980, 840, s)
        np.testing.assert_array_equal(np.isnan(values), vp.padded_cells(980, 840, s))
        assert np.nanmin(values) >= 0 and np.nanmax(values) <= 9
        assert mask.dtype == bool and int(mask.sum()) == stats["patches_per_scale"][str(s)]
    # masks follow from the stored maps and thresholds
    again = vp.select_patches({s: torch.from_numpy(data[f"scale_{s}"].astype(np.float64)) for s in SIZES},
                              [3.0, 2.0])
    for s in SIZES:
        np.testing.assert_array_equal(again[s].numpy(), data[f"mask_{s}"])
    # 56 px cells at the bottom are padded (980 = 17.5 * 56) and never chosen
    assert not data["mask_56"][-1].any()


def test_jpegs(pearl_run):
    out, _ = pearl_run
    with Image.open(out / "original_image.jpg") as im:
        assert im.size == (826, 970) and im.mode == "RGB"
    with Image.open(out / "resized_image.jpg") as im:
        assert im.size == (840, 980)
        resized = np.asarray(im).astype(int)
    with Image.open(out / "patches_visualization.jpg") as im:
        assert im.size == (840, 980)
        overlay = np.asarray(im).astype(int)
    greenish = (overlay[..., 1] > 200) & (overlay[..., 0] < 90) & (overlay[..., 2] < 90)
    assert greenish[:, :2].mean() > 0.9 and greenish[:2, :].mean() > 0.9  # outer frame
    # inside a chosen 56 px patch (background, top left) the picture is untouched
    data = np.load(out / "importance_maps.npz")
    r, c = np.argwhere(data["mask_56"])[0]
    inner = (slice(r * 56 + 4, r * 56 + 52), slice(c * 56 + 4, c * 56 + 52))
    assert np.abs(overlay[inner] - resized[inner]).mean() < 4


def heatmap_cell_colors(image: Image.Image, rows: int, cols: int) -> np.ndarray:
    """(rows, cols, 3) colour at the centre of each cell of a rendered heatmap."""
    x0, y0, x1, y1 = vp.heatmap_map_box(rows, cols)
    pixels = np.asarray(image)
    ys = (y0 + (np.arange(rows) + 0.5) * (y1 - y0) / rows).astype(int)
    xs = (x0 + (np.arange(cols) + 0.5) * (x1 - x0) / cols).astype(int)
    return pixels[ys][:, xs, :3].astype(int)


def test_heatmap_color_range_ignores_padded_cells():
    values = np.array([[0.5, 2.0, 7.5, np.nan], [3.0, 1.0, 4.0, np.nan], [np.nan] * 4])
    image = vp.render_heatmap(values, 56, (150, 200), threshold=2.0, chosen=3)
    colors = heatmap_cell_colors(image, *values.shape)
    inferno = matplotlib.colormaps["inferno"]
    lo = np.array(inferno(0.0)[:3]) * 255
    hi = np.array(inferno(1.0)[:3]) * 255
    pad = np.array(vp.PADDED_CELL_RGB)
    assert np.abs(colors[0, 0] - lo).max() <= 3  # the minimum finite value is the darkest colour
    assert np.abs(colors[0, 2] - hi).max() <= 3  # the maximum finite value is the brightest
    for r, c in [(0, 3), (1, 3), (2, 0), (2, 2)]:
        assert np.abs(colors[r, c] - pad).max() <= 3
    mid = np.array(inferno((3.0 - 0.5) / 7.0)[:3]) * 255
    assert np.abs(colors[1, 0] - mid).max() <= 6


def test_heatmap_files_have_square_cells(pearl_run):
    out, _ = pearl_run
    for s in SIZES:
        rows, cols = vp.grid_shape(980, 840, s)
        x0, y0, x1, y1 = vp.heatmap_map_box(rows, cols)
        assert (x1 - x0) / cols == pytest.approx((y1 - y0) / rows, rel=1e-9)
        with Image.open(out / f"importance_map_scale_{s}.png") as im:
            geometry = vp.heatmap_geometry(rows, cols)
            assert im.size == (geometry.width, geometry.height)
            colors = heatmap_cell_colors(im, rows, cols)
        data = np.load(out / "importance_maps.npz")[f"scale_{s}"]
        finite = np.isfinite(data)
        # brighter cells (by colormap position) hold higher entropy: compare ranks via luminance
        lum = colors[..., 0] * 0.3 + colors[..., 1] * 0.59 + colors[..., 2] * 0.11
        order = np.corrcoef(lum[finite], data[finite])[0, 1]
        assert order > 0.9


def test_borders_drawn_once_with_given_thickness():
    rgb = np.zeros((56, 112, 3), dtype=np.uint8)
    masks = {
        14: np.zeros((4, 8), bool),
        28: np.zeros((2, 4), bool),
        56: np.array([[True, False]]),
    }
    masks[28][:, 2:] = True  # right half: four 28 px patches
    out = vp.draw_patch_borders(rgb, masks)
    green = (out == vp.BORDER_GREEN).all(axis=-1)
    # the shared edge of the 56 px patch and its right neighbours at x = 56: columns 55 and 56 only
    row = green[40]
    assert not row[54] and row[55] and row[56] and not row[57]
    # 28 px boundary inside the right half at x = 84: 2 px wide
    assert list(row[82:87]) == [False, True, True, False, False]
    # horizontal boundary at y = 28 in the right half only
    assert green[27:29, 60:80].all() and not green[27:29, 10:50].any()
    # outer frame 2 px inside the image
    assert green[:, :2].all() and green[:, -2:].all() and green[:2].all() and green[-2:].all()
    assert not green[2:54, 2:54].any()  # inside the big patch: nothing drawn


def test_borders_color_by_scale():
    rgb = np.zeros((28, 56, 3), dtype=np.uint8)
    masks = {14: np.array([[True, True, False, False], [True, True, False, False]]),
             28: np.array([[False, True]])}
    colors = [(255, 0, 0), (0, 0, 255)]
    out = vp.draw_patch_borders(rgb, masks, scale_colors=colors)
    assert tuple(out[10, 0]) == (255, 0, 0)  # outer edge of a 14 px patch
    assert tuple(out[10, 55]) == (0, 0, 255)  # outer edge of the 28 px patch
    assert tuple(out[10, 27]) == (255, 0, 0) and tuple(out[10, 28]) == (0, 0, 255)  # each side its own


@pytest.mark.parametrize("mode, shape", [("RGB", (37, 23, 3)), ("RGB", (1, 5, 3)), ("L", (9, 1)),
                                         ("RGBA", (6, 7, 4)), ("RGB", (300, 211, 3))])
@pytest.mark.parametrize("level", [0, 1, 3, 9])
@pytest.mark.parametrize("deflate", ["isal", "zlib", "pil"])
def test_encode_png_is_lossless(mode, shape, level, deflate, monkeypatch):
    """encode_png (8-bit L/RGB/RGBA), decoded by PIL: the same mode and pixels, with apt_vis.encode's
    writer and ISA-L's deflate (a requirement), with zlib's (installed without it), and with PIL's
    writer (the core copied alone)."""
    if deflate == "zlib":
        monkeypatch.setattr(encode, "fast_zlib", None)
    elif deflate == "pil":
        monkeypatch.setattr(vp, "has_extensions", lambda: False)
    else:
        assert encode.fast_zlib is not None, "isal is in requirements.txt"
    rng = np.random.default_rng(sum(shape) + level)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    pixels[len(pixels) // 2:] = pixels[0]  # repeated rows, as flat colours give
    data = vp.encode_png(Image.fromarray(pixels, mode), compress_level=level)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(data)) as decoded:
        decoded.load()  # checks every chunk's CRC and the zlib stream
        assert decoded.format == "PNG" and decoded.mode == mode
        assert np.array_equal(np.asarray(decoded), pixels)


@pytest.mark.parametrize("mode", ["1", "P", "I;16", "LA"])
def test_encode_png_other_modes(mode):
    image = Image.linear_gradient("L").resize((20, 12)).convert(mode)
    with Image.open(io.BytesIO(vp.encode_png(image))) as decoded:
        assert decoded.mode == image.mode and decoded.tobytes() == image.tobytes()


def test_pngs_encoded_on_a_thread_are_the_ones_encoded_in_order(monkeypatch, tmp_path):
    """PictureThreads' PNG encoder thread (the main process on 2+ cores) writes the same bytes as
    encoding in order (one core, or a batch worker): both forced here, whatever this machine has."""
    written = {}
    for cores in (1, 2):
        monkeypatch.setattr(machine, "usable_cores", lambda cores=cores: cores)
        with encode.PictureThreads() as tasks:
            assert (tasks.encoder is not None) == (cores > 1)
        assert vp.main([str(vp.sample_image_path()), "-o", str(tmp_path / str(cores)), "-q"]) == 0
        written[cores] = {p.name: p.read_bytes() for p in (tmp_path / str(cores)).iterdir() if p.name != "stats.json"}
    assert written[1] == written[2] and len(written[1]) >= 13
