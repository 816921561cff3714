"""Batched augmentation (vldlib.data.gpu_augment), on CPU tensors: the same random choices and,
up to float rounding, the same pixels as torchvision's per-image train_transform."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from vldlib.data import gpu_augment as G
from vldlib.data.order import batch_indices
from vldlib.data.transforms import train_transform

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _images(n: int = 6, size: int = 40, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_shape_dtype_range():
    x = _images(6, 40)
    out = G.augment_batch(x, G.sample_params(range(6), 40, 40), 32, (0.0,) * 3, (1.0,) * 3)
    assert out.shape == (6, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1  # identity normalisation: pixels stay in [0, 1]
    plain = G.augment_batch(x, None, 32, MEAN, STD)  # augmentation off: resize + normalise only
    assert plain.shape == (6, 3, 32, 32)


def test_same_seed_same_output_and_batch_independent():
    x = _images(4)
    a = G.augment_batch(x, G.sample_params([5, 6, 7, 8], 40, 40), 32, MEAN, STD)
    b = G.augment_batch(x, G.sample_params([5, 6, 7, 8], 40, 40), 32, MEAN, STD)
    assert torch.equal(a, b)
    c = G.augment_batch(x, G.sample_params([9, 6, 7, 8], 40, 40), 32, MEAN, STD)
    assert not torch.equal(a[0], c[0]) and torch.allclose(a[1:], c[1:])
    # one image's result does not depend on the batch it is in
    alone = G.augment_batch(x[2:3], G.sample_params([7], 40, 40), 32, MEAN, STD)
    assert torch.allclose(alone[0], a[2], atol=1e-6)


def test_matches_torchvision_per_image():
    """Same draws as train_transform under torch.manual_seed(seed); pixels equal up to rounding
    (float input, so torchvision does not round to uint8 between operations)."""
    size, n = 32, 24
    x = _images(n, size, seed=1)
    seeds = [1000 + k for k in range(n)]
    ours = G.augment_batch(x, G.sample_params(seeds, size, size), size, MEAN, STD)
    tf = train_transform(size, MEAN, STD)
    ref = []
    for k, s in enumerate(seeds):
        torch.manual_seed(s)
        ref.append(tf(x[k].float() / 255))
    assert (ours - torch.stack(ref)).abs().max() < 1e-4


def test_hue_matches_torchvision():
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[0] = 0.5  # gray pixels: no hue
    shift = torch.linspace(-0.5, 0.5, 8)
    ref = torch.stack([TF.adjust_hue(x[i], float(shift[i])) for i in range(8)])
    assert (G._hue(x, shift) - ref).abs().max() < 1e-5


def test_crop_flip_and_gray_statistics():
    p = G.sample_params(range(3000), 64, 48)
    area = (p.crop[:, 2] * p.crop[:, 3]).float() / (64 * 48)
    assert area.min() > 0.68 and area.max() <= 1.0
    assert (p.crop[:, 0] >= 0).all() and (p.crop[:, 0] + p.crop[:, 2] <= 64).all()
    assert (p.crop[:, 1] >= 0).all() and (p.crop[:, 1] + p.crop[:, 3] <= 48).all()
    assert abs(p.flip.float().mean() - 0.5) < 0.04
    assert abs(p.gray.float().mean() - 0.1) < 0.025
    assert (np.sort(p.order.numpy(), axis=1) == np.arange(4)).all()  # a permutation each
    assert (p.factors[:, :3] >= 0.7).all() and (p.factors[:, :3] <= 1.3).all() and (p.factors[:, 3].abs() <= 0.3).all()


def _neutral(n: int, size: int, flip: bool) -> G.AugmentParams:
    return G.AugmentParams(crop=torch.tensor([[0, 0, size, size]] * n), flip=torch.full((n,), flip),
                           order=torch.arange(4).repeat(n, 1), factors=torch.tensor([[1.0, 1.0, 1.0, 0.0]] * n),
                           gray=torch.zeros(n, dtype=torch.bool))


def test_full_crop_is_identity_and_flip_reverses_columns():
    x = _images(3, 16)
    ident = G.augment_batch(x, _neutral(3, 16, False), 16, (0.0,) * 3, (1.0,) * 3)
    assert torch.allclose(ident, x.float() / 255, atol=1e-5)
    flipped = G.augment_batch(x, _neutral(3, 16, True), 16, (0.0,) * 3, (1.0,) * 3)
    assert torch.allclose(flipped, x.float().flip(-1) / 255, atol=1e-5)


def test_normalisation_of_transform():
    assert G.normalisation_of(train_transform(32, MEAN, STD)) == (MEAN, STD)
    with pytest.raises(ValueError, match="Normalize"):
        G.normalisation_of(lambda x: x)


def _loader(start: int, stop: int, overlap: bool) -> list:
    rng = np.random.default_rng(0)
    sources = [G.ArraySource(rng.integers(0, 256, (10, 3, 20, 20), dtype=np.uint8), np.arange(10) % 3)
               for _ in range(2)]
    return list(G.DeviceBatches(sources, [0, 2], batch_size=4, seed=3, start=start, stop=stop, device="cpu",
                                size=16, mean=MEAN, std=STD, index_fn=batch_indices, overlap=overlap))


def test_device_batches_resume_and_overlap_are_exact():
    full = _loader(0, 5, overlap=True)
    assert len(full) == 5 and len(full[0]) == 2 and full[0][0][0].shape == (4, 3, 16, 16)
    resumed = _loader(3, 5, overlap=True)
    inline = _loader(0, 5, overlap=False)
    for a, b in zip(full[3:], resumed):
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for a, b in zip(full, inline):
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


# ----------------------------------------------------------------------------- crops in original coordinates
CACHED = 64  # originals are cached as 64 x 64 squares


def _torchvision_boxes(n: int, original: tuple[int, int]) -> np.ndarray:
    """n independent (top, left, height, width) draws of torchvision's RandomResizedCrop on the original."""
    torch.manual_seed(12345)
    img = torch.empty(3, *original, dtype=torch.uint8)
    return np.array([v2.RandomResizedCrop.get_params(img, scale=list(G.SCALE), ratio=list(G.RATIO)) for _ in range(n)],
                    dtype=np.float64)


