"""The CUDA path: bit-identical results to the CPU. Skipped where no CUDA device is present."""

import csv
import json

import numpy as np
import pytest
import torch

import visualize_patches as vp
from conftest import PEARL, random_photo_like, run_cli, sample_photo

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def both_devices(tok, images_u8):
    cpu = tok.importance_from_uint8(images_u8)
    gpu = tok.importance_from_uint8(images_u8.cuda())
    return cpu, {ps: m.cpu() for ps, m in gpu.items()}


@pytest.mark.parametrize("method", ["entropy"])
def test_entropy_bit_identical_on_real_photos(method):
    tok = vp.PatchTokenizer(method=method)
    for path in (PEARL, sample_photo()):
        rgb = vp.resize_for_qwen2vl(vp.load_image(path), vp.Settings())
        u8 = torch.from_numpy(rgb).permute(2, 0, 1)[None, None]
        cpu, gpu = both_devices(tok, u8)
        for ps in tok.patch_sizes:
            assert torch.equal(cpu[ps].nan_to_num(-1), gpu[ps].nan_to_num(-1)), ps
        masks_cpu = tok.construct_masks(cpu)
        masks_gpu = tok.construct_masks({ps: m.cuda() for ps, m in gpu.items()})
        for ps in tok.patch_sizes:
            assert torch.equal(masks_cpu[ps], masks_gpu[ps].cpu())


def test_entropy_bit_identical_on_batches_and_tubes():
    rng = np.random.default_rng(0)
    tok = vp.PatchTokenizer()
    images = np.stack([random_photo_like(rng, 280, 392) for _ in range(6)]).reshape(3, 2, 280, 392, 3)
    u8 = torch.from_numpy(images).permute(0, 1, 4, 2, 3).contiguous()  # 3 tubes of 2 frames
    cpu, gpu = both_devices(tok, u8)
    for ps in tok.patch_sizes:
        assert torch.equal(cpu[ps].nan_to_num(-1), gpu[ps].nan_to_num(-1))


def test_normalised_entry_point_on_cuda():
    rgb = vp.resize_for_qwen2vl(vp.load_image(PEARL), vp.Settings())
    tok = vp.PatchTokenizer()
    x = torch.from_numpy(vp.normalize_image(rgb))[None]
    cpu, gpu = tok.compute_importance_maps(x), tok.compute_importance_maps(x.cuda())
    for ps in tok.patch_sizes:
        assert torch.equal(cpu[ps].nan_to_num(-1), gpu[ps].cpu().nan_to_num(-1))


def test_other_methods_close_on_cuda():
    rgb = vp.resize_for_qwen2vl(vp.load_image(PEARL), vp.Settings())
    u8 = torch.from_numpy(rgb).permute(2, 0, 1)[None, None]
    for method in ("laplacian", "upsample_mse"):
        cpu, gpu = both_devices(vp.PatchTokenizer(method=method), u8)
        for ps in cpu:
            torch.testing.assert_close(cpu[ps], gpu[ps], rtol=1e-9, atol=1e-12, equal_nan=True)


def test_cli_and_batch_same_numbers_as_cpu(tmp_path):
    for device in ("cpu", "cuda"):
        assert run_cli(PEARL, "-o", tmp_path / device, "-q", "--device", device).returncode == 0
    a = json.loads((tmp_path / "cpu" / "stats.json").read_text())
    b = json.loads((tmp_path / "cuda" / "stats.json").read_text())
    assert b["device"] == "cuda" and a["patches_per_scale"] == b["patches_per_scale"]
    np.testing.assert_array_equal(np.load(tmp_path / "cpu" / "importance_maps.npz")["scale_14"],
                                  np.load(tmp_path / "cuda" / "importance_maps.npz")["scale_14"])
    folder = tmp_path / "set"
    folder.mkdir()
    from PIL import Image
    for k in range(20):  # equal sizes, so that CUDA scores them in batches
        Image.open(PEARL).convert("RGB").rotate(k * 3).save(folder / f"{k:02d}.jpg")
    for device in ("cpu", "cuda"):
        proc = run_cli(folder, "-o", tmp_path / f"set_{device}", "-q", "--stats-only", "--device", device)
        assert proc.returncode == 0, proc.stderr
    rows = [list(csv.DictReader(open(tmp_path / f"set_{d}" / "summary.csv"))) for d in ("cpu", "cuda")]
    assert rows[0] == rows[1]
