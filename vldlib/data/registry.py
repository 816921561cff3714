"""Benchmarks by name: a plain dict filled by a decorator, like timm's model registry.

A `BenchmarkSpec` says what a complete copy looks like on disk (domain folders, class folders,
image counts) and where it comes from. `vldlib.data.benchmarks` registers the paper's four
DomainBed benchmarks and DomainNet; `vldlib.data.emoji` registers the offline emoji benchmark.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Source:
    """One downloadable file of a benchmark.

    `kind` tells `vldlib.data.download` how to turn the file into the DomainBed layout
    (a plain archive of domain folders, TerraIncognita's images+annotations, ...).
    """

    url: str
    filename: str
    kind: str = "archive"
    md5: str | None = None
    note: str = ""


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    domains: tuple[str, ...]  # folder names; their sorted order defines the environment index
    classes: tuple[str, ...] | None = None  # sorted class folder names, None = inferred on load
    # Expected images per domain. Several accepted versions may be listed by label, e.g.
    # TerraIncognita's paper count and today's count: {"paper": {...}, "2024 sources": {...}}.
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    sources: tuple[Source, ...] = ()
    folder: str | None = None  # folder name under the data dir (default: the name)
    description: str = ""
    n_steps: int = 10_000  # the paper's default schedule for this benchmark
    checkpoint_freq: int = 300
    builder: Callable[..., object] | None = None  # offline builder (emoji), if any
    # Split each domain by file stem, the same stems on the same side in every domain: for
    # benchmarks whose domains render the same objects (emoji), so validation never sees an
    # object whose other rendering is trained on.
    group_by_stem: bool = False
    # Split each domain by object (`splits.object_of`: file stem up to the first dot), DomainBed's
    # split applied to objects: for benchmarks that show one object several times within a domain
    # (ObjectStyles: one emoji by several vendors) but never in two domains.
    group_by_object: bool = False

    @property
    def dirname(self) -> str:
        return self.folder or self.name

    @property
    def num_classes(self) -> int | None:
        return len(self.classes) if self.classes else None


BENCHMARKS: dict[str, BenchmarkSpec] = {}


def register_benchmark(spec: BenchmarkSpec) -> BenchmarkSpec:
    if spec.name in BENCHMARKS:
        raise ValueError(f"benchmark {spec.name!r} is registered twice")
    if tuple(sorted(spec.domains)) != tuple(spec.domains):
        raise ValueError(f"benchmark {spec.name!r}: list domains in sorted order, as they load")
    if spec.classes is not None and tuple(sorted(spec.classes)) != tuple(spec.classes):
        raise ValueError(f"benchmark {spec.name!r}: list classes in sorted order, as they load")
    BENCHMARKS[spec.name] = spec
    return spec


def list_benchmarks() -> list[str]:
    return sorted(BENCHMARKS)


def is_benchmark_path(name_or_path: str | os.PathLike) -> bool:
    """THE rule for "is this a folder path or a registered benchmark name" (every caller asks here).

    A path contains a separator or starts with "." (`data/PACS`, `./mine`, `/abs/x`); a bare
    word is a registered name when one is registered under it (names win over folders of the
    same name in the current directory), otherwise a path when such a folder exists. A bare
    word that is neither is taken as a name, so that `get_spec` answers with "did you mean".

    >>> is_benchmark_path("PACS"), is_benchmark_path("data/PACS"), is_benchmark_path("./x")
    (False, True, True)
    """
    s = str(name_or_path)
    if "/" in s or os.sep in s or s.startswith("."):
        return True
    if s.lower() in {k.lower() for k in BENCHMARKS}:
        return False
    return Path(s).is_dir()


def benchmark_label(name_or_path: str | os.PathLike) -> str:
    """A short name for run folders and titles: the registered name, or the folder's last part."""
    return Path(str(name_or_path)).name if is_benchmark_path(name_or_path) else str(name_or_path)


def get_spec(name: str) -> BenchmarkSpec:
    key = {k.lower(): k for k in BENCHMARKS}.get(name.lower())
    if key is None:
        close = difflib.get_close_matches(name, list(BENCHMARKS), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown benchmark {name!r}.{hint} Registered: {', '.join(sorted(BENCHMARKS))}; "
                       f"or pass a path to a folder laid out as ROOT/<domain>/<class>/<image>.")
    return BENCHMARKS[key]
