"""Seeded fuzz inputs: small valid files of every supported format, and mutations of them.

Shared by tests/test_fuzz.py (a few hundred files per run) and benchmarks/fuzz.py (long
campaigns). Everything is a pure function of the seed: the same seed gives the same bytes
(for MP4, on the same OpenCV build).
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

PEARL = Path(__file__).resolve().parent / "data" / "pearl_earring.jpg"
SEED_SIZE = (72, 60)  # (w, h): small, so thousands of files decode in minutes
VIDEO_SIZE = (64, 48)  # (w, h)
VIDEO_FRAMES = 6
VIDEO_FPS = 6.0
HEADER_BYTES = 64  # "header damage" overwrites bytes in this leading span
NUMBER_SPAN = 512  # "number overwrite" writes an extreme 16/32-bit value in this leading span


def _photo() -> Image.Image:
    """A crop of the real photo (her face), at SEED_SIZE."""
    with Image.open(PEARL) as image:
        return image.convert("RGB").crop((250, 200, 610, 500)).resize(SEED_SIZE, Image.Resampling.BICUBIC)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _mp4(photo: Image.Image) -> bytes:
    """VIDEO_FRAMES frames panning over the photo, MPEG-4 Part 2 (mp4v) through OpenCV."""
    import cv2

    w, h = VIDEO_SIZE
    base = np.asarray(photo.resize((w + 2 * VIDEO_FRAMES, h), Image.Resampling.BICUBIC))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed.mp4"
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (w, h))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot write mp4v video")
        try:
            for k in range(VIDEO_FRAMES):
                # OpenCV needs contiguous BGR frames (a strided view segfaults some builds)
                writer.write(np.ascontiguousarray(base[:, 2 * k:2 * k + w, ::-1]))
        finally:
            writer.release()
        return path.read_bytes()


def seed_files() -> dict[str, bytes]:
    """{name with extension: bytes}: one small valid file per format and variant."""
    photo = _photo()
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(SEED_SIZE))
    frames = [photo, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "seed.jpg": _encode(photo, "JPEG", quality=85),
        "seed_progressive.jpg": _encode(photo, "JPEG", quality=85, progressive=True),
        "seed.png": _encode(photo, "PNG"),
        "seed_rgba.png": _encode(rgba, "PNG"),
        "seed_palette.png": _encode(photo.quantize(64), "PNG"),
        "seed.webp": _encode(photo, "WEBP", quality=80),
        "seed_lossless.webp": _encode(rgba, "WEBP", lossless=True),
        "seed.gif": gif.getvalue(),
        "seed.tif": _encode(photo, "TIFF"),
        "seed_lzw.tif": _encode(photo, "TIFF", compression="tiff_lzw"),
        "seed.bmp": _encode(photo, "BMP"),
        "seed.mp4": _mp4(photo),
    }


# --- mutators: (bytes, rng) -> bytes ----------------------------------------


def flip_bits(data: bytes, rng: np.random.Generator) -> bytes:
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        pos = int(rng.integers(0, len(out)))
        out[pos] ^= 1 << int(rng.integers(0, 8))
    return bytes(out)


def truncate(data: bytes, rng: np.random.Generator) -> bytes:
    return data[:int(rng.integers(0, len(data)))]


def insert_chunk(data: bytes, rng: np.random.Generator) -> bytes:
    pos = int(rng.integers(0, len(data) + 1))
    chunk = rng.integers(0, 256, size=int(rng.integers(1, 65)), dtype=np.uint8).tobytes()
    return data[:pos] + chunk + data[pos:]


def damage_header(data: bytes, rng: np.random.Generator) -> bytes:
    """Overwrite a random span of the first HEADER_BYTES bytes (sometimes the magic itself)."""
    span = min(len(data), HEADER_BYTES)
    start = int(rng.integers(0, span))
    length = int(rng.integers(1, min(16, span - start) + 1))
    noise = rng.integers(0, 256, size=length, dtype=np.uint8).tobytes()
    return data[:start] + noise + data[start + length:]


def duplicate_chunk(data: bytes, rng: np.random.Generator) -> bytes:
    start = int(rng.integers(0, len(data)))
    chunk = data[start:start + int(rng.integers(1, 257))]
    pos = int(rng.integers(0, len(data) + 1))
    return data[:pos] + chunk + data[pos:]


def overwrite_number(data: bytes, rng: np.random.Generator) -> bytes:
    """An extreme 16- or 32-bit value (0, 1, max, sign bit) where sizes and offsets live."""
    width = int(rng.choice([2, 4]))
    value = int(rng.choice([0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]))
    value &= (1 << (8 * width)) - 1
    order = "big" if rng.integers(0, 2) else "little"
    pos = int(rng.integers(0, max(1, min(len(data), NUMBER_SPAN) - width + 1)))
    return data[:pos] + value.to_bytes(width, order) + data[pos + width:]


MUTATORS: dict[str, Callable[[bytes, np.random.Generator], bytes]] = {
    "flip": flip_bits,
    "truncate": truncate,
    "insert": insert_chunk,
    "header": damage_header,
    "dup": duplicate_chunk,
    "number": overwrite_number,
}


def mutate(data: bytes, rng: np.random.Generator, rounds: int) -> tuple[bytes, list[str]]:
    """`rounds` random mutators applied in turn: (bytes, their names)."""
    names = []
    for _ in range(rounds):
        name = str(rng.choice(list(MUTATORS)))
        if data:
            data = MUTATORS[name](data, rng)
        names.append(name)
    return data, names


def fuzz_case(seeds: dict[str, bytes], seed: int, index: int) -> tuple[str, bytes]:
    """File `index` of campaign `seed`: (file name, bytes). Mostly one mutation, some
    stacked ones, a few untouched seeds (which must always succeed)."""
    rng = np.random.default_rng([seed, index])
    seed_name = sorted(seeds)[index % len(seeds)]
    roll = rng.random()
    rounds = 0 if roll < 0.03 else 1 if roll < 0.75 else int(rng.integers(2, 5))
    data, names = mutate(seeds[seed_name], rng, rounds)
    stem, ext = seed_name.rsplit(".", 1)
    tag = "-".join(names) or "clean"
    return f"{index:05d}_{stem.removeprefix('seed').lstrip('_') or ext}_{tag}.{ext}", data


def write_cases(folder: Path, seed: int, start: int, count: int,
                seeds: dict[str, bytes] | None = None) -> list[Path]:
    """Write files start .. start+count-1 of campaign `seed` into folder; their paths."""
    seeds = seeds if seeds is not None else seed_files()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(start, start + count):
        name, data = fuzz_case(seeds, seed, index)
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths
