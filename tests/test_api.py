"""The Python API for notebooks: analyze() and Analysis give what the command line gives."""

import json

import numpy as np
import pytest
from PIL import Image

import visualize_patches as vp
from conftest import PEARL, files_under, run_cli


def without_timings(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k != "timings_ms"}


@pytest.fixture(scope="module")
def pearl_cli_laplacian(tmp_path_factory):
    """The CLI on PEARL with non-default options (a scorer, a target ratio, colours by scale)."""
    out = tmp_path_factory.mktemp("cli")
    proc = run_cli(PEARL, "-o", out, "--method", "laplacian", "--target-ratio", "0.6", "--color-by-scale",
                   "--max-pixels", "400000", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    return out


API_OPTIONS = dict(method="laplacian", target_ratio=0.6, color_by_scale=True, max_pixels=400000, device="cpu")


def test_stats_equal_the_cli_stats_json(pearl_cli_laplacian):
    analysis = vp.analyze(str(PEARL), **API_OPTIONS)
    cli_stats = json.loads((pearl_cli_laplacian / "stats.json").read_text())
    assert without_timings(analysis.stats) == without_timings(cli_stats)
    npz = np.load(pearl_cli_laplacian / "importance_maps.npz")
    for ps in analysis.settings.patch_sizes:
        np.testing.assert_array_equal(analysis.maps[ps].astype(np.float32), npz[f"scale_{ps}"])
        np.testing.assert_array_equal(analysis.masks[ps], npz[f"mask_{ps}"])
    assert analysis.resized.size == tuple(cli_stats["resized_size"])


def test_save_writes_the_cli_files(pearl_cli_laplacian, tmp_path):
    analysis = vp.analyze(PEARL, **API_OPTIONS)
    written = analysis.save(tmp_path / "out")
    names = [p.relative_to(tmp_path / "out") for p in files_under(tmp_path / "out")]
    assert names == [p.relative_to(pearl_cli_laplacian) for p in files_under(pearl_cli_laplacian)]
    saved = json.loads((tmp_path / "out" / "stats.json").read_text())
    cli_stats = json.loads((pearl_cli_laplacian / "stats.json").read_text())
    assert without_timings(saved) == without_timings(cli_stats) == without_timings(written)
    for name in ("importance_maps.npz", "patches_visualization.jpg", "patches_thumbnail.jpg", "resized_image.jpg",
                 "original_image.jpg", "importance_map_scale_28.png"):
        assert (tmp_path / "out" / name).read_bytes() == (pearl_cli_laplacian / name).read_bytes(), name


def test_with_thresholds_equals_a_fresh_analysis():
    image = np.array(Image.open(PEARL).convert("RGB"))
    first = vp.analyze(image, max_pixels=300000)
    again = first.with_thresholds(4.25, 1.5)
    fresh = vp.analyze(image, max_pixels=300000, thresholds=[4.25, 1.5])
    assert again.stats["patches_per_scale"] != first.stats["patches_per_scale"]
    assert without_timings(again.stats) == without_timings(fresh.stats)
    for ps in fresh.masks:
        np.testing.assert_array_equal(again.masks[ps], fresh.masks[ps])
    with pytest.raises(ValueError, match="thresholds"):
        first.with_thresholds(3.0)  # another number of scales needs new maps
    with pytest.raises(ValueError, match="thresholds"):
        first.with_thresholds(float("nan"), 2.0)


def test_images_as_pil_and_array_match_the_path():
    from_path = vp.analyze(PEARL, max_pixels=200000)
    with Image.open(PEARL) as pil:
        from_pil = vp.analyze(pil, max_pixels=200000)
    from_array = vp.analyze(np.array(Image.open(PEARL).convert("RGB")), max_pixels=200000)
    assert from_pil.stats["image"] == "<PIL image>" and from_array.stats["image"] == "<array>"
    for other in (from_pil, from_array):
        assert without_timings(other.stats) | {"image": ""} == without_timings(from_path.stats) | {"image": ""}


@pytest.mark.parametrize("options, named", [
    (dict(thresholds=["x", 2]), "thresholds"),
    (dict(target_ratio=1.5), "target_ratio"),
    (dict(method="sharpness"), "method"),
    (dict(method="laplacian"), "thresholds or target_ratio"),
    (dict(aggregate="max"), "aggregate"),
    (dict(min_pixels=2_000_000), "min_pixels"),
    (dict(line_color=(0, 300, 0)), "line_color"),
    (dict(patch_size=0), "patch_size"),
    (dict(tresholds=[3, 2]), "tresholds"),
    (dict(workers=4), "workers"),
    (dict(sweep="yes"), "sweep"),
])
def test_bad_options_raise_value_error_naming_them(options, named):
    with pytest.raises(ValueError, match=named):
        vp.analyze(np.zeros((64, 64, 3), np.uint8), **options)


def test_bad_images_raise_value_error():
    for image in (np.zeros((64, 64), np.uint8), np.zeros((64, 64, 3), np.float32), 42):
        with pytest.raises(ValueError, match="image"):
            vp.analyze(image)


def test_pictures_and_html():
    analysis = vp.analyze(PEARL, max_pixels=200000)
    assert analysis.patches_image().size == analysis.resized.size
    assert analysis.heatmap(28).mode == "RGB" and analysis.overlay(56).width == analysis.resized.width
    with pytest.raises(ValueError, match="size"):
        analysis.heatmap(20)
    page = analysis._repr_html_()
    assert '<img src="data:image/jpeg;base64,' in page
    for ps, n in analysis.stats["patches_per_scale"].items():
        assert f"<td>{ps} px</td><td>{n}</td>" in page
    assert f"<td>{analysis.stats['apt_patches']}</td>" in page
    named = vp.analyze(np.zeros((64, 64, 3), np.uint8))
    named.stats["image"] = "<b>&"
    assert "&lt;b&gt;&amp;" in named._repr_html_() and "<b>&<" not in named._repr_html_()


def test_no_process_wide_side_effects():
    import signal

    from loguru import logger

    handlers = {s: signal.getsignal(s) for s in vp.STOP_SIGNALS}
    sinks = dict(logger._core.handlers)
    vp.analyze(np.zeros((64, 64, 3), np.uint8))
    assert {s: signal.getsignal(s) for s in vp.STOP_SIGNALS} == handlers
    assert dict(logger._core.handlers) == sinks


def test_api_names_are_the_core_modules_face():
    """analyze and Analysis live in apt_vis/api.py but are imported from the core, also with
    `from ... import` and in dir() (a notebook's tab completion); unknown names stay AttributeErrors."""
    from visualize_patches import Analysis, PatchTokenizer, analyze  # noqa: F401
    import apt_vis.api
    assert analyze is apt_vis.api.analyze and Analysis is apt_vis.api.Analysis
    assert {"analyze", "Analysis", "PatchTokenizer"} <= set(dir(vp))
    with pytest.raises(AttributeError):
        vp.no_such_name
