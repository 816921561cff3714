"""Checks on load, splits and the decoded-image cache, on tiny fake folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from vldlib.data import DataError, load_benchmark, split_domain
from vldlib.data.cache import cached_benchmark
from vldlib.data.datasets import ArrayDataset, ImageDataset
from vldlib.data.transforms import eval_transform

from conftest import make_fake_benchmark


def test_loads_domains_classes_and_labels(fake_benchmark):
    ds = load_benchmark(fake_benchmark)
    assert ds.domains == ["d0", "d1", "d2"] and ds.classes == ["a", "b", "c"]
    assert [len(s) for s in ds.samples] == [18, 18, 18]
    assert all(Path(p).parent.name == ds.classes[y] for dom in ds.samples for p, y in dom)


def test_missing_class_in_one_domain_names_it(fake_benchmark):
    shutil.rmtree(fake_benchmark / "d1" / "b")
    with pytest.raises(DataError, match=r"d1.*lacks class folder\(s\) \['b'\].*labels shift"):
        load_benchmark(fake_benchmark)


def test_empty_class_and_empty_domain(fake_benchmark):
    for f in (fake_benchmark / "d2" / "c").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"class 'c' of domain 'd2' has no usable images"):
        load_benchmark(fake_benchmark)
    shutil.rmtree(fake_benchmark / "d2")
    (fake_benchmark / "d2").mkdir()
    with pytest.raises(DataError, match=r"domain 'd2' has no class folders \(empty domain\)"):
        load_benchmark(fake_benchmark)


def test_non_image_and_corrupt_files_fail_or_are_skipped_with_a_count(fake_benchmark, capsys):
    (fake_benchmark / "d0" / "a" / "notes.docx").write_text("x")
    with pytest.raises(DataError, match=r"notes.docx: not an image file.*skip_bad"):
        load_benchmark(fake_benchmark)
    (fake_benchmark / "d0" / "a" / "notes.docx").unlink()
    good = next((fake_benchmark / "d1" / "b").iterdir())
    good.write_bytes(good.read_bytes()[:60])  # truncated PNG
    (fake_benchmark / "d2" / "c" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"2 unreadable image\(s\).*zero-byte"):
        load_benchmark(fake_benchmark)
    ds = load_benchmark(fake_benchmark, skip_bad=True)
    assert len(ds.skipped) == 2 and [len(s) for s in ds.samples] == [18, 17, 18]
    assert "skipped 2 bad file(s)" in capsys.readouterr().out


def test_missing_folder_and_unknown_benchmark(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_benchmark(tmp_path / "nope")
    with pytest.raises(KeyError, match="Did you mean PACS"):
        load_benchmark("PACZ", tmp_path)
    with pytest.raises(DataError, match=r"domain folder\(s\) 'cartoon'.*data download PACS"):
        (tmp_path / "PACS" / "art_painting").mkdir(parents=True)
        load_benchmark("PACS", tmp_path)


def test_splits_depend_on_trial_seed_only():
    a_in, a_out = split_domain(100, trial_seed=0, domain_index=1)
    b_in, b_out = split_domain(100, trial_seed=0, domain_index=1)
    c_in, c_out = split_domain(100, trial_seed=1, domain_index=1)
    assert len(a_out) == 20 and len(a_in) == 80 and not set(a_in) & set(a_out)
    assert np.array_equal(a_out, b_out) and not np.array_equal(a_out, c_out)
    d_in, d_out = split_domain(100, trial_seed=0, domain_index=2)
    assert not np.array_equal(a_out, d_out)  # each domain its own draw


def test_group_split_holds_out_the_same_objects_in_every_domain():
    groups = [f"g{i}" for i in range(50)]
    outs = [set(np.array(groups)[split_domain(50, 3, d, groups=groups)[1]]) for d in range(3)]
    assert outs[0] == outs[1] == outs[2] and 3 <= len(outs[0]) <= 20


def test_decoded_cache_has_the_same_samples_and_labels(tmp_path, monkeypatch):
    monkeypatch.setenv("VLDLIB_CACHE", str(tmp_path / "cache"))
    root = make_fake_benchmark(tmp_path / "jpg", per_class=3, ext=".jpg")
    bench = load_benchmark(root)
    arrays = cached_benchmark(bench, 24, progress=False)
    tf = eval_transform(24)
    for (images, labels), samples in zip(arrays, bench.samples):
        assert list(labels) == [y for _, y in samples]
        plain, cached = ImageDataset(samples, tf), ArrayDataset(images, labels, tf)
        for i in range(len(samples)):
            (xp, yp), (xc, yc) = plain[i], cached[i]
            assert yp == yc
            assert (xp - xc).abs().mean() < 0.05  # same image; resize order differs slightly
    again = cached_benchmark(bench, 24, progress=False)  # second call reads the memory map
    assert np.array_equal(again[0][0], arrays[0][0])
