"""Views: the colormap, importance overlays, scale colours and line options, the summary panel."""

import json

import matplotlib
import numpy as np
from PIL import Image

import apt_vis.pictures as apt_pictures
import visualize_patches as vp
from conftest import PEARL, run_cli


def test_inferno_table_is_matplotlibs():
    reference = np.asarray(matplotlib.colormaps["inferno"](np.arange(256))[:, :3]) * 255
    assert np.abs(vp.INFERNO.astype(float) - reference).max() <= 0.5


def test_colorize_range_and_padding():
    values = np.array([[1.0, 3.0], [2.0, np.nan]])
    rgb = vp.colorize(values, 1.0, 3.0)
    assert tuple(rgb[0, 0]) == tuple(vp.INFERNO[0]) and tuple(rgb[0, 1]) == tuple(vp.INFERNO[255])
    assert tuple(rgb[1, 0]) == tuple(vp.INFERNO[128]) and tuple(rgb[1, 1]) == vp.PADDED_CELL_RGB


def test_importance_overlay_blends_each_cell():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8)
    values = np.array([[0.0, 4.0, 8.0], [2.0, 6.0, np.nan]])
    image = np.asarray(apt_pictures.render_importance_overlay(rgb, values, 28, "entropy (bits)")).astype(int)
    assert image.shape == (56 + 28, 84, 3)  # the picture plus a colour key
    colors = vp.colorize(values, 0.0, 8.0)
    for r in range(2):
        for c in range(3):
            y, x = r * 28 + 13, c * 28 + 9
            exact = (9 * rgb[y, x].astype(int) + 11 * colors[r, c].astype(int)) / 20  # alpha 0.55
            expected = np.floor(exact + 0.5)
            np.testing.assert_array_equal(image[y, x], expected)


def test_line_color_and_thickness():
    rgb = np.zeros((56, 56, 3), dtype=np.uint8)
    masks = {14: np.ones((4, 4), bool), 28: np.zeros((2, 2), bool)}
    out = vp.draw_patch_borders(rgb, masks, color=(255, 0, 0), thickness=4)
    red = (out == (255, 0, 0)).all(axis=-1)
    assert red[:, :4].all() and not red[20, 4:12].any()  # 4 px frame, then picture
    assert list(red[20, 10:18]) == [False, False, True, True, True, True, False, False]  # edge at x=14


def test_cli_views(tmp_path):
    out = tmp_path / "o"
    proc = run_cli(PEARL, "-o", out, "-q", "--color-by-scale", "--line-thickness", "3")
    assert proc.returncode == 0, proc.stderr
    with Image.open(out / "patches_visualization.jpg") as im:
        assert im.size == (840, 980 + 30)  # picture + legend strip
        pixels = np.asarray(im).astype(int)
    legend = pixels[980:]
    for color in vp.scale_palette(3):
        distance = np.abs(legend - np.array(color)).sum(axis=-1)
        assert (distance < 60).sum() > 20, color  # each scale's swatch is there
    stats = json.loads((out / "stats.json").read_text())
    data = np.load(out / "importance_maps.npz")
    r, c = np.argwhere(data["mask_56"])[0]  # a 56 px patch: its outline is the 56 px colour
    edge = pixels[r * 56 + 20: r * 56 + 36, c * 56 + 1]
    assert np.abs(edge - np.array(vp.scale_palette(3)[2])).sum(axis=-1).mean() < 90
    for ps in (14, 28, 56):
        with Image.open(out / f"importance_overlay_scale_{ps}.png") as im:
            assert im.size == (840, 980 + 28)
    with Image.open(out / "summary_panel.png") as im:
        assert im.width == 3 * 340 + 4 * 16 and im.height > 700
    assert stats["apt_patches"] == sum(stats["patches_per_scale"].values())


def test_line_color_validated(tmp_path):
    proc = run_cli(PEARL, "-o", tmp_path / "o", "--line-color", "300", "0", "0")
    assert proc.returncode == 2 and "0..255" in proc.stderr
    proc = run_cli(PEARL, "-o", tmp_path / "o", "--line-thickness", "0")
    assert proc.returncode == 2


def _patch_ids_direct(masks, height, width):
    """patch_id_maps' definition, one chosen patch at a time: its pixels (cut at the image edge)
    get its id (scale offset + row * cols + col) and its scale's index."""
    ids = np.full((height, width), -1, dtype=np.int32)
    scale_of = np.full((height, width), -1, dtype=np.int32)
    offset = 0
    for k, ps in enumerate(sorted(masks)):
        rows, cols = masks[ps].shape
        for r, c in zip(*np.nonzero(masks[ps])):
            ids[r * ps:(r + 1) * ps, c * ps:(c + 1) * ps] = offset + r * cols + c
            scale_of[r * ps:(r + 1) * ps, c * ps:(c + 1) * ps] = k
        offset += rows * cols
    return ids, scale_of


def test_patch_id_maps_against_the_direct_definition():
    """On APT tilings of random maps (3 and 4 scales, images whose sides are and are not
    multiples of the largest patch): the same ids and scales as painting patch by patch."""
    rng = np.random.default_rng(7)
    for height, width, sizes in ((112, 168, (14, 28, 56)), (98, 70, (14, 28, 56)), (40, 24, (4, 8, 16, 32)),
                                 (8, 8, (4, 8)), (28, 196, (14, 28, 56))):
        maps = {ps: rng.uniform(0, 4, vp.grid_shape(height, width, ps)) for ps in sizes}
        for ps in sizes:
            maps[ps][vp.padded_cells(height, width, ps)] = np.nan
        masks = vp.select_patches_np(maps, rng.uniform(1, 4, len(sizes) - 1))
        ours = vp.patch_id_maps(masks, height, width)
        direct = _patch_ids_direct(masks, height, width)
        np.testing.assert_array_equal(ours[0], direct[0])
        np.testing.assert_array_equal(ours[1], direct[1])
