"""ObjectStyles stored at another size (`ObjectStyles@256`, issue 23 section 1), on the tiny fake
package trees of test_objectstyles: its own folder and pin, the default build untouched, and the
same objects (so the same split) at every size."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("resvg_py")

from vldlib.data import get_spec, load_benchmark, split_domain  # noqa: E402
from vldlib.data import objectstyles as O  # noqa: E402
from vldlib.data import objectstyles_dedup as D  # noqa: E402

from test_objectstyles import _drawing, built, catalogue, roots  # noqa: E402,F401  (the fake packages)


def _layout(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.jpg"))


@pytest.fixture(scope="module")
def built256(tmp_path_factory, roots, catalogue) -> Path:  # noqa: F811
    """The registered variant's own builder (name, size and folder from the registry), on the fakes."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(O, "_emoji_catalogue", lambda: catalogue)
        return get_spec("ObjectStyles@256").builder(tmp_path_factory.mktemp("data"), roots=roots, progress=False,
                                                   min_per_class=1)


def test_the_variant_is_stored_at_its_size_in_its_own_folder(built256: Path):
    assert built256.name == "ObjectStyles@256" and get_spec("ObjectStyles@256").dirname == "ObjectStyles@256"
    m = json.loads((built256 / "manifest.json").read_text())
    assert m["resolution"] == 256 and m["name"] == "ObjectStyles@256" and m["split_by"] == "object"
    for p in built256.rglob("*.jpg"):
        with Image.open(p) as im:
            assert im.size == (256, 256)
    readme = (built256 / "README.md").read_text()
    assert readme.startswith("# ObjectStyles@256") and "data build ObjectStyles@256" in readme
    ds = load_benchmark("ObjectStyles@256", built256.parent, progress=False)
    assert ds.group_by_object and ds.domains == list(O.DOMAINS)
    assert not (built256.parent / "ObjectStyles").exists()  # the default build's folder is not touched


def test_every_size_holds_the_same_objects_and_split(built: Path, built256: Path, tmp_path: Path, roots,  # noqa: F811
                                                     catalogue, monkeypatch):  # noqa: F811
    """Same files, same near-duplicate groups, so the same in/out split, at 48, 128 and 256 px: a
    comparison of stored sizes compares pixels only."""
    monkeypatch.setattr(O, "_emoji_catalogue", lambda: catalogue)
    b128 = O.build_objectstyles(tmp_path, roots=roots, progress=False, min_per_class=1)
    assert _layout(built) == _layout(b128) == _layout(built256)
    groups = [json.loads((r / "manifest.json").read_text())["near_duplicates"]["groups"] for r in (built, b128, built256)]
    assert groups[0] == groups[1] == groups[2] and groups[0]["clipart"]  # the emperor pair, at every size
    for d in range(len(O.DOMAINS)):
        a, b = (load_benchmark(r, progress=False) for r in (b128, built256))
        splits = [split_domain(len(x.samples[d]), 0, d, 0.2, x.groups(d))[1].tolist() for x in (a, b)]
        assert splits[0] == splits[1]


def test_a_build_at_another_size_hashes_the_default_sizes_drawings(tmp_path: Path, monkeypatch, roots, catalogue):  # noqa: F811
    """The near-duplicate pass of a 64 px build is given every image drawn at HASH_RESOLUTION px (as
    JPEG), not its own 64 px files."""
    seen = {}

    def spy(folder, hashed=None):
        seen[folder.name] = (_layout(folder), hashed)
        return real(folder, hashed)

    real = D.group_domain
    monkeypatch.setattr(O, "group_domain", spy)
    monkeypatch.setattr(O, "_emoji_catalogue", lambda: catalogue)
    O.build_objectstyles(tmp_path, roots=roots, progress=False, min_per_class=1, resolution=64)
    for domain, (files, hashed) in seen.items():
        assert sorted(hashed) == files
        for data in hashed.values():
            with Image.open(io.BytesIO(data)) as im:
                assert im.format == "JPEG" and im.size == (D.HASH_RESOLUTION,) * 2


def test_groups_follow_the_images_given_to_hash(tmp_path: Path):
    """Two different drawings are one object when the images to hash say so, and not otherwise."""
    for name, seed in (("a", 1), ("b", 2)):
        _drawing(tmp_path / "src" / f"{name}.png", seed=seed)
        out = tmp_path / "dom" / "bird" / f"{name}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        O.fit_object(Image.open(tmp_path / "src" / f"{name}.png"), 64).save(out, quality=90)
    assert D.group_domain(tmp_path / "dom") == []
    same = O._jpeg_bytes(O.fit_object(Image.open(tmp_path / "src" / "a.png"), 128))
    groups = D.group_domain(tmp_path / "dom", {"bird/a.jpg": same, "bird/b.jpg": same})
    assert groups == [{"objects": ["a", "b"], "files": ["bird/a.b.jpg", "bird/a.jpg"], "classes": ["bird"]}]
    with pytest.raises(ValueError, match=r"no image to hash for .*a\.b\.jpg"):
        D.group_domain(tmp_path / "dom", {"bird/a.jpg": same})


def test_each_registered_size_is_checked_against_its_own_pin(tmp_path: Path, monkeypatch, roots, catalogue,  # noqa: F811
                                                             capsys):
    """Built from the pinned packages (here: the fakes in their place), the 256 px variant must give
    EXPECTED_FILES_SHA256_AT[256] and is refused otherwise; an unpinned size says it is unchecked."""
    from vldlib.data import objectstyles_sources as S

    monkeypatch.setattr(S, "package_roots", lambda **kw: roots)
    monkeypatch.setattr(O, "_emoji_catalogue", lambda: catalogue)
    monkeypatch.setattr(O, "MIN_PER_CLASS", 1)  # the pins hold for the default class minimum
    assert set(O.VARIANT_RESOLUTIONS) | {O.DEFAULT_RESOLUTION} == set(O.EXPECTED_FILES_SHA256_AT)
    pin = O.EXPECTED_FILES_SHA256_AT[256]
    assert len(pin) == 64 and pin != O.EXPECTED_FILES_SHA256
    with pytest.raises(O.ObjectStylesError, match=rf"not the expected {pin}.*EXPECTED_FILES_SHA256_AT\[256\]"):
        O.build_objectstyles(tmp_path, resolution=256, name="ObjectStyles@256", min_per_class=1, progress=False)
    assert not list(tmp_path.iterdir())  # nothing installed
    O.build_objectstyles(tmp_path, resolution=40, name="small", min_per_class=1)
    assert "no expected files sha256 is pinned for 40 px" in capsys.readouterr().out
    assert (tmp_path / "small/manifest.json").is_file()
    with pytest.raises(ValueError, match="one plain folder name"):
        O.build_objectstyles(tmp_path, resolution=40, name="../elsewhere", min_per_class=1)
