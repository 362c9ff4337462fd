"""Datasets where they live: WebDataset tar shards and Parquet tables as inputs (apt_vis.datasets)."""

import io
import json
import tarfile
import tempfile
from pathlib import Path

import pytest

from conftest import PEARL, ROOT, run_cli
from test_batch import read_csv, small_photo

from apt_vis.datasets import expand_braces

# (name, size, seed): real-photo crops; the same bytes go into a folder, a shard and a table
PHOTOS = (("a.jpg", (200, 180), 1), ("b.png", (160, 200), 2), ("c.jpg", (240, 150), 3), ("d.webp", (150, 150), 4))
CORRUPT = PEARL.read_bytes()[:1500]


@pytest.fixture
def photos(tmp_path):
    """folder/NAME for each photo; {name: bytes}."""
    folder = tmp_path / "folder"
    return folder, {name: small_photo(folder / name, size, seed).read_bytes() for name, size, seed in PHOTOS}


def add_member(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder, photos):
    """000.tar: a.jpg, a.json, b.png, bad.jpg (corrupt); 001.tar: c.jpg, d.webp, c.txt (as WebDataset writes)."""
    folder.mkdir()
    with tarfile.open(folder / "000.tar", "w") as tar:
        add_member(tar, "a.jpg", photos["a.jpg"])
        add_member(tar, "a.json", b'{"caption": "x"}')
        add_member(tar, "b.png", photos["b.png"])
        add_member(tar, "bad.jpg", CORRUPT)
    with tarfile.open(folder / "001.tar", "w") as tar:
        add_member(tar, "c.jpg", photos["c.jpg"])
        add_member(tar, "c.txt", b"a caption")
        add_member(tar, "d.webp", photos["d.webp"])


def stats_by_name(out, rows):
    """{file name of the input: stats.json} for the ok rows."""
    return {r["path"].rsplit("/", 1)[-1]: json.loads((out / r["output"] / "stats.json").read_text())
            for r in rows if r["status"] == "ok"}


NUMBERS = ("original_size", "resized_size", "patches_per_scale", "apt_patches", "uniform_patches",
           "retained_ratio", "thresholds")


