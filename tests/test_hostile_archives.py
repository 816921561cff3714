"""Hostile archives, full disks and hostile images (issue 15, items 1, 2, 3 and 7).

Each test builds its hostile file in memory and checks what must hold: nothing outside the data
folder is written or removed, the downloaded archive survives a full disk, and bad images are
named and skippable like any other bad file.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import make_fake_benchmark
from PIL import Image
from test_download import _png, make_tar, make_zip, small, tree

from vldlib.cli import main as cli_main
from vldlib.data import DataError, load_benchmark
from vldlib.data.archives import (
    ArchiveError,
    ExpandsTooLarge,
    NoSpaceError,
    safe_extract,
)
from vldlib.data.datasets import ImageDataset
from vldlib.data.download import (
    MAX_BYTES_PER_IMAGE,
    MIN_EXTRACT_CAP,
    download_benchmark,
    expanded_size_cap,
)
from vldlib.data.folder import check_image, to_rgb
from vldlib.data.layout import _apply_remove_list
from vldlib.data.registry import get_spec

DEPTH = 12  # deep enough that DEPTH '..' from inside the tree reach '/'


def _chain(prefix: str) -> list[tuple[str, str]]:
    """The issue's chain: x -> a deep folder, y -> x/ + '..' * DEPTH (inside while x is deep),
    then x re-pointed to '.', after which y resolves DEPTH levels above `prefix`: '/'."""
    deep = "/".join(f"l{i}" for i in range(DEPTH))
    return [(f"{prefix}x", deep), (f"{prefix}y", "x/" + "/".join([".."] * DEPTH)), (f"{prefix}x", ".")]


# ------------------------------------------------------------------------- 1. links out of the tree

def test_repointed_link_chain_is_refused_and_nothing_outside_changes(tmp_path):
    """Generic extraction (links allowed when they stay inside): the re-pointing entry is refused,
    so no link in the tree ever resolves outside it."""
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    deep = "/".join(f"l{i}" for i in range(DEPTH))
    blob = make_tar({f"B/{deep}/keep.png": _png(0)}, links=_chain("B/"), mode="w")
    archive = tmp_path / "chain.tar"
    archive.write_bytes(blob)
    dest = tmp_path / "data" / "x"
    with pytest.raises(ArchiveError, match=r"chain\.tar: refusing entry 'B/x': a link replacing an earlier"):
        safe_extract(archive, dest, progress=False)
    assert sentinel.read_text() == "keep me"
    for p in dest.rglob("*"):  # whatever was extracted before the refusal stays inside
        assert os.path.commonpath([os.path.realpath(p), os.path.realpath(dest)]) == os.path.realpath(dest)


def test_domain_net_removal_list_through_the_chain_keeps_the_outside_file(tmp_path, monkeypatch):
    """The exact attack: a tar named clipart.zip holding the chain inside clipart/dog/, and a
    duplicate-removal list line that goes through it to a file outside the data folder."""
    monkeypatch.setenv("VLDLIB_MIRROR", "http://127.0.0.1:9")  # every source is given by hand
    sentinel = tmp_path / "outside" / "sentinel.txt"
    sentinel.parent.mkdir()
    sentinel.write_text("keep me")
    spec = small("DomainNet", ["dog"], per_class=2)
    hand = []
    for d in spec.domains:
        entries = tree("", [d], spec.classes)
        if d == "clipart":
            blob = make_tar(entries, links=_chain("clipart/dog/"), mode="w")  # a tar under a .zip name
        else:
            blob = make_zip(entries)
        (tmp_path / f"{d}.zip").write_bytes(blob)
        hand.append(tmp_path / f"{d}.zip")
    removal = tmp_path / "domain_net_duplicates.txt"
    removal.write_text(f"clipart/dog/y{sentinel}\n")  # y resolves to '/', then the sentinel's path
    hand.append(removal)
    with pytest.raises(ArchiveError, match=r"clipart\.zip: refusing entry 'clipart/dog/x': a link"):
        download_benchmark(spec, tmp_path / "data", archive=hand, progress=False)
    assert sentinel.read_text() == "keep me"
    assert not (tmp_path / "data" / "domain_net").exists()


def test_removal_list_never_follows_a_link_nor_removes_one(tmp_path):
    """Even with a link to '/' already in the tree (however it came), a removal through it is
    refused, and a listed link (not a regular file) is not removed."""
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("keep me")
    out = tmp_path / "data" / "domain_net"
    (out / "real" / "dog").mkdir(parents=True)
    (out / "real" / "dog" / "a.png").write_bytes(_png(0))
    os.symlink("/", out / "real" / "dog" / "root")
    os.symlink("a.png", out / "real" / "dog" / "alias.png")
    listing = tmp_path / "dups.txt"
    listing.write_text(f"real/dog/root{sentinel}\n")
    with pytest.raises(ArchiveError, match=r"resolves to .*sentinel\.txt, outside .*refusing"):
        _apply_remove_list(out, listing)
    listing.write_text("real/dog/alias.png\n")
    with pytest.raises(ArchiveError, match=r"alias\.png: listed in dups\.txt for removal but it is not a plain file"):
        _apply_remove_list(out, listing)
    assert sentinel.read_text() == "keep me" and (out / "real" / "dog" / "alias.png").is_symlink()
    listing.write_text("real/dog/a.png\n")
    assert _apply_remove_list(out, listing) == 1 and not (out / "real" / "dog" / "a.png").exists()


def test_link_into_a_benchmark_folder_is_refused(tmp_path, monkeypatch):
    """A benchmark archive with a link inside a class folder (to '/' or inside) installs nothing."""
    monkeypatch.setenv("VLDLIB_MIRROR", "http://127.0.0.1:9")
    spec = small("PACS", ["dog"])
    blob = make_tar(tree("kfold/", spec.domains, spec.classes), links={"kfold/photo/dog/root": "../../dog"}, mode="w")
    (tmp_path / "PACS.zip").write_bytes(blob)
    with pytest.raises(ArchiveError, match=r"PACS\.zip: refusing entry 'kfold/photo/dog/root': a link"):
        download_benchmark(spec, tmp_path / "data", archive=tmp_path / "PACS.zip", progress=False)
    assert not (tmp_path / "data" / "PACS").exists()


# ------------------------------------------------------------------------------------ 2. zip bombs

def _zeros_zip(n_bytes: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf, zf.open("kfold/photo/dog/big.png", "w") as f:
        chunk = bytes(1 << 20)
        for _ in range(n_bytes >> 20):
            f.write(chunk)
    return buf.getvalue()


def test_expanded_size_cap_follows_the_expected_counts():
    pacs, net = get_spec("PACS"), get_spec("DomainNet")
    assert expanded_size_cap(pacs) == max(MIN_EXTRACT_CAP, 9991 * MAX_BYTES_PER_IMAGE)
    assert expanded_size_cap(net) == 586_575 * MAX_BYTES_PER_IMAGE
    assert expanded_size_cap(small("PACS", ["dog"])) == MIN_EXTRACT_CAP  # 8 images: the floor


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_zip_bomb_is_refused_with_the_cap_named_and_the_download_kept(kind, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLDLIB_MIRROR", "http://127.0.0.1:9")
    size = 8 << 20
    if kind == "zip":
        blob = _zeros_zip(size)
    else:
        blob = make_tar({"kfold/photo/dog/big.png": bytes(size)}, mode="w:gz")
    assert len(blob) < size // 50  # a real bomb: tiny on disk
    archive = tmp_path / "PACS.zip"
    archive.write_bytes(blob)
    with pytest.raises(ExpandsTooLarge, match=r"expands to more than 4 MB.*zip bomb.*--max-extract-mb"):
        download_benchmark(small("PACS", ["dog"]), tmp_path / "data", archive=archive, progress=False,
                           max_extract_bytes=4 << 20)
    assert archive.exists() and not list((tmp_path / "data").rglob("big.png"))
    rc = cli_main(["data", "download", "PACS", "--data-dir", str(tmp_path / "data"), "--archive", str(archive),
                   "--max-extract-mb", "4", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: PACS: ") and "expands to more than 4 MB" in err and "Traceback" not in err


# ----------------------------------------------------------------------------------- 3. full disk

@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
@pytest.mark.parametrize("keep", [False, True])
def test_full_disk_keeps_the_download_and_says_no_space(kind, keep, tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of extraction: 'no space left on DEVICE: N MB free, about M MB
    needed', the downloaded archive kept (with or without --keep-downloads), nothing installed."""
    from test_download import FileServer

    spec = small("VLCS", ["dog"], per_class=3)
    entries = tree("VLCS/", spec.domains, spec.classes, per_class=3)
    srv = FileServer()
    monkeypatch.setenv("VLDLIB_MIRROR", srv.url)
    srv.files["VLCS.tar.gz"] = make_zip(entries) if kind == "zip" else make_tar(entries)
    real_open, written = open, []

    def full_open(path, mode="r", *a, **k):
        if "w" in str(mode) and "extract" in str(path) and str(path).endswith(".png"):
            written.append(path)
            if len(written) > 3:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **k)

    import builtins

    data = tmp_path / "data"
    try:
        monkeypatch.setattr(builtins, "open", full_open)
        monkeypatch.setattr(tarfile, "bltn_open", full_open)  # tarfile keeps its own name for open
        with pytest.raises(NoSpaceError) as e:
            download_benchmark(spec, data, progress=False, keep_downloads=keep)
    finally:
        monkeypatch.setattr(builtins, "open", real_open)
        monkeypatch.setattr(tarfile, "bltn_open", real_open)
        srv.close()
    assert written  # the disk filled during extraction, not before
    msg = str(e.value)
    assert msg.startswith("no space left on /") and " MB free, about " in msg and " MB needed" in msg, msg
    assert "corrupt" not in msg and "The archive is kept" in msg
    assert (data / ".downloads" / "VLCS.tar.gz").stat().st_size > 0  # kept for the next run
    assert not (data / "VLCS").exists() and not list(data.glob(".VLCS.partial-*"))


