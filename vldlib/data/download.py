"""Download, prepare and verify the real benchmarks, so a folder that exists is a complete one.

DomainBed extracts archives straight into the data folder, so a killed download or a Google-Drive
quota page leaves a folder that later loads as a smaller benchmark. Here every source is fetched
into `DATA/.downloads/<file>.part` (resumed with HTTP Range after an interruption), extracted into
a hidden scratch folder inside DATA, laid out as `<domain>/<class>/<image>`, checked with
`scan_folder` (domains, classes, every image decodes) and counted against the benchmark's expected
counts; only then is it renamed to `DATA/<spec.dirname>` in one step.

    >>> download_benchmark("PACS", "data")                           # doctest: +SKIP
    >>> download_benchmark("PACS", "data", archive="~/PACS.zip")     # fetched by hand
    >>> print(verify_benchmark("TerraIncognita", "data").table())    # doctest: +SKIP

Set `VLDLIB_MIRROR=https://host/path` (or pass `mirror=`) to fetch every file as
`<mirror>/<Source.filename>` instead of its public URL: a lab mirror, or the tests' local server.
"""


from __future__ import annotations

import datetime
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from vldlib.data.archives import ArchiveError, ExpandsTooLarge, archive_format, no_space
from vldlib.data.benchmarks import HUB_DATASETS, TOTAL
from vldlib.data.fetch import DownloadError, fetch, manual_instructions, source_url
from vldlib.data.folder import DataError, _manifest_path
from vldlib.data.hub import fetch_hub_dataset, write_hub_layout
from vldlib.data.layout import build_terra_incognita, prepare_layout
from vldlib.data.registry import BenchmarkSpec
from vldlib.data.verify import VerifyReport, _spec, verify_benchmark, verify_folder
from vldlib.utils import write_json_atomic

__all__ = ["DownloadError", "VerifyReport", "build_terra_incognita", "download_benchmark", "fetch",
           "manual_instructions", "source_url", "verify_benchmark", "verify_folder"]

DOWNLOADS = ".downloads"
PROVENANCE = ".vldlib-source.json"  # hidden: never taken for a domain folder


def _match_archives(spec: BenchmarkSpec, archive) -> dict[str, Path]:
    """Pair hand-fetched files with sources: by file name, else the only source left."""
    if archive is None:
        return {}
    paths = [Path(archive).expanduser()] if isinstance(archive, (str, os.PathLike)) else [
        Path(a).expanduser() for a in archive]
    for p in paths:
        if not p.is_file():
            raise DataError(f"--archive {p}: no such file; give the path of the file you downloaded by hand.")
    out: dict[str, Path] = {}
    left = [p for p in paths]
    for s in spec.sources:
        for p in left:
            if p.name == s.filename:
                out[s.filename] = p
                left.remove(p)
                break
    free = [s for s in spec.sources if s.filename not in out]
    if len(left) == 1 and len(free) == 1:
        out[free[0].filename] = left.pop()
    if left:
        names = ", ".join(s.filename for s in spec.sources)
        raise DataError(f"cannot tell which {spec.name} source {[str(p) for p in left]} is: its sources are "
                        f"{names}. Rename each hand-fetched file to its source's name.")
    return out


def _move_image_cache(old_root: Path, new_root: Path) -> None:
    """scan_folder remembers decoded images by path; carry that across the final rename."""
    try:
        old = _manifest_path(old_root)
        known = json.loads(old.read_text())
        prefix = str(old_root)
        moved = {str(new_root) + k[len(prefix):]: v for k, v in known.items() if k.startswith(prefix)}
        write_json_atomic(_manifest_path(new_root), moved)
        old.unlink()
    except (OSError, ValueError):
        pass  # only costs a re-check on first load


def _clean_stale_scratch(data_dir: Path, spec: BenchmarkSpec) -> None:
    for p in data_dir.glob(f".{spec.dirname}.partial-*"):
        print(f"[vldlib] removing {p}, left by an interrupted earlier run")
        shutil.rmtree(p, ignore_errors=True)


# An upper bound on the bytes one image of these benchmarks takes (they are JPEGs/PNGs of at most
# a few megapixels; the archives average 20-250 kB per image): the expanded-size cap is this
# times the expected image count, at least MIN_EXTRACT_CAP.
MAX_BYTES_PER_IMAGE = 2 << 20
MIN_EXTRACT_CAP = 1 << 30
SOURCES = ("auto", "primary", "hf")