def same_numbers(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert {k: a[name][k] for k in NUMBERS} == {k: b[name][k] for k in NUMBERS}, name


def test_expand_braces():
    assert expand_braces("s/{000..003}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar", "s/003.tar"]
    assert expand_braces("{8..10}-{a,b}") == ["8-a", "8-b", "9-a", "9-b", "10-a", "10-b"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_shards_read_as_their_images(photos, tmp_path):
    folder, data = photos
    write_shards(tmp_path / "shards", data)
    ref = run_cli(folder, "-o", tmp_path / "ref", "--stats-only", "--target-ratio", "0.6", "--sweep", "--workers", "2")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    proc = run_cli(tmp_path / "shards" / "{000..001}.tar", "-o", out, "--stats-only", "--target-ratio", "0.6",
                   "--sweep", "--workers", "2")
    assert proc.returncode == 1, proc.stderr  # one corrupt member
    rows = read_csv(out / "summary.csv")
    assert [(r["path"], r["status"]) for r in rows] == [
        ("000.tar/a.jpg", "ok"), ("000.tar/b.png", "ok"), ("000.tar/bad.jpg", "failed"),
        ("001.tar/c.jpg", "ok"), ("001.tar/d.webp", "ok")]
    assert "000.tar/bad.jpg: cannot decode image" in rows[2]["error"]
    assert [line for line in proc.stderr.splitlines() if "bad.jpg" in line] == ["ERROR   " + rows[2]["error"]]
    assert (out / "000.tar" / "a.jpg" / "stats.json").is_file()
    # the same images as files and as shard members: the same numbers, the same shared threshold
    same_numbers(stats_by_name(out, rows), stats_by_name(tmp_path / "ref", read_csv(tmp_path / "ref" / "summary.csv")))
    assert (out / "threshold_sweep.csv").read_bytes() == (tmp_path / "ref" / "threshold_sweep.csv").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["files_skipped"] == 2  # a.json, c.txt
    # resume: every member reused
    again = run_cli(tmp_path / "shards", "-o", out, "--stats-only", "--target-ratio", "0.6", "--skip-existing")
    assert [r["status"] for r in read_csv(out / "summary.csv")] == ["reused", "reused", "failed", "reused", "reused"]
    assert again.returncode == 1


def test_truncated_and_damaged_shards(photos, tmp_path):
    _, data = photos
    shards = tmp_path / "shards"
    shards.mkdir()
    whole = io.BytesIO()
    with tarfile.open(fileobj=whole, mode="w") as tar:
        for name in ("a.jpg", "b.png", "c.jpg"):
            add_member(tar, name, data[name])
    whole = whole.getvalue()
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        b, c = tar.getmember("b.png"), tar.getmember("c.jpg")
    # cut inside b.png's data: a.jpg is read, b.png fails, c.jpg is lost with the shard's tail
    (shards / "cut.tar").write_bytes(whole[:b.offset_data + 100])
    # garbage over c.jpg's header: a.jpg and b.png are read, the tail fails as one row
    damaged = bytearray(whole)
    damaged[c.offset:c.offset + 512] = b"\x07" * 512
    (shards / "damaged.tar").write_bytes(bytes(damaged))
    (shards / "empty.tar").write_bytes(b"")
    out = tmp_path / "out"
    proc = run_cli(shards, "-o", out, "--stats-only", "--workers", "1")
    assert proc.returncode == 1
    rows = {r["path"]: r for r in read_csv(out / "summary.csv")}
    status = {p: r["status"] for p, r in rows.items()}
    assert status == {"cut.tar/a.jpg": "ok", "cut.tar/b.png": "failed", "cut.tar": "failed",
                      "damaged.tar/a.jpg": "ok", "damaged.tar/b.png": "ok", "damaged.tar": "failed",
                      "empty.tar": "failed"}
    assert "cut.tar/b.png: shard is truncated (100 of" in rows["cut.tar/b.png"]["error"]
    assert "cut.tar: truncated or damaged after b.png" in rows["cut.tar"]["error"]
    assert "damaged.tar: truncated or damaged after b.png" in rows["damaged.tar"]["error"]
    assert all(len(line) < 400 for line in proc.stderr.splitlines())


def write_table(path, records, row_group_size=2, binary=False):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    if binary:
        table = pa.table({"key": [r[0] for r in records], "jpg": pa.array([r[1] for r in records], pa.binary())})
    else:
        table = pa.table({"caption": [f"c{k}" for k in range(len(records))],
                          "image": pa.array([None if r[1] is None else {"bytes": r[1], "path": r[0]} for r in records],
                                            pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_tables(photos, tmp_path):
    folder, data = photos
    tables = tmp_path / "tables"
    tables.mkdir()
    write_table(tables / "hf.parquet", [("a.jpg", data["a.jpg"]), ("b.png", data["b.png"]), ("nothing", None),
                                        ("bad.jpg", CORRUPT), ("c.jpg", data["c.jpg"])])
    write_table(tables / "raw.parquet", [("k0", data["d.webp"]), ("k1", data["a.jpg"])], binary=True)
    ref = run_cli(folder, "-o", tmp_path / "ref", "--stats-only", "--workers", "2")
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "out"
    proc = run_cli(tables / "hf.parquet", "-o", out, "--stats-only", "--workers", "2")
    assert proc.returncode == 1, proc.stderr
    rows = read_csv(out / "summary.csv")
    assert [(r["path"], r["status"]) for r in rows] == [
        ("hf.parquet/a.jpg", "ok"), ("hf.parquet/b.png", "ok"), ("hf.parquet/row2", "failed"),
        ("hf.parquet/bad.jpg", "failed"), ("hf.parquet/c.jpg", "ok")]
    assert "no image bytes" in rows[2]["error"]
    reference = stats_by_name(tmp_path / "ref", read_csv(tmp_path / "ref" / "summary.csv"))
    same_numbers(stats_by_name(out, rows), {k: reference[k] for k in ("a.jpg", "b.png", "c.jpg")})
    # a binary column, ids from another column
    proc = run_cli(tables / "raw.parquet", "-o", tmp_path / "raw", "--stats-only", "--id-column", "key")
    assert proc.returncode == 0, proc.stderr
    assert [r["path"] for r in read_csv(tmp_path / "raw" / "summary.csv")] == ["raw.parquet/k0", "raw.parquet/k1"]
    proc = run_cli(tables / "raw.parquet", "-o", tmp_path / "x", "--image-column", "key")
    assert proc.returncode == 1 and "column 'key' is string" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_parquet_without_pyarrow_is_one_line(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "pyarrow.py").write_text("raise ModuleNotFoundError(\"No module named 'pyarrow'\", name='pyarrow')\n")
    (tmp_path / "t.parquet").write_bytes(b"PAR1")
    proc = run_cli(tmp_path / "t.parquet", "-o", tmp_path / "out", env={"PYTHONPATH": str(blocker)})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "ERROR   reading Parquet files needs pyarrow: pip install pyarrow (or, in the tool's folder, pip install '.[parquet]')"]


def test_videos_inside_shards_are_analysed_as_the_same_file_outside(tmp_path):
    """A WebDataset shard of clips (as video datasets ship): each video member is analysed from a
    private copy that is removed afterwards, with the same numbers and files as the clip outside a
    shard; a damaged video member is a failed row naming the member, not the copy."""
    clip = (ROOT / "tests" / "golden" / "clip.mp4").read_bytes()
    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "000.tar", "w") as tar:
        add_member(tar, "v1.mp4", clip)
        add_member(tar, "v1.json", b'{"caption": "x"}')
        add_member(tar, "broken.mp4", clip[:3000])
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "v1.mp4").write_bytes(clip)
    (loose / "other.mp4").write_bytes(clip)  # two inputs, so that both runs are batches
    copies_before = set(Path(tempfile.gettempdir()).glob("apt-video-*"))
    for source, out in ((shards, tmp_path / "out_shards"), (loose, tmp_path / "out_loose")):
        proc = run_cli(source, "-o", out, "--workers", "2", "--device", "cpu")
        assert proc.returncode == (1 if source == shards else 0), proc.stderr
    rows = {r["path"]: r for r in read_csv(tmp_path / "out_shards" / "summary.csv")}
    assert rows["000.tar/v1.mp4"]["status"] == "ok" and rows["000.tar/broken.mp4"]["status"] == "failed"
    assert "000.tar/broken.mp4" in rows["000.tar/broken.mp4"]["error"] and "apt-video" not in rows["000.tar/broken.mp4"]["error"]
    inside, outside = tmp_path / "out_shards" / "000.tar" / "v1.mp4", tmp_path / "out_loose" / "v1.mp4"
    assert sorted(p.name for p in inside.iterdir()) == sorted(p.name for p in outside.iterdir())

    def numbers(folder):
        stats = json.loads((folder / "stats.json").read_text())
        return {k: v for k, v in stats.items() if k not in ("image", "timings_ms")}

    assert numbers(inside) == numbers(outside)
    assert (inside / "importance_maps.npz").read_bytes() == (outside / "importance_maps.npz").read_bytes()
    assert set(Path(tempfile.gettempdir()).glob("apt-video-*")) == copies_before  # the private copies are gone
