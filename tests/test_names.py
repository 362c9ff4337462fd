"""Hostile file names and library warnings: every log line and CSV row stays one line, report links
and thumbnails are percent-encoded relative URLs that open the right explorer and run no script,
and Python warnings from decoders reach stderr only as one log line naming the file."""

import csv
import io
import json
import os
import struct
import unicodedata
import urllib.parse
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visualize_patches as vp
from browser import BrowserError
from conftest import run_cli

# name on disk -> how one line (log, summary.csv) shows it; written out by hand
NAMES = {
    "new\nline.png": "new\\nline.png",
    "tab\tx.png": "tab\\tx.png",
    "esc\x1b[31mred.png": "esc\\x1b[31mred.png",
    "ls\u2028sep.png": "ls\\u2028sep.png",
    "javascript:alert(1).png": "javascript:alert(1).png",
    "javascript:window.__pwned=1;x.png": "javascript:window.__pwned=1;x.png",
    "a#b.png": "a#b.png",
    "q?x.png": "q?x.png",
    "lt<gt.png": "lt<gt.png",
    "sp ace.png": "sp ace.png",
    "100%.png": "100%.png",
    "café_日本.png": "café_日本.png",
    os.fsdecode(b"bad\xffbyte.png"): "bad\\udcffbyte.png",  # not UTF-8 on disk
}
BROKEN = "bro\nken.png"
BROKEN_SHOWN = "bro\\nken.png"
LEVELS = ("DEBUG ", "INFO ", "WARNING ", "ERROR ")
NO_TQDM = {"TQDM_DISABLE": "1"}  # log lines only, no progress-bar carriage returns


def raw_controls(text):
    """Control characters (other than the newline ending a line) and line separators in text."""
    return [c for c in text if c != "\n" and (unicodedata.category(c) in ("Cc", "Cs") or c in "\u2028\u2029")]


def tiny_png(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path, format="PNG")


@pytest.fixture(scope="module")
def hostile_batch(tmp_path_factory):
    """One batch over the hostile names plus a broken image: (output dir, completed process)."""
    root = tmp_path_factory.mktemp("hostile")
    folder = root / "in"
    folder.mkdir()
    for seed, name in enumerate(NAMES):
        tiny_png(folder / name, seed)
    (folder / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = root / "out"
    proc = run_cli(folder, "-o", out, "-v", "--workers", "2", env=NO_TQDM)
    return out, proc


def test_one_line_escapes_controls_and_separators():
    assert vp.one_line("a\nb\rc\td\x00e\x1bf\x7fg\x85h\x9fi\u2028j\u2029k") == \
        "a\\nb\\rc\\td\\x00e\\x1bf\\x7fg\\x85h\\x9fi\\u2028j\\u2029k"
    assert vp.one_line("C:\\dir\\é 日本 #?<>%") == "C:\\dir\\é 日本 #?<>%"  # printable text unchanged
    assert vp.one_line(os.fsdecode(b"x\xff")) == "x\\udcff"  # an undecodable byte, encodable again


def test_hostile_names_log_and_csv_one_line(hostile_batch):
    out, proc = hostile_batch
    assert proc.returncode == 1, proc.stderr  # the broken image failed
    assert raw_controls(proc.stderr) == [], proc.stderr
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith(LEVELS) for line in lines), proc.stderr
    errors = [line for line in lines if line.startswith("ERROR")]
    assert len(errors) == 1 and BROKEN_SHOWN in errors[0] and "cannot decode image" in errors[0], errors

    raw = (out / "summary.csv").read_bytes()
    text = raw.decode("utf-8")  # strict: valid UTF-8 even for an undecodable name
    physical = text.split("\n")
    assert physical[-1] == "" and len(physical) - 1 == 1 + len(NAMES) + 1  # header, rows, no split row
    assert raw_controls(text) == []
    rows = list(csv.reader(io.StringIO(text)))
    header = rows[0]
    assert all(len(r) == len(header) for r in rows)
    by_path = {r[header.index("path")]: dict(zip(header, r)) for r in rows[1:]}
    assert set(by_path) == {*NAMES.values(), BROKEN_SHOWN}
    assert by_path[BROKEN_SHOWN]["status"] == "failed" and BROKEN_SHOWN in by_path[BROKEN_SHOWN]["error"]
    assert all(by_path[shown]["output"] == shown for shown in NAMES.values())

    summary = json.loads((out / "summary.json").read_text())
    assert [f["path"] for f in summary["failures"]] == [BROKEN]  # exact name, JSON escapes it
    assert BROKEN in summary["failures"][0]["error"]
    for name in NAMES:
        assert json.loads((out / name / "stats.json").read_text())["image"] == name


def landed_path(url):
    """The file a file:// URL names, percent-decoded as the browser does."""
    parts = urllib.parse.urlsplit(url)
    assert parts.scheme == "file", url
    return Path(urllib.parse.unquote(parts.path, errors="surrogateescape"))


