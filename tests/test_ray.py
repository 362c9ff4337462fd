"""--engine ray: a Ray Data pipeline gives the local engine's summaries (a local Ray, 2 CPUs, started once)."""

import json

import numpy as np
import pytest

import visualize_patches as vp
from conftest import ROOT, run_cli
from test_datasets import CORRUPT, photos, write_shards, write_table  # noqa: F401 - photos: a fixture

from apt_vis.thresholds import SharedThresholdCounts, choose_shared_threshold


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


def test_merged_step_functions_equal_the_whole_sets():
    """What Ray workers send back (one step function per batch), merged, is the step function of all
    the maps: the same counts at every threshold and the same --target-ratio choice."""
    from apt_vis.ray_engine import merge_counts

    rng = np.random.default_rng(0)
    maps_list = []
    for _ in range(7):
        rows, cols = rng.integers(2, 9, size=2) * 2
        maps = {14: rng.normal(3, 1, (rows, cols)), 28: rng.normal(3, 1, (rows // 2, cols // 2)),
                56: rng.normal(3, 1, (-(-rows // 4), -(-cols // 4)))}
        maps[28][0, 0] = np.nan  # a padded cell
        maps[14][1, 1] = maps[28][1, 1] = 2.5  # ties between images and scales
        maps_list.append(maps)
    whole = SharedThresholdCounts.from_maps(maps_list)
    merged = merge_counts([SharedThresholdCounts.from_maps(maps_list[a:b]) for a, b in ((0, 3), (3, 4), (4, 7))]
                          + [None])
    assert merged.uniform == whole.uniform
    for ps in whole.patch_sizes:
        assert np.array_equal(merged.lower[ps], whole.lower[ps]) and np.array_equal(merged.upper[ps], whole.upper[ps])
    for target in (0.1, 0.35, 0.5, 0.8, 1.0):
        assert choose_shared_threshold(merged, target) == choose_shared_threshold(whole, target)


def test_ray_summaries_equal_the_local_engine(photos, tmp_path, ray_cluster, monkeypatch):  # noqa: F811
    folder, data = photos
    (folder / "bad.jpg").write_bytes(CORRUPT)
    write_shards(tmp_path / "shards", data)
    (tmp_path / "tables").mkdir()
    write_table(tmp_path / "tables" / "hf.parquet", [("a.jpg", data["a.jpg"]), ("none", None),
                                                     ("c.jpg", data["c.jpg"])])
    monkeypatch.chdir(tmp_path)  # relative paths: the Ray workers started elsewhere
    inputs = ["folder", "shards/{000..001}.tar", "tables/hf.parquet"]
    common = [*inputs, "--stats-only", "--target-ratio", "0.6", "--sweep", "-q"]
    assert vp.main([*common, "-o", "local", "--workers", "1"]) == 1
    assert vp.main([*common, "-o", "ray", "--engine", "ray"]) == 1
    for name in ("summary.csv", "summary.json", "threshold_sweep.csv"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert summary["images"] == {"found": 13, "ok": 10, "reused": 0, "failed": 3, "not_processed": 0}
    for stats in (tmp_path / "local").rglob("stats.json"):
        there = json.loads((tmp_path / "ray" / stats.relative_to(tmp_path / "local")).read_text())
        here = json.loads(stats.read_text())
        assert {k: v for k, v in there.items() if k != "timings_ms"} == \
               {k: v for k, v in here.items() if k != "timings_ms"}
    # pictures too, unless --stats-only; and --skip-existing reuses them
    shard = tmp_path / "shards" / "001.tar"
    assert vp.main([str(shard), "-o", str(tmp_path / "pictures"), "--engine", "ray", "-q"]) == 0
    assert (tmp_path / "pictures" / "001.tar" / "c.jpg" / "patches_visualization.jpg").is_file()
    assert vp.main([str(shard), "-o", str(tmp_path / "pictures"), "--engine", "ray", "-q", "--skip-existing"]) == 0
    assert "reused" in (tmp_path / "pictures" / "summary.csv").read_text()


def test_engine_ray_without_ray_is_one_line(tmp_path):
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "ray.py").write_text("raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    (tmp_path / "in").mkdir()
    for k in range(2):
        (tmp_path / "in" / f"{k}.png").write_bytes((ROOT / "tests" / "data" / "pearl_earring.jpg").read_bytes())
    proc = run_cli(tmp_path / "in", "-o", tmp_path / "out", "--engine", "ray", env={"PYTHONPATH": str(blocker)})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "ERROR   --engine ray needs Ray: pip install 'ray[data]' (or, in the tool's folder, pip install '.[ray]')"]
    assert not (tmp_path / "out").exists()


def test_engine_ray_scores_on_its_workers_cpus(tmp_path, monkeypatch):
    """Ray's workers score with numpy on their CPUs: --device cuda with --engine ray is a usage error
    (one line, exit 2, before any work), and --device auto picks the CPU even on a GPU machine, so the
    driver neither imports torch nor records a device it does not use."""
    proc = run_cli(tmp_path / "in", "-o", tmp_path / "out", "--engine", "ray", "--device", "cuda")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "--engine ray" in proc.stderr and "--device cuda" in proc.stderr
    import apt_vis.machine
    import apt_vis.torch_backend

    monkeypatch.setattr(apt_vis.machine, "nvidia_gpu_visible", lambda: True)
    monkeypatch.setattr(apt_vis.torch_backend, "resolve_device", lambda requested: "cuda")
    assert vp.parse_args(["in", "--engine", "ray"])[3].device == "cpu"
    assert vp.parse_args(["in"])[3].device == "cuda"  # the local engine on a GPU machine