def _in_original(crop: torch.Tensor, original: tuple[int, int]) -> np.ndarray:
    """Cached-image boxes mapped back to the original's pixels (whole pixels: float32 rounding undone)."""
    sy, sx = original[0] / CACHED, original[1] / CACHED
    return np.round(crop.double().numpy() * np.array([sy, sx, sy, sx]), 3)


def _scale_and_log_aspect(boxes: np.ndarray, original: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    return boxes[:, 2] * boxes[:, 3] / (original[0] * original[1]), np.log(boxes[:, 3] / boxes[:, 2])


def crop_statistics(boxes: np.ndarray, original: tuple[int, int]) -> dict:
    """Mean and 10/50/90% quantiles of crop scale and log-aspect (what the report quotes)."""
    scale, log_aspect = _scale_and_log_aspect(boxes, original)
    return {"scale_mean": scale.mean(), "scale_q": np.quantile(scale, [0.1, 0.5, 0.9]),
            "log_aspect_mean": log_aspect.mean(), "log_aspect_q": np.quantile(log_aspect, [0.1, 0.5, 0.9])}


def ks_2samp(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    at = np.concatenate([a, b])
    cdf = lambda x: np.searchsorted(np.sort(x), at, side="right") / len(x)  # noqa: E731
    return float(np.abs(cdf(a) - cdf(b)).max())


def _ours(n: int, original: tuple[int, int], with_sizes: bool = True) -> np.ndarray:
    sizes = np.tile(original, (n, 1)) if with_sizes else None
    return _in_original(G.sample_params(range(n), CACHED, CACHED, sizes).crop, original)


@pytest.mark.parametrize("original", [(1000, 1500), (1000, 2000)], ids=["3:2", "2:1"])
def test_crop_distribution_matches_torchvision_on_the_original(original):
    """Scale and aspect, in the original image's coordinates, distributed as torchvision's on the
    original (two-sample KS, 2000 draws each); drawing on the cached square (the old way) fails.

    On a 2:1 image no draw of scale >= 0.7 and aspect <= 4:3 fits, so torchvision always falls back
    to the central 4:3 crop (scale 2/3): the reference path never crops such images at random."""
    n = 2000
    ref = _torchvision_boxes(n, original)
    ref_scale, ref_aspect = _scale_and_log_aspect(ref, original)
    ours = _ours(n, original)
    scale, aspect = _scale_and_log_aspect(ours, original)
    assert ks_2samp(scale, ref_scale) < 0.06 and ks_2samp(aspect, ref_aspect) < 0.06
    assert (ours[:, :2] >= 0).all() and (ours[:, 0] + ours[:, 2] <= original[0]).all()
    assert (ours[:, 1] + ours[:, 3] <= original[1]).all()
    _, squashed_aspect = _scale_and_log_aspect(_ours(n, original, with_sizes=False), original)
    assert ks_2samp(squashed_aspect, ref_aspect) > 0.5
    if original == (1000, 2000):
        assert (ref == [0, 333, 1000, 1333]).all() and (ours == [0, 333, 1000, 1333]).all()


def test_crop_box_is_torchvisions_box_on_the_original_under_the_same_seed():
    """Not only the same distribution: the same draws, so the same part of the original image."""
    original = (1000, 1500)
    seeds = list(range(50, 90))
    ours = _in_original(G.sample_params(seeds, CACHED, CACHED, np.tile(original, (len(seeds), 1))).crop, original)
    crop = v2.RandomResizedCrop(32, scale=G.SCALE, ratio=G.RATIO)
    img = torch.empty(3, *original, dtype=torch.uint8)
    for k, s in enumerate(seeds):
        torch.manual_seed(s)
        p = crop.make_params([img])
        assert ours[k].tolist() == [p["top"], p["left"], p["height"], p["width"]]


def test_device_batches_draw_crops_on_the_original_size():
    """ArraySource's sizes reach the crop draw: each image's own original size, by batch index."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 3, 20, 20), dtype=np.uint8)
    sizes = np.stack([np.full(10, 100), 100 + 20 * np.arange(10)], axis=1)
    src = G.ArraySource(images, np.arange(10) % 3, sizes=sizes)
    batches = G.DeviceBatches([src], [0], batch_size=4, seed=3, start=0, stop=1, device="cpu", size=16,
                              mean=MEAN, std=STD, index_fn=batch_indices, overlap=False)
    _, _, params = batches._host(0)
    idx = batch_indices(10, 4, 3, 0, 0)
    g = torch.Generator()
    for k, (seed, i) in enumerate(zip(G.step_seeds(3, 0, 0, 4), idx)):
        g.manual_seed(seed)
        top, left, h, w = G._crop_params(g, int(sizes[i, 0]), int(sizes[i, 1]))  # drawn on image i's original
        sy, sx = 20 / sizes[i, 0], 20 / sizes[i, 1]
        assert params.crop[k].tolist() == pytest.approx([top * sy, left * sx, h * sy, w * sx], abs=1e-4)
    with pytest.raises(ValueError, match="sizes must be"):
        G.ArraySource(images, np.arange(10), sizes=np.ones((3, 2)))
