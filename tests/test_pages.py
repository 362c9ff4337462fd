"""apt_vis/pages.py and its files in apt_vis/static: the scripts parse, and the pages are built from the files
as they are on disk when the tool runs."""

import shutil
import subprocess

import pytest

from apt_vis import pages
from conftest import ROOT

STATIC = ROOT / "apt_vis" / "static"
SUMMARY = {"images": {"ok": 0, "reused": 0, "failed": 0}, "files_skipped": 0, "thresholds": [1.0],
           "target_ratio": None, "retained_ratio": None}


@pytest.mark.parametrize("name", ["explorer.js", "report.js"])
def test_scripts_parse(name):
    node = shutil.which("node")
    if node is None:
        pytest.skip("no Node.js installed to check the JavaScript")
    proc = subprocess.run([node, "--check", str(STATIC / name)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_pages_read_the_files_at_run_time(tmp_path, monkeypatch):
    static = tmp_path / "static"
    shutil.copytree(STATIC, static)
    for name, marker in [("report.css", "/* edited style */"), ("report.js", "// edited script"),
                         ("report.html", "<!-- edited page -->")]:
        with open(static / name, "a") as f:
            f.write(marker + "\n")
    monkeypatch.setattr(pages, "STATIC", static)
    page = pages.report_html([], SUMMARY, (14, 28), "Qwen2-VL")
    assert "/* edited style */\n</style>" in page and "// edited script\n</script>" in page
    assert page.endswith("</body></html>\n<!-- edited page -->\n")
