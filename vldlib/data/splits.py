"""The 80/20 "in"/"out" split of every domain, drawn from the trial seed alone.

DomainBed seeds each domain's split with `seed_hash(trial_seed, env_index)`, so runs that differ
only in learning rate, dropout or training seed see exactly the same images. "out" is the held-out
20% (validation for training domains); "in" is the rest.
"""

from __future__ import annotations

import numpy as np

from vldlib.utils import seed_hash


def split_domain(n: int, trial_seed: int, domain_index: int, holdout: float = 0.2,
                 groups: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return sorted (in_indices, out_indices) of one domain of n samples.

    With `groups` (one key per sample), whole groups go to one side, and the side of a group
    depends on the trial seed and the key only, not on the domain: the same emoji is held out in
    every domain.
    """
    if not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout fraction must be in (0, 1), got {holdout}")
    if groups is None:
        perm = np.random.RandomState(seed_hash(trial_seed, domain_index)).permutation(n)
        n_out = int(n * holdout)
        return np.sort(perm[n_out:]), np.sort(perm[:n_out])
    if len(groups) != n:
        raise ValueError(f"got {len(groups)} group keys for {n} samples")
    out_mask = np.array([(seed_hash(trial_seed, "group", g) % 10_000) < holdout * 10_000 for g in groups])
    idx = np.arange(n)
    return idx[~out_mask], idx[out_mask]
