"""Fast encoding of the pictures: a PNG writer in numpy and ISA-L's deflate (zlib's without it), and
PictureThreads, which encodes an image's PNGs on a helper thread while the main thread renders.
The core's encode_png and image_files use them when the package is there; alone, the core
encodes with PIL, in order."""

from __future__ import annotations

import sys
import threading
import zlib

import numpy as np

from visualize_patches import PictureTasks, PngPicture, extension

try:  # ISA-L's deflate: the same zlib streams, about 4x faster at level 1 (README "Performance")
    from isal import isal_zlib as fast_zlib
except ImportError:  # installed without the requirements: the standard library's
    fast_zlib = None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOR_TYPES = {"L": 0, "RGB": 2, "RGBA": 6}  # PNG colour type of each 8-bit PIL mode (PNG spec, 11.2.2)
PNG_FILTER_UP = 2  # each byte minus the one above it (PNG spec, 9.2)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + tag + data + zlib.crc32(data, zlib.crc32(tag)).to_bytes(4, "big")


PNG_ROWS_PER_CHUNK = 64  # rows filtered and deflated at a time: small buffers, warm caches


FAST_LEVELS = (1, 2)  # zlib levels deflated by ISA-L at the same level number (see _deflater)


def _deflater(compress_level: int):
    """A deflate stream at zlib's compress_level (0-9). Levels 1 and 2, the fast ones the pictures
    use, by ISA-L when installed: 4x to 10x zlib's speed, files 2 % (photographs) to 12 % (flat
    heatmaps) larger. Others by zlib: ISA-L's best (3) is larger than its level 1 and slower than
    zlib's level 3 (measured on the batch plot: 54.6 KB in 3.7 ms against zlib level 6's 40.7 KB)."""
    if fast_zlib is not None and compress_level in FAST_LEVELS:
        return fast_zlib.compressobj(compress_level)
    return zlib.compressobj(compress_level)


def encode_png_pixels(pixels: np.ndarray, compress_level: int = 3) -> bytes:
    """(H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA uint8 -> lossless PNG bytes. Every row is
    'Up'-filtered (numpy) and deflated (_deflater), both with the GIL released, so that threads
    encode pictures in parallel; about as small as PIL's per-row filter choice, in a quarter of
    the time with ISA-L (half with zlib)."""
    height, width = pixels.shape[:2]
    color_type = PNG_COLOR_TYPES["L" if pixels.ndim == 2 else {3: "RGB", 4: "RGBA"}[pixels.shape[2]]]
    flat = pixels.reshape(height, -1)
    deflate = _deflater(compress_level)
    parts = []
    for y in range(0, height, PNG_ROWS_PER_CHUNK):
        n = min(PNG_ROWS_PER_CHUNK, height - y)
        rows = np.empty((n, flat.shape[1] + 1), dtype=np.uint8)  # each row: its filter byte, then the bytes
        rows[:, 0] = PNG_FILTER_UP
        rows[0, 1:] = flat[y] if y == 0 else flat[y] - flat[y - 1]  # modulo 256; above the first row: zeros
        np.subtract(flat[y + 1:y + n], flat[y:y + n - 1], out=rows[1:, 1:])
        parts.append(deflate.compress(rows))
    parts.append(deflate.flush())
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes((8, color_type, 0, 0, 0))
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", b"".join(parts)) + _png_chunk(b"IEND", b"")


PNG_QUEUE = 2  # pictures rendered and waiting for the PNG encoder thread, at most (memory)


class PictureThreads(PictureTasks):
    """PictureTasks whose PNGs, in the tool's main process on 2 or more cores, one helper thread
    encodes (filter and deflate: numpy and ISA-L or zlib, the GIL released) while this thread
    renders the next picture. Only encoding goes there: a helper thread that allocated the big
    pictures too kept 16 MB more resident (its own malloc arena), and a second encoder thread
    cost 5 MB more for no time we could measure on 2 cores (Vermeer, every output). A batch
    worker encodes itself: the workers already fill the cores. On an error, the encodings not
    started are cancelled."""

    def __init__(self, encoder: bool = True) -> None:
        super().__init__()
        self.encoder = None
        if encoder and not _in_worker_process() and extension("machine").usable_cores() > 1:
            from concurrent.futures import ThreadPoolExecutor

            self.encoder = ThreadPoolExecutor(1, thread_name_prefix="png")
            self.slots = threading.BoundedSemaphore(PNG_QUEUE)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.encoder is not None:
            self.encoder.shutdown(wait=True, cancel_futures=exc_type is not None)

    def encode(self, picture: PngPicture) -> object:
        if self.encoder is None or not self.slots.acquire(blocking=False):
            # no helper, or it has PNG_QUEUE pictures to do already: encode this one here
            return super().encode(picture)
        return self.encoder.submit(self._encode, picture)

    def _encode(self, picture: PngPicture) -> bytes:
        try:
            return encode_png_pixels(picture.pixels, picture.compress_level)
        finally:
            self.slots.release()

    def result(self) -> dict[str, bytes]:
        """Every file's bytes, keyed by name, in the order added (waits for the encoder)."""
        return {name: data if isinstance(data, bytes) else data.result() for name, data in self.files.items()}


def _in_worker_process() -> bool:
    """Whether this is a batch worker (a child of multiprocessing), not the tool's main process."""
    return "multiprocessing" in sys.modules and sys.modules["multiprocessing"].parent_process() is not None
