"""Near-duplicate images of one ObjectStyles domain, grouped so that a group stays on one side of the
in/out split.

Why: openclipart ships recoloured and exact copies of some drawings under other names, and an
emoji set may draw two code points alike. The 80/20 split is applied to objects
(`splits.object_of`, the file stem up to its first dot), so a copy under another object would be
trained on ("in") while its twin selects the model ("out"). Near-duplicates are found by a
perceptual hash of the image as stored (already composited on white, cropped and fitted, so
framing and size do not hide a copy) and made one object by their file names: every file of a
group that is not the group's first object gets that object's name as a prefix
(`animals-birds-hen2` -> `animals-birds-hen.animals-birds-hen2`). So the one rule that groups
files stays `object_of` of the file name, and a loader by path, `data verify` and DomainBed's
ImageFolder need nothing new. Grouping depends on the pixels and sorted names only: deterministic.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vldlib.data.splits import object_of

if TYPE_CHECKING:
    from PIL.Image import Image

HASH_RESOLUTION = 128
"""Every image is hashed at this size (the default build resolution, at which the thresholds below
were measured), so a build at another resolution groups by the same rule: at 48 px, JPEG noise in a
flat fill alone flips 20 dHash bits. A build at another size hashes the images drawn at this size
(the builder passes them as `hashed`), not its own shrunk: shrinking a 256 px JPEG to 128 px moved
borderline pairs (lemon / lime halves, two apples) across the thresholds, and so changed the split."""

HASH_SIZE = 16
"""Difference hash (dHash): the grayscale image shrunk to (HASH_SIZE+1) x HASH_SIZE, bit (r, c) set when
pixel (r, c+1) is brighter than (r, c): 256 bits. It sees fills and shading, so it finds exact and
recoloured copies (lemon/lime, colour/grey gears) that keep their shading."""

MAX_HAMMING = 14
"""dHash near-duplicates differ in at most this many of 256 bits. Measured on openclipart (every
pair of the built `clipart` under 30 bits was looked at): copies and recolourings are at 0-14; from
15 on, distinct thin objects on white collide (a hammer and a scalpel at 15, a rake and a shovel at
17), because a mostly white thumbnail has few gradients to differ in."""

EDGE_GRID = 24
"""Edge hash: the cells of a EDGE_GRID x EDGE_GRID grid that hold an outline (PIL FIND_EDGES of the
grayscale image, cell mean over EDGE_LEVEL). It ignores colour and fill, so it finds what dHash
cannot: a colour drawing and its black-and-white outline version (`orange_wedge` and
`orange_wedge_bw` are 25 dHash bits apart)."""
EDGE_LEVEL = 8.0

MAX_EDGE_DISTANCE = 0.06
"""Edge near-duplicates: a Jaccard distance (1 - shared edge cells / edge cells of either) of at most
this. A ratio, not a bit count, so sparse thin drawings are not near just for being mostly white.
Measured on the built `clipart`: colour/outline pairs at 0-0.05, the closest distinct drawings at
0.075 (a corn cob and a piano, dense images that fill every cell), next 0.09."""


def duplicate_rule() -> dict:
    """The hashes and thresholds, as recorded in the manifest and the README."""
    return {"dhash": f"difference hash, grayscale {HASH_SIZE + 1}x{HASH_SIZE}, {HASH_SIZE ** 2} bits",
            "max_hamming": MAX_HAMMING,
            "edge_hash": f"FIND_EDGES cells over {EDGE_LEVEL:g} on a {EDGE_GRID}x{EDGE_GRID} grid",
            "max_edge_distance": MAX_EDGE_DISTANCE, "hashed_at_px": HASH_RESOLUTION}


def dhash(img: "Image") -> np.ndarray:
    """The HASH_SIZE**2-bit difference hash of an RGB image on white, as a bool array."""
    from PIL import Image

    g = np.asarray(img.convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.LANCZOS), dtype=np.int16)
    return (g[:, 1:] > g[:, :-1]).ravel()


def edge_hash(img: "Image") -> np.ndarray:
    """The EDGE_GRID**2 cells of an RGB image on white that hold an outline, as a bool array."""
    from PIL import Image, ImageFilter

    e = img.convert("L").filter(ImageFilter.FIND_EDGES).resize((EDGE_GRID, EDGE_GRID), Image.Resampling.BOX)
    return (np.asarray(e, dtype=float) > EDGE_LEVEL).ravel()


def near_pairs(images: Sequence["Image"]) -> np.ndarray:
    """n x n bool: images i and j are near-duplicates by either hash (dHash bits <= MAX_HAMMING, or
    edge-cell Jaccard distance <= MAX_EDGE_DISTANCE), both taken at HASH_RESOLUTION."""
    from PIL import Image

    if not images:
        return np.zeros((0, 0), bool)
    size = (HASH_RESOLUTION, HASH_RESOLUTION)
    images = [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in images]
    d = np.stack([dhash(im) for im in images]).astype(np.int8)
    e = np.stack([edge_hash(im) for im in images])
    bits = (d[:, None, :] != d[None, :, :]).sum(-1)
    inter = (e[:, None, :] & e[None, :, :]).sum(-1)
    union = (e[:, None, :] | e[None, :, :]).sum(-1)
    jaccard = 1.0 - inter / np.maximum(union, 1)
    return (bits <= MAX_HAMMING) | (jaccard <= MAX_EDGE_DISTANCE)


def near_duplicate_groups(stems: Sequence[str], near: np.ndarray) -> list[list[str]]:
    """Groups of objects (`object_of` of the stems) with any two of their images near (`near_pairs`),
    joined transitively; only groups of two or more objects, each sorted, sorted by first member."""
    objects = sorted({object_of(s) for s in stems})
    index = {o: i for i, o in enumerate(objects)}
    parent = list(range(len(objects)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(*np.nonzero(np.triu(np.asarray(near, bool), 1))):
        ra, rb = root(index[object_of(stems[a])]), root(index[object_of(stems[b])])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[str]] = {}
    for o in objects:
        members.setdefault(root(index[o]), []).append(o)
    return sorted((m for m in members.values() if len(m) > 1), key=lambda m: m[0])


def grouped_stem(stem: str, groups: list[list[str]]) -> str:
    """The file stem that puts `stem` in its near-duplicate group: prefixed by the group's first
    object unless it is that object (its `object_of` is then the group's)."""
    obj = object_of(stem)
    for g in groups:
        if obj in g[1:]:
            return f"{g[0]}.{stem}"
    return stem


def group_domain(folder: Path, hashed: dict[str, bytes] | None = None) -> list[dict]:
    """Find the near-duplicate groups among `folder/<class>/*.jpg` (one domain, as stored) and rename
    their files so that each group is one object; return the groups as
    {"objects": [...], "files": ["class/new name.jpg", ...], "classes": [...]}.

    `hashed` ("class/name.jpg" -> JPEG bytes of every file) gives the images to hash instead of the
    stored ones: a build at another size passes the same images drawn at HASH_RESOLUTION px, so
    that its groups are the default build's, bit for bit.

    A group whose files lie in two classes cannot be kept whole by file names (the loader's group
    key is class/object); it is returned with both classes, and the builder reports it.
    """
    import io

    from PIL import Image

    paths = sorted(folder.glob("*/*.jpg"))
    images = []
    for p in paths:
        rel = f"{p.parent.name}/{p.name}"
        if hashed is not None and rel not in hashed:
            raise ValueError(f"no image to hash for {p}: `hashed` must hold every stored file of {folder}")
        with Image.open(p if hashed is None else io.BytesIO(hashed[rel])) as im:
            images.append(im.convert("RGB"))
    stems = [p.stem for p in paths]
    groups = near_duplicate_groups(stems, near_pairs(images))
    out = []
    for g in groups:
        files, classes = [], set()
        for p in paths:
            if object_of(p.stem) in g:
                new = p.with_name(grouped_stem(p.stem, groups) + p.suffix)
                if new != p:
                    os.replace(p, new)
                files.append(f"{p.parent.name}/{new.name}")
                classes.add(p.parent.name)
        out.append({"objects": g, "files": sorted(files), "classes": sorted(classes)})
    return out