TRAP = ("window.__pwned = 0; window.alert = window.confirm = window.prompt = () => { window.__pwned = 1; };"
        "document.querySelectorAll('a').length")


def test_report_links_and_thumbnails_with_hostile_names(hostile_batch, browser):
    out, _ = hostile_batch
    report = (out / "report.html").as_uri()
    browser.open(report)
    images = browser.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.currentSrc, "
                              "i.complete && i.naturalWidth > 0])")
    assert len(images) == len(NAMES)
    assert all(src.startswith("./") for src, _, _ in images), images
    assert all(ok for _, _, ok in images), images
    assert {landed_path(url) for _, url, _ in images} == {out / n / "patches_thumbnail.jpg" for n in NAMES}
    hrefs = browser.evaluate("Array.from(document.querySelectorAll('a')).map(a => a.getAttribute('href'))")
    assert len(hrefs) == 2 * len(NAMES) and all(h.startswith("./") for h in hrefs), hrefs
    failures = browser.evaluate("document.getElementById('failures').textContent")
    assert BROKEN_SHOWN in failures

    landed = set()
    timeout, browser.timeout = browser.timeout, 5.0  # a click that navigates nowhere fails in 5 s, not 30
    try:
        for k in range(len(hrefs)):
            browser.open(report)
            assert browser.evaluate(TRAP) == len(hrefs)
            browser.events.clear()
            browser.evaluate(f"document.querySelectorAll('a')[{k}].click()")
            try:
                browser.wait_event("Page.loadEventFired")
            except BrowserError:  # no navigation: say where the click went instead
                pytest.fail(f"link {hrefs[k]!r} did not navigate (script ran: "
                            f"{browser.evaluate('window.__pwned')}, at {browser.evaluate('location.href')})")
            assert browser.evaluate("window.__pwned") is None  # a fresh page: no script from the report ran
            where = landed_path(browser.evaluate("location.href"))
            assert where.name == "explorer.html" and where.parent.parent == out, where
            assert browser.evaluate("document.title").startswith("APT explorer: ")
            landed.add(where)
    finally:
        browser.timeout = timeout
    assert landed == {out / n / "explorer.html" for n in NAMES}
    assert browser.console_errors() == []


def corrupt_exif_jpeg(path):
    """A JPEG whose Exif IFD announces 3 entries but ends inside the first: Pillow's 'Corrupt EXIF data'."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 3) + struct.pack("<HHII", 274, 3, 1, 1)[:2]
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(path, exif=b"Exif\x00\x00" + tiff)
    with warnings.catch_warnings(record=True) as caught:  # the file does make Pillow warn
        warnings.simplefilter("always")
        with Image.open(path) as image:
            image.getexif()
    assert any("Corrupt EXIF data" in str(w.message) for w in caught)
    return path


def test_decoder_warning_is_one_debug_line(tmp_path):
    (tmp_path / "in").mkdir()
    photo = corrupt_exif_jpeg(tmp_path / "in" / "odd exif.jpg")
    tiny_png(tmp_path / "in" / "plain.png", 1)  # two images: the batch runs in worker processes
    runs = {
        "single": run_cli(photo, "-o", tmp_path / "single", "--stats-only", "-v"),
        "batch": run_cli(tmp_path / "in", "-o", tmp_path / "batch", "--stats-only", "-v", "--workers", "2",
                         env=NO_TQDM),
    }
    for how, proc in runs.items():
        assert proc.returncode == 0, (how, proc.stderr)
        assert "warnings.warn" not in proc.stderr and "UserWarning" not in proc.stderr, (how, proc.stderr)
        lines = proc.stderr.splitlines()
        assert all(line.startswith(LEVELS) for line in lines), (how, proc.stderr)
        exif = [line for line in lines if "EXIF" in line]
        assert len(exif) == 1 and exif[0].startswith("DEBUG") and "odd exif.jpg" in exif[0], (how, proc.stderr)


def test_other_python_warnings_become_one_log_line(capsys):
    vp.configure_logging("INFO")
    try:
        warnings.warn("first line\nsecond line", UserWarning)
    finally:
        vp.configure_logging("ERROR")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("WARNING") and "first line\\nsecond line" in err, err


def test_titles_drawn_from_hostile_names(tmp_path):
    """The sweep plot's and the summary panel's titles are drawn from the file name: a newline
    or an undecodable byte there must not fail the input (matplotlib refused the latter)."""
    folder = tmp_path / "in"
    folder.mkdir()
    names = [b"new\nline.png", b"bad\xffbyte.png"]
    for k, name in enumerate(names):
        tiny_png(Path(os.fsdecode(os.fsencode(folder) + b"/" + name)), k)
    out = tmp_path / "out"
    proc = run_cli(folder, "-o", out, "--sweep", "--workers", "1", "-q")
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out / "summary.csv", newline="", encoding="utf-8", errors="surrogateescape")))
    assert [r["status"] for r in rows] == ["ok", "ok"]
