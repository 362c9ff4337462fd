"""explorer.html: self-contained, and in a real browser its live counts agree with the command line."""

import json
import re

import numpy as np
import pytest
import torch

import visualize_patches as vp
from conftest import run_cli


def embedded_data(html_text):
    match = re.search(r'<script id="data" type="application/json">(.*?)</script>', html_text, re.S)
    return json.loads(match.group(1).replace("<\\/", "</"))


def test_self_contained_with_hooks(pearl_run):
    out, _ = pearl_run
    text = (out / "explorer.html").read_text()
    assert "http://" not in text and "https://" not in text and "src=\"/" not in text
    assert '<input type="range" id="threshold-0"' in text and '<input type="range" id="threshold-1"' in text
    assert 'id="apt-patches"' in text and 'id="retained-ratio"' in text
    data = embedded_data(text)
    assert data["image"].startswith("data:image/jpeg;base64,")
    stats = json.loads((out / "stats.json").read_text())
    assert data["thresholds"] == stats["thresholds"] and data["uniform"] == stats["uniform_patches"]
    npz = np.load(out / "importance_maps.npz")
    for ps in (14, 28, 56):
        values = np.array([[np.nan if v is None else v for v in row] for row in data["maps"][str(ps)]])
        np.testing.assert_array_equal(values.astype(np.float32), npz[f"scale_{ps}"])


SET_SLIDERS = """(() => {
  const values = %s;
  values.forEach((v, k) => {
    const s = document.getElementById('threshold-' + k);
    s.value = String(v);
    s.dispatchEvent(new Event('input', {bubbles: true}));
  });
  return [document.getElementById('apt-patches').textContent,
          document.getElementById('retained-ratio').textContent,
          values.map((v, k) => parseFloat(document.getElementById('threshold-' + k).value))];
})()"""


def cli_count(out, thresholds):
    data = np.load(out / "importance_maps.npz")
    maps = {ps: torch.from_numpy(data[f"scale_{ps}"].astype(np.float64)) for ps in (14, 28, 56)}
    return sum(int(m.sum()) for m in vp.select_patches(maps, thresholds).values())


def test_sliders_agree_with_the_cli(pearl_run, browser):
    out, _ = pearl_run
    stats = json.loads((out / "stats.json").read_text())
    browser.open((out / "explorer.html").as_uri())
    assert browser.evaluate("document.body.dataset.ready") == "1"
    assert int(browser.evaluate("document.getElementById('apt-patches').textContent")) == stats["apt_patches"]
    total, ratio, read_back = browser.evaluate(SET_SLIDERS % json.dumps(stats["thresholds"]))
    assert read_back == stats["thresholds"]
    assert int(total) == stats["apt_patches"] and ratio == f"{stats['retained_ratio']:.4f}"
    # other thresholds: the page and the rule applied to the stored maps agree
    other = [5.25, 3.5]
    total, _, _ = browser.evaluate(SET_SLIDERS % json.dumps(other))
    assert int(total) == cli_count(out, other)
    per_scale = [int(browser.evaluate(f"document.getElementById('count-{ps}').textContent")) for ps in (14, 28, 56)]
    data = np.load(out / "importance_maps.npz")
    masks = vp.select_patches({ps: torch.from_numpy(data[f"scale_{ps}"].astype(np.float64)) for ps in (14, 28, 56)},
                              other)
    assert per_scale == [int(masks[ps].sum()) for ps in (14, 28, 56)]
    browser.evaluate("document.getElementById('show-map').click()")
    assert "entropy" in browser.evaluate("document.getElementById('map-range').textContent")
    assert browser.console_errors() == []


def test_page_matches_a_cli_run_at_new_thresholds(tmp_path, browser):
    """Moving the sliders to T gives exactly what `--thresholds T` prints."""
    from conftest import PEARL

    base, moved = tmp_path / "base", tmp_path / "moved"
    assert run_cli(PEARL, "-o", base, "-q").returncode == 0
    assert run_cli(PEARL, "-o", moved, "-q", "--thresholds", "4.5", "2.75").returncode == 0
    expected = json.loads((moved / "stats.json").read_text())["apt_patches"]
    browser.open((base / "explorer.html").as_uri())
    total, _, _ = browser.evaluate(SET_SLIDERS % json.dumps([4.5, 2.75]))
    assert int(total) == expected


@pytest.mark.parametrize("method,args", [("laplacian", ["--thresholds", "0.05", "0.03"])])
def test_explorer_for_other_methods(tmp_path, browser, method, args):
    from conftest import PEARL

    out = tmp_path / method
    assert run_cli(PEARL, "-o", out, "-q", "--method", method, *args).returncode == 0
    stats = json.loads((out / "stats.json").read_text())
    browser.open((out / "explorer.html").as_uri())
    total, _, _ = browser.evaluate(SET_SLIDERS % json.dumps(stats["thresholds"]))
    assert int(total) == stats["apt_patches"]
