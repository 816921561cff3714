"""The 80/20 "in"/"out" split of every domain, drawn from the trial seed alone: DomainBed's split.

DomainBed (and the paper's code, a DomainBed fork) splits domain `env_i` with
`misc.split_dataset(env, int(len(env) * holdout_fraction), misc.seed_hash(trial_seed, env_i))`:
the indices 0..n-1 of the domain's `ImageFolder` (classes sorted, files sorted) are shuffled by
`np.random.RandomState(seed).shuffle`, the first `int(n * holdout)` are "out" (validation for
training domains) and the rest "in". `split_domain` does exactly that on our scan, which lists a
domain's files in the same order, so the same `trial_seed` gives the same images, item for item.
Runs that differ only in learning rate, dropout or training seed see exactly the same images.

Benchmarks that show one object several times in a domain (ObjectStyles: one emoji drawn by
several vendors) declare groups (`ObjectGroups`), and then DomainBed's split is applied to the
groups instead of the items, so no object is both trained on ("in") and used to select the model
("out"). With one item per group it is DomainBed's split, item for item.

A data-size study trains on a nested part of each training domain's "in" split (`train_subset`),
drawn from the same trial seed, so "out" and the held-out domain never change with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from vldlib.utils import seed_hash


class Domains(Protocol):
    """What out_files needs of a loaded benchmark (`folder.MultiDomainFolder` is one); a protocol,
    so that this module, which the loader imports, does not import the loader."""

    root: Path
    domains: list[str]
    samples: list[list[tuple[str, int]]]

    def groups(self, d: int) -> Sequence[str] | None: ...


def object_of(stem: str) -> str:
    """The object a file shows, in benchmarks that group by object: its stem up to the first dot.

    `1f415.noto` and `1f415.twemoji` are one emoji drawn by two vendors; a stem without a dot
    (a photograph, a clipart file) is its own object. Builders name files this way.
    """
    return stem.split(".", 1)[0]


class ObjectGroups(list):
    """One domain's group keys, one per sample, for groups that never span two domains.

    `split_domain` splits these with DomainBed's shuffle applied to groups (`_split_groups`);
    a plain list of keys means groups shared across domains (the emoji demo: the same stem on the
    same side in every domain).
    """


def _split_groups(groups: list[str], seed: int, holdout: float) -> np.ndarray:
    """Out mask of DomainBed's split generalised to groups.

    The distinct keys, in order of first appearance (the domain's ImageFolder order), are shuffled
    by `RandomState(seed).shuffle`, as DomainBed shuffles indices; whole groups are then taken as
    "out", in shuffled order, until at least `int(n * holdout)` items are out. With one item per
    group the keys are the indices in disguise and the result is DomainBed's split.
    """
    keys = list(dict.fromkeys(groups))
    np.random.RandomState(seed).shuffle(keys)
    size: dict[str, int] = {}
    for g in groups:
        size[g] = size.get(g, 0) + 1
    n_out, taken, out = int(len(groups) * holdout), 0, set()
    for g in keys:
        if taken >= n_out:
            break
        out.add(g)
        taken += size[g]
    return np.array([g in out for g in groups], dtype=bool)


def split_domain(n: int, trial_seed: int, domain_index: int, holdout: float = 0.2,
                 groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (in_indices, out_indices) of one domain of n samples.

    Without `groups`: DomainBed's `split_dataset` with its seed, so the sets are DomainBed's.
    With `ObjectGroups` (groups within the domain: ObjectStyles), DomainBed's split over groups
    (`_split_groups`, same seed). With a plain list of keys (groups shared by all domains: the
    emoji demo, not a DomainBed benchmark), whole groups go to one side, and the side of a group
    depends on the trial seed and the key only, not on the domain: the same emoji is held out in
    every domain.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {holdout}")
    if groups is None:
        keys = list(range(n))  # DomainBed shuffles a list, not an array; the draws are the same
        np.random.RandomState(seed_hash(trial_seed, domain_index)).shuffle(keys)
        n_out = int(n * holdout)
        return np.sort(np.array(keys[n_out:], dtype=np.int64)), np.sort(np.array(keys[:n_out], dtype=np.int64))
    if len(groups) != n:
        raise ValueError(f"got {len(groups)} group keys for {n} samples")
    if isinstance(groups, ObjectGroups):
        out_mask = _split_groups(groups, seed_hash(trial_seed, domain_index), holdout)
        idx = np.arange(n)
        return idx[~out_mask], idx[out_mask]
    out_mask = np.array([(seed_hash(trial_seed, "group", g) % 10_000) < holdout * 10_000 for g in groups])
    idx = np.arange(n)
    return idx[~out_mask], idx[out_mask]


def train_subset(ins: np.ndarray, fraction: float, trial_seed: int, domain_index: int,
                 groups: Sequence[str] | None = None) -> np.ndarray:
    """The part of one domain's "in" split (`ins`, from `split_domain`) that a run trains on when it
    trains on `fraction` of it (`TrainConfig.train_fraction`; 1: all of it, `ins` itself).

    Why this way: a data-size study compares runs on 25%, 50% and 100% of the same data, so the
    subset is a function of the split machinery alone (trial seed, domain, fraction), never of
    the run seed: every rate, learning rate and seed trains on the same images. The "in" items
    (or, with `groups`, their objects: an emoji's three vendors stay together, so 25% of the
    objects, not 25% of the renderings of most objects) are shuffled once by
    `RandomState(seed_hash(trial_seed, "train_fraction", domain_index))` and taken in that order
    until `round(fraction * len(ins))` items (at least one) are in: a smaller fraction takes a
    prefix of the same order, so the 25% subset lies inside the 50% one. Returned sorted.
    """
    ins = np.asarray(ins, dtype=np.int64)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train fraction must be in (0, 1], got {fraction}; e.g. 0.25 for a quarter of the 'in' split")
    if fraction == 1.0 or len(ins) == 0:
        return ins
    keys = [groups[i] for i in ins] if groups is not None else [int(i) for i in ins]
    order = list(dict.fromkeys(keys))  # units in the domain's file order, as `_split_groups` shuffles them
    np.random.RandomState(seed_hash(trial_seed, "train_fraction", domain_index)).shuffle(order)
    size: dict = {}
    for k in keys:
        size[k] = size.get(k, 0) + 1
    want, taken, keep = max(1, int(round(fraction * len(ins)))), 0, set()
    for k in order:
        if taken >= want:
            break
        keep.add(k)
        taken += size[k]
    return np.array([i for i, k in zip(ins, keys) if k in keep], dtype=np.int64)


def out_files(bench: Domains, trial_seed: int, holdout: float = 0.2) -> dict[str, list[str]]:
    """Each domain's "out" files, as paths relative to the domain folder ("dog/pic_001.jpg"), in
    ImageFolder order: what a run records in meta.json so anyone can check its split (DomainBed's
    `out` split of the same trial seed holds exactly these files)."""
    result = {}
    for env, domain in enumerate(bench.domains):
        samples = bench.samples[env]
        _, outs = split_domain(len(samples), trial_seed, env, holdout, bench.groups(env))
        folder = Path(bench.root) / domain
        result[domain] = [Path(samples[i][0]).relative_to(folder).as_posix() for i in outs]
    return result
