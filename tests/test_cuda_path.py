"""The CUDA path's orchestration, driven on torch's CPU device, so that it runs on every machine:
with --device cuda a batch scores in the main process, CUDA_BATCH images of one shape at a time,
while the workers decode, render and write; videos and --target-ratio's first pass take their own
branches. Only the device is swapped (cuda_maps moves the tensors to torch's CPU instead of the
GPU); every other line of that path runs. Its outputs must equal a CPU run's, bit for bit.
(tests/test_cuda.py checks the GPU's arithmetic itself, where there is one.)"""

import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import apt_vis.torch_backend as tb
import visualize_patches as vp
from conftest import PEARL, ROOT, sample_photo

CLIP = ROOT / "tests" / "golden" / "clip.mp4"


@pytest.fixture
def cuda_on_torch_cpu(monkeypatch):
    """--device cuda resolves, and its scorer computes on torch's CPU device."""
    real = tb.cuda_maps
    monkeypatch.setattr(tb, "resolve_device", lambda requested: "cuda")
    monkeypatch.setattr(tb, "cuda_maps", lambda images, settings, device, batch: real(images, settings, "cpu", batch))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Images of two shapes, more of one than a CUDA batch holds, a broken file and a short video."""
    folder = tmp_path_factory.mktemp("inputs")
    with Image.open(PEARL) as pearl, Image.open(sample_photo()) as grace:
        pearl, grace = pearl.convert("RGB"), grace.convert("RGB")
        for k in range(vp.CUDA_BATCH + 3):
            pearl.rotate(k * 7).save(folder / f"pearl_{k:02d}.jpg", quality=90)
        for k in range(3):
            grace.rotate(k * 11).save(folder / f"grace_{k}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    shutil.copy(CLIP, folder / "clip.mp4")
    return folder


def outputs(out):
    """Every file's bytes, with the device and the timings taken out of the JSON files, the CSV's
    rows, and the PNGs' pixels (the same maps draw the same pictures). PNGs are compared decoded:
    one CI run gave two PNG files of identical pixels whose deflate streams differed in one byte
    (an equally valid match the encoder chose), which is not what this test is about."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        name = path.relative_to(out).as_posix()
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            for record in (data, data.get("settings", {})):
                record.pop("device", None)
                record.pop("timings_ms", None)
            files[name] = data
        elif path.suffix == ".npz":
            with np.load(path) as npz:
                files[name] = {k: (npz[k].dtype.str, npz[k].shape, npz[k].tobytes()) for k in npz.files}  # NaN = NaN
        elif name.endswith("summary.csv"):
            files[name] = list(csv.DictReader(path.open()))
        elif path.suffix == ".png":
            with Image.open(path) as image:
                files[name] = (image.mode, image.size, image.tobytes())
        elif path.suffix in (".jpg", ".html", ".csv"):
            files[name] = path.read_bytes()
        else:  # videos and GIFs: their sizes only (encoders may differ in metadata)
            files[name] = path.stat().st_size > 0
    return files


@pytest.mark.parametrize("flags", [("--stats-only",), ("--target-ratio", "0.5", "--sweep"), ()],
                         ids=["stats-only", "target-ratio-sweep", "every-output"])
def test_cuda_path_on_torch_cpu_equals_the_cpu_path(tmp_path, inputs, cuda_on_torch_cpu, flags):
    codes = {}
    for device in ("cpu", "cuda"):
        codes[device] = vp.main([str(inputs), "-o", str(tmp_path / device), "--device", device,
                                 "--workers", "2", "-q", *flags])
    assert codes == {"cpu": vp.EXIT_FAILURE, "cuda": vp.EXIT_FAILURE}  # broken.jpg failed on both
    cpu, cuda = outputs(tmp_path / "cpu"), outputs(tmp_path / "cuda")
    assert sorted(cpu) == sorted(cuda)
    for name in cpu:
        assert cpu[name] == cuda[name], name
    stats = json.loads((tmp_path / "cuda" / "pearl_00.jpg" / "stats.json").read_text())
    assert stats["device"] == "cuda"
    summary = json.loads((tmp_path / "cuda" / "summary.json").read_text())
    assert summary["images"]["ok"] == vp.CUDA_BATCH + 3 + 3 + 1 and summary["images"]["failed"] == 1


@pytest.mark.parametrize("source", [PEARL, CLIP], ids=["image", "video"])
def test_a_single_input_on_the_cuda_path_equals_the_cpu_path(tmp_path, cuda_on_torch_cpu, source):
    for device in ("cpu", "cuda"):
        assert vp.main([str(source), "-o", str(tmp_path / device), "--device", device, "-q"]) == vp.EXIT_OK
    cpu, cuda = outputs(tmp_path / "cpu"), outputs(tmp_path / "cuda")
    assert sorted(cpu) == sorted(cuda)
    for name in cpu:
        assert cpu[name] == cuda[name], name