def test_full_disk_message_through_the_cli(tmp_path, monkeypatch, capsys):
    import builtins

    spec_entries = tree("kfold/", get_spec("PACS").domains, ["dog"])
    archive = tmp_path / "PACS.zip"
    archive.write_bytes(make_zip(spec_entries))
    real_open = open

    def full_open(path, mode="r", *a, **k):
        if "w" in str(mode) and "extract" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(builtins, "open", full_open)
    rc = cli_main(["data", "download", "PACS", "--data-dir", str(tmp_path / "data"), "--archive", str(archive),
                   "--quiet"])
    monkeypatch.setattr(builtins, "open", real_open)
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: no space left on ") and "Traceback" not in err, err
    assert archive.exists()


# -------------------------------------------------------------------------------------- 7. images

def _png16(path: Path, values: np.ndarray) -> None:
    Image.fromarray(values.astype(np.uint16)).save(path)  # PIL writes mode I;16 as a 16-bit grey PNG


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).round()
    _png16(tmp_path / "g16.png", ramp)
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really 16 bits on disk
        rgb = np.asarray(to_rgb(im))
    expected = np.round(ramp / 257).astype(np.uint8)  # 65535 -> 255, computed here from the ramp
    assert rgb.shape == (64, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert (rgb == 255).mean() < 0.01  # before: 99.6% of this ramp became 255
    ds = ImageDataset([(str(tmp_path / "g16.png"), 0)], transform=lambda im: np.asarray(im))
    assert np.abs(ds[0][0][..., 1].astype(int) - expected).max() <= 1


def _bomb_png(path: Path, width: int, height: int) -> None:
    """A valid PNG header claiming width x height pixels (1-bit grey), with a tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
                     + chunk(b"IEND", b""))


def test_dangling_symlink_and_decompression_bomb_are_named_and_skippable(tmp_path, capsys):
    root = tmp_path / "fake"
    make_fake_benchmark(root, per_class=3)
    os.symlink(tmp_path / "gone.png", root / "d0" / "a" / "dangling.png")
    _bomb_png(root / "d1" / "b" / "bomb.png", 100_000, 100_000)  # 10^10 px > 2 x PIL's default limit
    assert check_image(root / "d1" / "b" / "bomb.png").startswith("decompression bomb")
    with pytest.raises(DataError, match=r"d0/a/dangling\.png: dangling symbolic link.*--skip-bad"):
        load_benchmark(root, progress=False)
    (root / "d0" / "a" / "dangling.png").unlink()
    with pytest.raises(DataError, match=r"d1/b/bomb\.png: decompression bomb.*--skip-bad"):
        load_benchmark(root, progress=False)
    os.symlink(tmp_path / "gone.png", root / "d0" / "a" / "dangling.png")
    ds = load_benchmark(root, progress=False, skip_bad=True)
    reasons = dict(ds.skipped)
    assert set(reasons) == {str(root / "d0" / "a" / "dangling.png"), str(root / "d1" / "b" / "bomb.png")}
    assert "skipped 2 bad file(s)" in capsys.readouterr().out


def test_bomb_below_the_hard_limit_is_caught_when_loading(tmp_path, monkeypatch):
    """A tiny Image.MAX_IMAGE_PIXELS makes an ordinary image a 'bomb': the loader names it."""
    (tmp_path / "x.png").write_bytes(_png(0, size=64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)
    assert check_image(tmp_path / "x.png").startswith("decompression bomb")
    ds = ImageDataset([(str(tmp_path / "x.png"), 0)], transform=lambda im: im)
    with pytest.raises(DataError, match=r"x\.png: cannot decode image \(Image size .*exceeds limit"):
        ds[0]
