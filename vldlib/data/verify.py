"""Counting a benchmark folder per domain and class against the counts each accepted version has.

    >>> print(verify_benchmark("TerraIncognita", "data").table())    # doctest: +SKIP
    >>> print(verify_path("data/my_benchmark").table())             # any folder, no expected counts
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from vldlib.data.benchmarks import TOTAL
from vldlib.data.folder import DataError, scan_folder
from vldlib.data.registry import BenchmarkSpec, get_spec, is_benchmark_path


@dataclass
class VerifyReport:
    """Counts found on disk against each accepted version of the expected counts."""

    name: str
    root: Path
    found: dict[str, int] = field(default_factory=dict)  # images per domain
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)  # domain -> class -> images
    expected: dict[str, dict[str, int]] = field(default_factory=dict)  # version label -> counts
    matched: str | None = None  # the version label that matches exactly, if any
    errors: list[str] = field(default_factory=list)  # structural problems (scan_folder's messages)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable files

    @property
    def total(self) -> int:
        return sum(self.found.values())

    @property
    def ok(self) -> bool:
        return not self.errors and not self.skipped and (self.matched is not None or not self.expected)

    def mismatches(self, label: str) -> list[str]:
        """Differences from one version, e.g. ['location_38: 9736 found, 9767 expected']."""
        out = []
        for key, want in self.expected[label].items():
            got = self.total if key == TOTAL else self.found.get(key, 0)
            if got != want:
                out.append(f"{key}: {got} found, {want} expected")
        return out

    def table(self) -> str:
        """Per-domain counts (and per-class extremes) against every accepted version."""
        labels = list(self.expected)
        head = ["domain", "found", *labels, "classes (min-max per class)"]
        rows = []
        for d, n in self.found.items():
            pc = self.per_class.get(d, {})
            span = f"{len(pc)} ({min(pc.values())}-{max(pc.values())})" if pc else "-"
            rows.append([d, str(n), *[str(self.expected[l].get(d, "?")) for l in labels], span])
        rows.append([TOTAL, str(self.total),
                     *[str(self.expected[l].get(TOTAL, sum(v for k, v in self.expected[l].items() if k != TOTAL)))
                       for l in labels], ""])
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines + ["", self.summary()])

    def summary(self) -> str:
        if self.errors:
            return f"{self.name}: FAILED at {self.root}:\n  " + "\n  ".join(self.errors)
        parts = []
        if self.skipped:
            parts.append(f"{len(self.skipped)} unreadable file(s), e.g. {self.skipped[0][0]} "
                         f"({self.skipped[0][1]}); delete them or re-download")
        if self.matched:
            return (f"{self.name}: {'OK' if not parts else 'counts OK but'} {self.total} images match "
                    f"the {self.matched!r} counts" + (f"; {'; '.join(parts)}" if parts else "."))
        if not self.expected:
            return f"{self.name}: {self.total} images; no expected counts are recorded." + (
                f" {'; '.join(parts)}" if parts else "")
        diffs = "; ".join(f"{l!r}: {', '.join(self.mismatches(l))}" for l in self.expected)
        return (f"{self.name}: MISMATCH: {self.total} images match no accepted version ({diffs})"
                + (f"; {'; '.join(parts)}" if parts else "")
                + ". Re-download the benchmark, or fetch the archive by hand and import it with --archive.")


def _spec(name: str | BenchmarkSpec, counts: dict[str, dict[str, int]] | None = None) -> BenchmarkSpec:
    spec = name if isinstance(name, BenchmarkSpec) else get_spec(name)
    return dataclasses.replace(spec, counts=counts) if counts is not None else spec


def verify_folder(spec: BenchmarkSpec | None, root: str | os.PathLike, *, check_images: bool = True,
                  progress: bool = True) -> VerifyReport:
    """Check `root` (laid out as `<domain>/<class>/<image>`) against `spec`; never raises DataError.

    With `spec=None` the domains and classes are those found (every domain must hold the same
    class folders) and no counts are expected.
    """
    root = Path(root)
    report = VerifyReport(name=spec.name if spec else str(root), root=root,
                          expected={k: dict(v) for k, v in spec.counts.items()} if spec else {})
    try:
        ds = scan_folder(root, spec, skip_bad=True, check_images=check_images, progress=progress)
    except DataError as e:
        report.errors.append(str(e))
        return report
    report.skipped = list(ds.skipped)
    report.per_class = ds.counts()
    report.found = {d: sum(c.values()) for d, c in report.per_class.items()}
    report.matched = next((label for label in report.expected if not report.mismatches(label)), None)
    return report


def verify_benchmark(name: str | BenchmarkSpec, data_dir: str | os.PathLike, *,
                     counts: dict[str, dict[str, int]] | None = None, check_images: bool = True,
                     progress: bool = True) -> VerifyReport:
    """Count `DATA/<dirname>` per domain and class, and say which accepted version it matches.

    `name` is a registered benchmark or a `BenchmarkSpec` (tests pass tiny ones); `counts`
    replaces the expected counts. Structural problems (a missing domain, a class missing in one
    domain) and unreadable images are reported in `.errors` / `.skipped`, not raised.

    >>> r = verify_benchmark("TerraIncognita", "data")     # doctest: +SKIP
    >>> r.ok, r.matched                                     # doctest: +SKIP
    (True, "today's sources (24,330)")
    """
    spec = _spec(name, counts)
    return verify_folder(spec, Path(data_dir) / spec.dirname, check_images=check_images, progress=progress)


def verify_path(name_or_path: str | os.PathLike, data_dir: str | os.PathLike = "data", *,
                check_images: bool = True, progress: bool = True) -> VerifyReport:
    """Verify a registered benchmark under `data_dir`, or any folder given by its path.

    A folder named as a registered benchmark's folder (`data/PACS`, `x/office_home`) is checked
    against that benchmark's counts; any other folder by its structure alone: counts per domain
    and class, the same class list in every domain, unreadable files.

    >>> print(verify_path("data/my_benchmark").table())     # doctest: +SKIP
    """
    p = Path(name_or_path)
    if not is_benchmark_path(name_or_path):
        return verify_benchmark(str(name_or_path), data_dir, check_images=check_images, progress=progress)
    from vldlib.data.registry import list_benchmarks

    by_folder = {get_spec(n).dirname: get_spec(n) for n in list_benchmarks()}
    return verify_folder(by_folder.get(p.name), p, check_images=check_images, progress=progress)