def expanded_size_cap(spec: BenchmarkSpec) -> int:
    """Bytes an archive of `spec` may expand to before it is refused as a zip bomb."""
    images = max((c.get(TOTAL, sum(v for k, v in c.items() if k != TOTAL)) for c in spec.counts.values()),
                 default=0)
    return max(MIN_EXTRACT_CAP, images * MAX_BYTES_PER_IMAGE)


def _fetch_sources(spec: BenchmarkSpec, data_dir: Path, given: dict[str, Path], mirror: str | None,
                   progress: bool) -> dict[str, Path]:
    fetched: dict[str, Path] = {}
    for s in spec.sources:
        if s.filename in given:
            continue
        url = source_url(s, mirror)
        if progress:
            print(f"[vldlib] {spec.name}: fetching {s.filename} from {url}")
        try:
            fetched[s.filename] = fetch(url, data_dir / DOWNLOADS / s.filename, md5=s.md5, progress=progress)
        except DownloadError as e:
            hub = HUB_DATASETS.get(spec.name)
            also = (f"Or take the Hugging Face Hub copy: python -m vldlib data download {spec.name} "
                    f"--data-dir {data_dir} --source hf" if hub else "")
            raise DownloadError(f"{spec.name}: could not download {s.filename}: {e}.\n"
                                f"{manual_instructions(spec, s, data_dir)}\n{also}".rstrip()) from None
    return fetched


