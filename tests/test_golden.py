"""Golden outputs: the safety net of the redesign. Five runs (the default image run, --target-ratio
with --sweep, the laplacian scorer, a two-image --stats-only folder and a short video) must keep
the same files, the same stats.json (timings aside), the same npz arrays (bit for bit, by digest)
and the same summaries.

These are regression records, not references: they say "unchanged", not "right" (the other test
files check rightness against independent references). Re-record only for an intended change,
and say so in the commit:  python tests/test_golden.py --record
"""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
sys.path[:0] = [str(HERE), str(HERE.parent)]
from conftest import PEARL, TOOL  # noqa: E402
from test_batch import small_photo  # noqa: E402

CASES = {
    "default": ["pearl.jpg"],
    "target_sweep": ["pearl.jpg", "--target-ratio", "0.5", "--sweep"],
    "laplacian": ["pearl.jpg", "--method", "laplacian", "--thresholds", "0.05", "0.03"],
    "stats_only_folder": ["two", "--stats-only", "--workers", "2"],
    "video": ["clip.mp4"],
}


def make_inputs(where: Path) -> None:
    shutil.copy(PEARL, where / "pearl.jpg")
    small_photo(where / "two" / "a.png", (300, 260), 1)
    small_photo(where / "two" / "b" / "c.jpg", (260, 300), 2)
    shutil.copy(GOLDEN / "clip.mp4", where / "clip.mp4")


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k != "timings_ms"}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def npz_digest(path: Path) -> dict:
    with np.load(path) as data:
        return {name: [str(data[name].dtype), list(data[name].shape),
                       hashlib.sha256(np.ascontiguousarray(data[name]).tobytes()).hexdigest()]
                for name in sorted(data.files)}


def record(out: Path) -> dict:
    """What the golden file holds for one run's output folder."""
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    result = {"files": files, "stats": {}, "npz": {}, "text": {}}
    for name in files:
        path = out / name
        if path.name == "stats.json" or name == "summary.json":
            result["stats"][name] = without_timings(json.loads(path.read_text()))
        elif path.suffix == ".npz":
            result["npz"][name] = npz_digest(path)
        elif path.suffix == ".csv":
            result["text"][name] = path.read_text()
    return result


def run_case(name: str, work: Path) -> dict:
    out = work / f"out_{name}"
    proc = subprocess.run([sys.executable, str(TOOL), *CASES[name], "-o", out.name, "-q"], cwd=work,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return record(out)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    where = tmp_path_factory.mktemp("golden")
    make_inputs(where)
    return where


@pytest.mark.parametrize("name", list(CASES))
def test_outputs_are_unchanged(name, work):
    expected = json.loads((GOLDEN / f"{name}.json").read_text())
    actual = run_case(name, work)
    assert actual["files"] == expected["files"]
    assert actual["stats"] == expected["stats"]
    assert actual["npz"] == expected["npz"]
    assert actual["text"] == expected["text"]


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_golden.py --record   (re-record the golden outputs)")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        make_inputs(Path(tmp))
        for case in CASES:
            (GOLDEN / f"{case}.json").write_text(json.dumps(run_case(case, Path(tmp)), indent=1, sort_keys=True) + "\n")
            print(f"recorded {case}")
