"""What the offline benchmark builders (emoji, ObjectStyles) share: the one crop-and-fit that makes
every domain's images alike, the versions they record in a build's manifest, and reading a previous
build's manifest to decide whether to rebuild."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL.Image import Image

FILL = 0.9  # the object's longest side covers 90% of the image, the same in every domain


def fit_on_white(rgba: "Image", bbox: tuple[int, int, int, int], resolution: int) -> "Image":
    """The drawing inside `bbox` on white, scaled so that its longest side is FILL x resolution and
    centred in a resolution x resolution RGB image (so no domain differs in framing or size)."""
    from PIL import Image  # the builders' dependency; importing vldlib.data must not need it

    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB").crop(bbox)
    w, h = rgb.size
    scale = FILL * resolution / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    rgb = rgb.resize(new, Image.Resampling.LANCZOS)
    out = Image.new("RGB", (resolution, resolution), (255, 255, 255))
    out.paste(rgb, ((resolution - new[0]) // 2, (resolution - new[1]) // 2))
    return out


def dist_version(dist: str) -> str:
    """The installed version of a PyPI distribution, or "not installed" (recorded, never fatal)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def read_manifest(root: Path) -> dict | None:
    """A built benchmark's manifest.json, or None when absent or damaged (the builder then rebuilds)."""
    try:
        return json.loads((Path(root) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