def download_benchmark(name: str | BenchmarkSpec, data_dir: str | os.PathLike, *,
                       archive: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                       progress: bool = True, mirror: str | None = None, force: bool = False,
                       counts: dict[str, dict[str, int]] | None = None, allow_count_mismatch: bool = False,
                       keep_downloads: bool = False, check_images: bool = True, source: str = "auto",
                       max_extract_bytes: int | None = None) -> Path:
    """Fetch, prepare and verify a benchmark; return `DATA/<dirname>`, which exists only if complete.

    `archive`: file(s) fetched by hand, used instead of downloading the matching sources.
    `mirror` (or env `VLDLIB_MIRROR`): fetch `<mirror>/<filename>` instead of the public URLs.
    `source`: "primary" (the registered links), "hf" (the Hugging Face Hub copy, PACS and
    OfficeHome) or "auto" (primary, falling back to the Hub copy when a link fails).
    `max_extract_bytes` replaces the expanded-size cap (`expanded_size_cap`) on each archive.
    `counts` replaces the spec's expected counts; a copy whose per-domain counts match no accepted
    version is not installed unless `allow_count_mismatch` (the downloads are kept for a rerun).
    An existing folder that verifies is returned as is; one that does not needs `force=True`.
    Downloads are kept whenever extraction fails for a reason other than a damaged file (a full
    disk, the size cap), so the next run does not fetch them again.

    >>> download_benchmark("VLCS", "data")                                 # doctest: +SKIP
    PosixPath('data/VLCS')
    """
    spec = _spec(name, counts)
    if source not in SOURCES:
        raise DataError(f"--source {source!r}: choose one of {', '.join(SOURCES)}.")
    hub_repo = HUB_DATASETS.get(spec.name)
    if source == "hf" and hub_repo is None:
        raise DataError(f"{spec.name} has no Hugging Face Hub source; those with one: "
                        f"{', '.join(sorted(HUB_DATASETS))}. Use --source primary.")
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    final = data_dir / spec.dirname
    if final.exists() and not force:
        report = verify_folder(spec, final, progress=progress)
        if report.ok:
            if progress:
                print(f"[vldlib] {report.summary()} Already in place at {final}.")
            return final
        raise DataError(f"{final} already exists but does not verify: {report.summary()}\nDelete it, or "
                        f"rerun with --force (force=True) to replace it.")
    if not spec.sources and source != "hf":
        hint = (f"build it with `python -m vldlib data build {spec.name} --data-dir {data_dir}`"
                if spec.builder else "place it by hand as <domain>/<class>/<image>")
        raise DataError(f"benchmark {spec.name} has no download source; {hint}.")
    _clean_stale_scratch(data_dir, spec)
    cap = max_extract_bytes if max_extract_bytes is not None else expanded_size_cap(spec)

    given = _match_archives(spec, archive)
    fetched: dict[str, Path] = {}
    use_hub = source == "hf"
    if not use_hub:
        try:
            fetched = _fetch_sources(spec, data_dir, given, mirror, progress)
        except DownloadError as e:
            if source != "auto" or hub_repo is None or given:
                raise
            print(f"[vldlib] {str(e).splitlines()[0]}\n[vldlib] {spec.name}: falling back to the Hugging "
                  f"Face Hub copy {hub_repo}")
            use_hub, primary_error = True, e
    files = {**fetched, **given}
    hub_dir = data_dir / DOWNLOADS / "hf" / (hub_repo or "")
    shards: list[Path] = []
    if use_hub:
        try:
            shards = fetch_hub_dataset(hub_repo, hub_dir, progress=progress)
        except DownloadError as e:
            first = f"{primary_error}\n" if source == "auto" else ""
            raise DownloadError(f"{first}{spec.name}: the Hugging Face Hub copy failed too: {e}." if first else
                                f"{spec.name}: {e}. Try --source primary, or fetch the archive by hand and "
                                f"pass it with --archive.") from None
    else:
        for s in spec.sources:
            if s.kind != "remove_list" and not (s.kind == "terra_annotations"
                                                and files[s.filename].suffix == ".json"):
                archive_format(files[s.filename])  # an HTML page saved by hand fails here, before extracting

    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.dirname}.partial-", dir=data_dir))
    try:
        out = scratch / spec.dirname
        try:
            if use_hub:
                notes = write_hub_layout(spec, shards, out, progress=progress)
            else:
                notes = prepare_layout(spec, files, scratch, out, progress, max_bytes=cap)
        except ExpandsTooLarge as e:
            raise ExpandsTooLarge(f"{spec.name}: {e} The download is kept in {data_dir / DOWNLOADS}.") from None
        except ArchiveError as e:
            bad = [f for f in fetched.values() if str(f) in str(e)]
            for f in bad:  # so that the next run downloads it again instead of failing the same way
                f.unlink(missing_ok=True)
            raise ArchiveError(f"{spec.name}: {e}" + (" The download was deleted; run the same command "
                                                      "again to fetch it anew." if bad else "")) from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):  # writing the Hub copy's images
                raise no_space(Path(shards[0]) if shards else data_dir, out,
                               sum(p.stat().st_size for p in shards)) from None
            raise
        shutil.rmtree(scratch / "extract", ignore_errors=True)
        report = verify_folder(spec, out, check_images=check_images, progress=progress)
        if report.errors or report.skipped:
            raise DataError(f"{spec.name}: the prepared copy is not usable, nothing was installed.\n"
                            f"{report.summary()}")
        if report.matched is None and report.expected and not allow_count_mismatch:
            raise DataError(f"{spec.name}: nothing was installed.\n{report.table()}\nThe downloads are "
                            f"kept in {data_dir / DOWNLOADS}; to install this copy anyway rerun with "
                            f"--allow-count-mismatch (allow_count_mismatch=True).")
        used = ([{"hub": hub_repo, "endpoint": os.environ.get("HF_ENDPOINT") or "https://huggingface.co",
                  "files": [p.name for p in shards], "bytes": sum(p.stat().st_size for p in shards)}]
                if use_hub else
                [{"filename": s.filename, "url": s.url,
                  "by_hand": str(given[s.filename]) if s.filename in given else None,
                  "bytes": files[s.filename].stat().st_size} for s in spec.sources])
        write_json_atomic(out / PROVENANCE, {
            "benchmark": spec.name, "prepared": datetime.datetime.now().isoformat(timespec="seconds"),
            "sources": used, "counts": report.found, "matched": report.matched, **notes})
        if final.exists():  # force: move the old copy into the scratch folder, deleted below
            os.rename(final, scratch / "replaced")
        os.rename(out, final)
        _move_image_cache(out, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not keep_downloads:
        for f in fetched.values():
            f.unlink(missing_ok=True)
        if use_hub:
            shutil.rmtree(hub_dir, ignore_errors=True)
            for empty in (hub_dir.parent, hub_dir.parent.parent):
                try:
                    empty.rmdir()
                except OSError:
                    pass
        try:
            (data_dir / DOWNLOADS).rmdir()
        except OSError:
            pass
    if progress:
        print(f"[vldlib] {report.summary()} Installed at {final}.")
    return final
