"""The decoded-image cache keeps each image's original size (for crops drawn in original coordinates)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from vldlib.data.cache import cached_domain, image_sizes


def test_image_sizes_are_the_originals_and_kept(tmp_path):
    shapes = [(30, 60), (45, 20), (16, 16)]  # (height, width)
    samples = []
    for k, (h, w) in enumerate(shapes):
        path = tmp_path / f"{k}.jpg"
        Image.new("RGB", (w, h), (k * 40, 10, 10)).save(path)  # PIL takes (width, height)
        samples.append((str(path), k))
    cache = tmp_path / "cache"
    images, _ = cached_domain(samples, 24, progress=False, root=cache)
    assert images.shape == (3, 3, 24, 24)  # squashed to squares ...
    sizes = image_sizes(samples, progress=False, root=cache)
    assert sizes.tolist() == [list(s) for s in shapes]  # ... but the original shapes are known
    assert len(list((cache / "sizes").glob("*.npy"))) == 1
    np.save(next((cache / "sizes").glob("*.npy")), np.array([[1, 1]] * 3))  # read back from the file, not recomputed
    assert image_sizes(samples, progress=False, root=cache).tolist() == [[1, 1]] * 3
