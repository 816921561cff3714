"""The image and trunk caches under hostile conditions (issue 27 items 3-4): a full disk gives a
message instead of SIGBUS and leaves nothing behind, temporaries of killed writers are cleared by the
next lock holder, and a trunk cache file that lost rows or was computed another way is not trusted."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_train import VOLATILE, tiny_config

import vldlib.data.cache as C
from vldlib.loop import batches as B
from vldlib.loop.train import train
from vldlib.utils import computed_once, read_jsonl


def _samples(bench: Path) -> list[tuple[str, int]]:
    return [(str(p), i % 3) for i, p in enumerate(sorted((bench / "d0").rglob("*.png")))]


def _tmps(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


# ----------------------------------------------------------------------------- full disk

def test_a_full_disk_is_refused_before_the_image_cache_is_mapped(fake_benchmark, tmp_path, monkeypatch):
    """Before: the run died by SIGBUS (exit 135, no message) writing the memory map, and its .tmp kept the space."""
    samples = _samples(fake_benchmark)
    monkeypatch.setattr(C.shutil, "disk_usage", lambda p: SimpleNamespace(total=10**9, used=10**9, free=2**20))
    with pytest.raises(C.CacheSpaceError) as e:
        C.cached_domain(samples, 512, name="d0", progress=False, root=tmp_path / "cache")
    need = len(samples) * 3 * 512 * 512 / 2**20
    folder = next((tmp_path / "cache" / "images").iterdir())
    assert str(e.value) == (f"{folder}: no space for the decoded-image cache of d0 at 512px: {need:.0f} MB needed, "
                            f"1 MB free on that disk. Free space there, or set VLDLIB_CACHE to a folder on a bigger "
                            f"disk, and run the same command again (nothing was left behind).")
    assert _tmps(tmp_path / "cache") == [] and not (folder / "images.u8").exists()


def test_a_disk_filled_meanwhile_fails_the_allocation_not_the_map(fake_benchmark, tmp_path, monkeypatch):
    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(C.os, "posix_fallocate", full, raising=False)
    with pytest.raises(C.CacheSpaceError, match=r"no space for the decoded-image cache of d0 at 32px: 0 MB needed"):
        C.cached_domain(_samples(fake_benchmark), 32, name="d0", progress=False, root=tmp_path / "cache")
    assert _tmps(tmp_path / "cache") == []


def test_the_image_cache_is_unchanged_with_room_to_spare(fake_benchmark, tmp_path):
    samples = _samples(fake_benchmark)
    images, labels = C.cached_domain(samples, 32, name="d0", progress=False, root=tmp_path / "cache")
    assert np.array_equal(images, C.decode_images(samples, 32, progress=False))
    assert list(labels) == [y for _, y in samples]


# ----------------------------------------------------------------------------- orphaned temporaries

def test_the_next_lock_holder_clears_temporaries_of_killed_writers(fake_benchmark, tmp_path):
    """Before: half-written .images.u8.*.tmp and .KEY.pt.*.tmp files of killed processes stayed for ever."""
    samples = _samples(fake_benchmark)
    C.cached_domain(samples, 32, name="d0", progress=False, root=tmp_path / "cache")
    folder = next((tmp_path / "cache" / "images").iterdir())
    orphan = folder / ".images.u8.k1ll3d.tmp"
    orphan.write_bytes(b"\0" * 4096)
    keep = folder / ".other.k1ll3d.tmp"  # not a temporary of this file: left alone
    keep.write_text("")
    C.cached_domain(samples, 32, name="d0", progress=False, root=tmp_path / "cache")
    assert not orphan.exists() and keep.exists()

    trunk = tmp_path / "cache" / "trunk" / "0123456789abcdef.pt"
    trunk.parent.mkdir(parents=True)
    dead = trunk.parent / ".0123456789abcdef.pt.x7_q2.tmp"
    dead.write_bytes(b"half")
    with computed_once(trunk):
        assert not dead.exists()


# ----------------------------------------------------------------------------- trunk cache integrity

def _trunk_file() -> Path:
    files = list((C.cache_root() / "trunk").glob("*.pt"))
    assert len(files) == 1, files
    return files[0]


def _stable(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in read_jsonl(run / "records.jsonl")]


def test_a_trunk_cache_file_missing_rows_is_recomputed(fake_benchmark, tmp_path, monkeypatch):
    """Before: a trunk cache holding half its rows was trusted (exit 0, other accuracies)."""
    monkeypatch.setenv("VLDLIB_CACHE", str(tmp_path / "cache"))
    common = dict(benchmark=str(fake_benchmark), cache_trunk=True, augment=False, train_stages=1, steps=4,
                  eval_every=4, average_from=4)
    train(tiny_config(tmp_path, dropout=0.5, **common))  # the trunk's weights are the seed's
    path = _trunk_file()
    entry = torch.load(path, weights_only=True)
    x, y = entry["evals"]["env0_in"]
    n = len(y)
    entry["evals"]["env0_in"] = (x[: n // 2], y[: n // 2])  # half its rows
    torch.save(entry, path)

    cut = train(tiny_config(tmp_path, dropout=0.0, **common))
    assert len(torch.load(_trunk_file(), weights_only=True)["evals"]["env0_in"][1]) == n  # recomputed, whole
    path.unlink()
    fresh = train(tiny_config(tmp_path, dropout=0.0, **common, out=str(tmp_path / "fresh")))
    assert _stable(cut) == _stable(fresh)


def test_a_trunk_cache_file_with_altered_values_is_recomputed(tmp_path):
    evals = {"env0_in": (torch.randn(4, 3), torch.arange(4)), "env0_out": (torch.randn(2, 3), torch.arange(2))}
    entry = B._trunk_cache_entry(evals, "k")
    rows = {"env0_in": 4, "env0_out": 2}
    assert B._trusted_evals(entry, "k", rows) is evals
    assert B._trusted_evals(entry, "other", rows) is None  # another key of its inputs
    assert B._trusted_evals(entry, "k", {"env0_in": 4, "env0_out": 3}) is None  # other row counts
    altered = {**entry, "evals": {**evals, "env0_out": (torch.zeros(2, 3), torch.arange(2))}}
    assert B._trusted_evals(altered, "k", rows) is None  # checksum
    assert B._trusted_evals({"evals": evals}, "k", rows) is None  # written before rows and checksums
    path = tmp_path / "t.pt"
    path.write_bytes(b"garbage")
    assert B._load_trunk_cache(path, "k", rows) is None and not path.exists()


def test_device_and_precision_are_part_of_the_trunk_cache_key(tmp_path):
    """bf16 outputs on a GPU and fp32 outputs on a CPU must not share one file."""
    net = SimpleNamespace(trunk_modules=[torch.nn.Linear(2, 2)])
    data = SimpleNamespace(key="samples")
    fp32 = tiny_config(tmp_path)
    bf16 = tiny_config(tmp_path, bf16=True)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    keys = {B._trunk_key(net, data, c, d) for c in (fp32, bf16) for d in (cpu, cuda)}
    assert len(keys) == 4
    assert B._trunk_key(net, data, fp32, cpu) == B._trunk_key(net, data, fp32, torch.device("cpu"))


def test_no_orphan_check_runs_where_nothing_is_locked(tmp_path):
    """Temporaries are cleared only under the file's own lock: another file's stay."""
    other = tmp_path / ".b.pt.x.tmp"
    other.write_text("")
    with computed_once(tmp_path / "a.pt"):
        pass
    assert other.exists() and os.path.exists(tmp_path / "a.pt.lock")
