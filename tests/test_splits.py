"""Our in/out splits are DomainBed's, item for item: checked against a re-implementation written
from DomainBed's code (misc.seed_hash, misc.split_dataset, train.py's call, torchvision's
ImageFolder order), not against vldlib's own functions."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision.datasets import ImageFolder

from vldlib.data import load_benchmark, split_domain
from vldlib.data.splits import out_files
from vldlib.utils import seed_hash


def domainbed_seed_hash(*args) -> int:
    # domainbed/lib/misc.py
    args_str = str(args)
    return int(hashlib.md5(args_str.encode("utf-8")).hexdigest(), 16) % (2**31)


def domainbed_out_files(root: Path, trial_seed: int, holdout_fraction: float = 0.2) -> dict[str, set[str]]:
    """DomainBed's MultipleEnvironmentImageFolder + train.py's split, on a folder."""
    environments = sorted(f.name for f in os.scandir(root) if f.is_dir())
    result = {}
    for env_i, environment in enumerate(environments):
        env = ImageFolder(str(root / environment))
        n = int(len(env) * holdout_fraction)
        keys = list(range(len(env)))  # misc.split_dataset(env, n, seed)
        np.random.RandomState(domainbed_seed_hash(trial_seed, env_i)).shuffle(keys)
        result[environment] = {Path(env.samples[k][0]).relative_to(root / environment).as_posix() for k in keys[:n]}
    return result


def test_seed_hash_is_domainbeds():
    assert domainbed_seed_hash(0, 0) == 894182419  # the value DomainBed's code prints
    assert seed_hash(0, 0) == 894182419
    for args in [(0, 1), (3, 2), (1, "order", 2, 7), ("aug", 0, 5, 31)]:
        assert seed_hash(*args) == domainbed_seed_hash(*args)


@pytest.fixture
def awkward_benchmark(tmp_path: Path) -> Path:
    """Names whose order depends on how one sorts: case, digits of unequal length, unequal class sizes."""
    root = tmp_path / "awk"
    rng = np.random.default_rng(0)
    names = ["10.png", "9.png", "B.png", "a.png", "a_1.png", "Z0.png", "x.jpeg", "y.JPG", "img 2.png"]
    for di, d in enumerate(["Photo", "art", "sketch"]):
        for ci, c in enumerate(["Dog", "cat", "elephant"]):
            (root / d / c).mkdir(parents=True)
            for k, name in enumerate(names[: 5 + (3 * di + ci) % 5]):
                arr = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / d / c / name, format="PNG" if name.endswith(".png") else "JPEG")
    return root


@pytest.mark.parametrize("trial_seed", [0, 1, 2])
def test_out_files_equal_domainbeds(awkward_benchmark, trial_seed):
    bench = load_benchmark(awkward_benchmark, progress=False)
    ours = out_files(bench, trial_seed)
    theirs = domainbed_out_files(awkward_benchmark, trial_seed)
    assert list(ours) == list(theirs) == ["Photo", "art", "sketch"]
    for domain in theirs:
        assert len(ours[domain]) == len(set(ours[domain]))
        assert set(ours[domain]) == theirs[domain] and theirs[domain]


def test_split_is_a_partition_of_the_stated_size():
    for n in [1, 5, 37, 100]:
        ins, outs = split_domain(n, 4, 1, holdout=0.3)
        assert len(outs) == int(n * 0.3) and sorted(np.concatenate([ins, outs]).tolist()) == list(range(n))
