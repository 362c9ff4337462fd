"""The APT reference's other scorers against direct numpy implementations of their definitions."""

import json

import numpy as np
import pytest
import torch

import visualize_patches as vp
from conftest import PEARL, random_photo_like, run_cli


def gray_unit(rgb):
    x = rgb.astype(np.float64) / 255
    return 0.2989 * x[..., 0] + 0.5870 * x[..., 1] + 0.1140 * x[..., 2]


def per_patch(values, ps, how):
    """(H, W) -> (rows, cols), zero padding past the edge counted, as the reference."""
    h, w = values.shape
    rows, cols = -(-h // ps), -(-w // ps)
    padded = np.zeros((rows * ps, cols * ps))
    padded[:h, :w] = values
    out = np.zeros((rows, cols))
    for r in range(rows):
        for c in range(cols):
            block = padded[r * ps:(r + 1) * ps, c * ps:(c + 1) * ps].ravel()
            out[r, c] = {"mean": np.mean, "max": np.max, "std": lambda b: np.std(b, ddof=1)}[how](block)
    return out


def slow_laplacian(rgb, ps, how):
    gray = np.pad(gray_unit(rgb), 1, mode="reflect")
    h, w = rgb.shape[:2]
    response = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            window = gray[y:y + 3, x:x + 3]
            response[y, x] = abs(window.sum() - 9 * window[1, 1])  # 8 neighbours minus 8 x centre
    return per_patch(response, ps, how)


def bilinear(image, out_h, out_w, ratio_h, ratio_w):
    """torch's bilinear (align_corners=False): src = ratio * (dst + 0.5) - 0.5, clamped at 0."""
    in_h, in_w = image.shape[:2]

    def axis(out_n, in_n, ratio):
        src = np.maximum(ratio * (np.arange(out_n) + 0.5) - 0.5, 0)
        i0 = np.floor(src).astype(int)
        i1 = np.where(i0 < in_n - 1, i0 + 1, i0)
        return i0, i1, src - i0

    y0, y1, wy = axis(out_h, in_h, ratio_h)
    x0, x1, wx = axis(out_w, in_w, ratio_w)
    top = image[y0][:, x0] * (1 - wx)[None, :, None] + image[y0][:, x1] * wx[None, :, None]
    bottom = image[y1][:, x0] * (1 - wx)[None, :, None] + image[y1][:, x1] * wx[None, :, None]
    return top * (1 - wy)[:, None, None] + bottom * wy[:, None, None]


def slow_upsample_mse(rgb, ps, scale_index):
    x = rgb.astype(np.float64) / 255
    h, w = x.shape[:2]
    factor = 0.5**scale_index
    if factor == 1.0:
        return per_patch(np.zeros((h, w)), ps, "mean")
    dh, dw = int(np.floor(h * factor)), int(np.floor(w * factor))
    down = bilinear(x, dh, dw, 1 / factor, 1 / factor)
    uh, uw = int(np.floor(dh / factor)), int(np.floor(dw / factor))
    up = bilinear(down, uh, uw, factor, factor)
    if (uh, uw) != (h, w):
        up = bilinear(up, h, w, uh / h, uw / w)
    return per_patch(((x - up) ** 2).mean(axis=-1), ps, "mean")


def maps_for(rgb, method, aggregate="mean"):
    tok = vp.PatchTokenizer(method=method, aggregate=aggregate)
    maps = tok.compute_importance_maps(torch.from_numpy(vp.normalize_image(rgb))[None])
    return {ps: m[0].numpy() for ps, m in maps.items()}


@pytest.mark.parametrize("aggregate", ["mean", "max", "std"])
@pytest.mark.parametrize("size", [(56, 84), (42, 70)])
def test_laplacian_matches_definition(aggregate, size):
    rgb = random_photo_like(np.random.default_rng(size[0]), *size)
    got = maps_for(rgb, "laplacian", aggregate)
    for ps, values in got.items():
        ref = slow_laplacian(rgb, ps, aggregate)
        finite = np.isfinite(values)
        np.testing.assert_array_equal(finite, ~vp.padded_cells(*size, ps))
        np.testing.assert_allclose(values[finite], ref[finite], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("size", [(56, 84), (84, 112), (70, 42)])
def test_upsample_mse_matches_definition(size):
    rgb = random_photo_like(np.random.default_rng(size[1]), *size)
    got = maps_for(rgb, "upsample_mse")
    for i, (ps, values) in enumerate(sorted(got.items())):
        ref = slow_upsample_mse(rgb, ps, i)
        finite = np.isfinite(values)
        np.testing.assert_allclose(values[finite], ref[finite], rtol=1e-10, atol=1e-12)
    assert np.nanmax(got[28]) > 0 and np.all(got[14] == 0)  # no resampling at the base scale


def test_flat_image_scores_zero_for_every_method():
    rgb = np.full((56, 112, 3), 77, dtype=np.uint8)
    for method in ("laplacian", "upsample_mse", "entropy"):
        for values in maps_for(rgb, method).values():
            assert np.nanmax(np.abs(values)) < 1e-12


def test_thresholds_mean_merge_below_for_every_method(tmp_path):
    for method, thresholds in (("laplacian", ["0.05", "0.03"]), ("upsample_mse", ["0.002", "0.001"])):
        out = tmp_path / method
        proc = run_cli(PEARL, "-o", out, "-q", "--method", method, "--thresholds", *thresholds,
                       *(["--aggregate", "max"] if method == "laplacian" else []))
        assert proc.returncode == 0, proc.stderr
        stats = json.loads((out / "stats.json").read_text())
        assert stats["method"] == method and stats["settings"]["aggregate"] == ("max" if method == "laplacian" else "mean")
        data = np.load(out / "importance_maps.npz")
        t28, t56 = (float(t) for t in thresholds)
        values = data["scale_56"]  # float32 copies: skip cells within float32 rounding of the threshold
        clear = np.isnan(values) | (np.abs(values - t56) > 1e-6 * max(1.0, t56))
        np.testing.assert_array_equal(data["mask_56"][clear], (values < t56)[clear])
        assert 0 < stats["apt_patches"] < stats["uniform_patches"]
        assert "|Laplacian|" in (out / "explorer.html").read_text() or method != "laplacian"


def test_method_flags_validated(tmp_path):
    proc = run_cli(PEARL, "-o", tmp_path / "o", "--method", "laplacian")
    assert proc.returncode == 2 and "needs --thresholds or --target-ratio" in proc.stderr
    proc = run_cli(PEARL, "-o", tmp_path / "o", "--aggregate", "max", "--thresholds", "3", "2")
    assert proc.returncode == 2 and "--aggregate applies to --method laplacian" in proc.stderr
    proc = run_cli(PEARL, "-o", tmp_path / "o", "--method", "sobel")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = run_cli(PEARL, "-o", tmp_path / "o", "-q", "--method", "laplacian", "--target-ratio", "0.5")
    assert proc.returncode == 0, proc.stderr
