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

import dataclasses
import datetime
import hashlib
import http.client
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from vldlib.data.archives import ArchiveError, archive_format, check_member_name, safe_extract
from vldlib.data.benchmarks import TERRA_CLASSES, TERRA_LOCATIONS, TOTAL
from vldlib.data.folder import IMAGE_EXTENSIONS, DataError, _manifest_path, scan_folder
from vldlib.data.registry import BenchmarkSpec, Source, get_spec
from vldlib.utils import write_json_atomic

CHUNK = 1 << 20
DOWNLOADS = ".downloads"
PROVENANCE = ".vldlib-source.json"  # hidden: never taken for a domain folder


class DownloadError(DataError):
    """A source could not be fetched; the message says what to fetch by hand and how to import it."""


# ---------------------------------------------------------------------------------------------
# fetching one file


def _mirror(mirror: str | None) -> str | None:
    return mirror or os.environ.get("VLDLIB_MIRROR") or None


def source_url(src: Source, mirror: str | None = None) -> str:
    """The URL actually fetched: `<mirror>/<filename>` if a mirror is set, else the public URL.

    Google-Drive `uc?id=` links answer large files with an HTML "can't scan for viruses" page;
    the drive.usercontent form with `confirm=t` skips it (a quota page can still come back).
    """
    base = _mirror(mirror)
    if base:
        return f"{base.rstrip('/')}/{urllib.parse.quote(src.filename)}"
    m = re.match(r"https://drive\.google\.com/uc\?id=([\w-]+)", src.url)
    if m:
        return f"https://drive.usercontent.google.com/download?id={m.group(1)}&export=download&confirm=t"
    return src.url


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


class _Incomplete(Exception):
    """The server closed the connection before the whole file arrived: resume, don't give up."""


def _total_from_content_range(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(?:\d+-\d+|\*)/(\d+)", value or "")
    return int(m.group(1)) if m else None


def fetch(url: str, dest: str | os.PathLike, *, md5: str | None = None, progress: bool = True,
          retries: int = 5, timeout: float = 60.0, backoff: float = 1.0) -> Path:
    """Download `url` to `dest`, resuming `dest.part` with HTTP Range after any interruption.

    The file appears at `dest` only when complete (and matching `md5` when given), so a killed
    process leaves just the `.part`, which the next call continues. Raises `DownloadError` on an
    HTTP error, an HTML page where a file was expected, a checksum mismatch, or after `retries`
    failed resumptions.
    """
    from tqdm.auto import tqdm

    dest = Path(dest)
    if dest.exists():
        if md5 is None or _md5(dest) == md5:
            return dest
        dest.unlink()  # a stale or corrupt earlier download
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "vldlib (python urllib)"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
                ctype = r.headers.get("Content-Type", "")
                if "text/html" in ctype:
                    raise DownloadError(f"{url} answered with a web page (Content-Type {ctype}) instead "
                                        f"of the file: a Google-Drive quota, virus-scan or sign-in page, "
                                        f"or a moved link")
                if have and r.status == 206:
                    mode, total = "ab", _total_from_content_range(r.headers.get("Content-Range"))
                else:  # the server ignored the Range header: start over
                    have, mode = 0, "wb"
                    total = int(r.headers["Content-Length"]) if r.headers.get("Content-Length") else None
                with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                 unit_divisor=1024, desc=dest.name, disable=not progress,
                                                 mininterval=1.0) as bar:
                    while True:
                        try:
                            chunk = r.read(CHUNK)
                        except http.client.IncompleteRead as e:
                            f.write(e.partial)
                            raise _Incomplete("connection closed mid-file") from None
                        if not chunk:
                            break
                        f.write(chunk)
                        bar.update(len(chunk))
                size = part.stat().st_size
                if total is not None and size < total:
                    raise _Incomplete(f"got {size} of {total} bytes")
            break
        except urllib.error.HTTPError as e:
            if e.code == 416 and have:  # asked past the end: the .part may already be whole
                if _total_from_content_range(e.headers.get("Content-Range")) == have:
                    break
                part.unlink()
                continue
            if e.code in (429, 500, 502, 503, 504) and failures < retries:
                failures += 1
                time.sleep(backoff * failures)
                continue
            raise DownloadError(f"{url}: HTTP error {e.code} {e.reason}") from None
        except (_Incomplete, urllib.error.URLError, ConnectionError, TimeoutError,
                http.client.HTTPException) as e:
            failures += 1
            if failures > retries:
                kept = part.stat().st_size if part.exists() else 0
                raise DownloadError(f"{url}: failed {failures} times ({e}); {kept} bytes are kept in "
                                    f"{part} and the next run resumes from there") from None
            if progress:
                print(f"[vldlib] {dest.name}: {e}; resuming (try {failures}/{retries})")
            time.sleep(backoff * failures)
    if md5 is not None:
        got = _md5(part)
        if got != md5:
            part.unlink()
            raise DownloadError(f"{url}: md5 {got} differs from the expected {md5}; the file was deleted")
    with open(part, "rb") as f:
        head = f.read(64).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        part.unlink()
        raise DownloadError(f"{url} sent a web page instead of the file (a Google-Drive quota or "
                            f"virus-scan page, or a moved link)")
    os.replace(part, dest)
    return dest


def manual_instructions(spec: BenchmarkSpec, src: Source, data_dir: str | os.PathLike) -> str:
    """What to fetch by hand when `src` cannot be downloaded, and the command that imports it."""
    gd = re.match(r"https://drive\.google\.com/uc\?id=([\w-]+)", src.url)
    where = (f"open https://drive.google.com/file/d/{gd.group(1)}/view in a browser (signed in to a "
             f"Google account if Drive says the quota is exceeded), or run `gdown {gd.group(1)}`"
             if gd else f"download {src.url} with a browser, curl or wget")
    others = [s.filename for s in spec.sources if s is not src]
    also = (f" Pass one --archive per file you fetched by hand; the others ({', '.join(others)}) are "
            f"downloaded as usual." if others else "")
    return (f"Fetch it by hand: {where}, save it as {src.filename}, then run\n"
            f"    python -m vldlib data download {spec.name} --data-dir {data_dir} "
            f"--archive /path/to/{src.filename}\n{also}".rstrip())


# ---------------------------------------------------------------------------------------------
# laying archives out as <domain>/<class>/<image>


def _norm(name: str) -> str:
    """Folder names compared loosely: hand-made copies say `Real_World` for `Real World`."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def _is_junk(p: Path) -> bool:
    return p.name.startswith(".") or p.name in ("__MACOSX",)


def _find_domain_root(top: Path, domains: Sequence[str], max_depth: int = 4) -> tuple[Path, dict[str, str]]:
    """The shallowest folder holding every domain folder (PACS: `kfold/`, OfficeHome:
    `OfficeHomeDataset_10072016/`, VLCS: `VLCS/`, DomainNet: the top), and the name of each
    domain's folder there."""
    wanted = {_norm(d): d for d in domains}
    best: tuple[int, Path, dict[str, str]] = (0, top, {})
    level = [top]
    for _ in range(max_depth + 1):
        nxt = []
        for folder in level:
            children = sorted(c for c in folder.iterdir() if c.is_dir() and not _is_junk(c))
            found = {wanted[_norm(c.name)]: c.name for c in children if _norm(c.name) in wanted}
            if len(found) == len(domains):
                return folder, found
            if len(found) > best[0]:
                best = (len(found), folder, found)
            nxt.extend(children)
        level = nxt
    n, folder, found = best
    missing = [d for d in domains if d not in found]
    if n:
        where = folder.relative_to(top).as_posix() if folder != top else "the archive's top level"
        raise DataError(f"the archive holds domain folder(s) {sorted(found)} under {where}, but not "
                        f"{missing}; it is incomplete or a different version. Fetch the complete "
                        f"archive (see `python -m vldlib data list`).")
    top_names = sorted(c.name for c in top.iterdir())[:10]
    raise DataError(f"no domain folder {list(domains)} found in the archive (its top level holds "
                    f"{top_names}); it is not this benchmark, or not laid out as <domain>/<class>/<image>.")


def _apply_remove_list(out: Path, listing: Path) -> int:
    """Delete the files a list names (DomainBed's DomainNet duplicates), paths relative to `out`."""
    n = 0
    for line in listing.read_text().splitlines():
        rel = line.strip()
        if not rel or rel.startswith("#"):
            continue
        check_member_name(rel, listing)
        target = out / rel
        if target.is_file():
            target.unlink()
            n += 1
    return n


def _load_annotations(files: Iterable[Path]) -> tuple[dict, dict, list]:
    """Merge COCO-camera-traps json files: images by id, category names by id, annotations."""
    images: dict = {}
    categories: dict = {}
    annotations: list = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{f}: not a readable annotation json ({e}); fetch the label archive again.") from None
        if not isinstance(data, dict) or "images" not in data:
            continue  # e.g. a README-like json without images
        for im in data.get("images", []):
            images[im["id"]] = im
        for c in data.get("categories", []):
            categories[c["id"]] = c["name"]
        annotations.extend(data.get("annotations", []))
    if not images:
        raise DataError("the TerraIncognita label archive holds no COCO-style json with an 'images' list "
                        "(expected caltech_images_*.json, or the eccv_18_annotation_files/*.json).")
    return images, categories, annotations


def build_terra_incognita(images_root: Path, annotation_files: Sequence[Path], out: Path, *,
                          locations: Sequence[str] = TERRA_LOCATIONS, classes: Sequence[str] = TERRA_CLASSES,
                          progress: bool = True) -> dict[str, int]:
    """Sort camera-trap images into `out/location_<id>/<class>/<file>` as DomainBed does.

    Same rule as DomainBed's `download_terra_incognita` (an image goes to every kept class one of
    its annotations names) with dict lookups: DomainBed scans all annotations for each image, a
    quadratic loop that takes hours on the full json. Images are hard-linked (copied across file
    systems). Returns counts: images placed, and referenced files missing from the image archive.
    """
    from tqdm.auto import tqdm

    images, categories, annotations = _load_annotations(annotation_files)
    keep_loc, keep_cls = {str(x) for x in locations}, set(classes)
    labels: dict = defaultdict(set)
    for a in annotations:
        name = categories.get(a.get("category_id"))
        if name in keep_cls:
            labels[a["image_id"]].add(name)
    by_name = {p.name: p for p in images_root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS}
    placed = missing = 0
    examples: list[str] = []
    wanted = [im for im in images.values() if str(im.get("location")) in keep_loc and labels.get(im["id"])]
    for im in tqdm(wanted, desc="sorting TerraIncognita", unit="img", disable=not progress, mininterval=1.0):
        fname = str(im["file_name"])
        check_member_name(fname, Path("annotation json"))
        src = by_name.get(Path(fname).name)
        if src is None:
            missing += 1
            if len(examples) < 3:
                examples.append(fname)
            continue
        for cls in sorted(labels[im["id"]]):
            dst = out / f"location_{im['location']}" / cls / Path(fname).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            placed += 1
    if missing:
        print(f"[vldlib] TerraIncognita: {missing} labelled image(s) are not in the image archive, "
              f"e.g. {examples}; they are left out (the count check below says which version this is).")
    return {"placed": placed, "missing": missing}


def _prepare(spec: BenchmarkSpec, files: dict[str, Path], scratch: Path, out: Path, progress: bool) -> dict:
    """Turn the fetched files into `out/<domain>/<class>/<image>`; return notes for provenance."""
    notes: dict = {}
    extract = scratch / "extract"
    kinds = {s.kind for s in spec.sources}
    if "terra_images" in kinds:
        img_dir, label_files = extract / "images", []
        for s in spec.sources:
            f = files[s.filename]
            if s.kind == "terra_images":
                safe_extract(f, img_dir, progress=progress)
            elif s.kind == "terra_annotations":
                if f.suffix.lower() == ".json":
                    label_files.append(f)
                else:
                    safe_extract(f, extract / "labels", progress=progress)
        labels_dir = extract / "labels"
        if labels_dir.exists():
            label_files += [p for p in sorted(labels_dir.rglob("*.json"))
                            if not any(_is_junk(Path(q)) for q in p.relative_to(labels_dir).parts)]
        out.mkdir(parents=True)
        notes["terra"] = build_terra_incognita(img_dir, label_files, out, progress=progress)
        return notes
    unknown = kinds - {"archive", "remove_list"}
    if unknown:
        raise ValueError(f"benchmark {spec.name}: unknown Source kind(s) {sorted(unknown)}; known: "
                         f"archive, remove_list, terra_images, terra_annotations")
    for s in spec.sources:
        if s.kind == "archive":
            safe_extract(files[s.filename], extract, progress=progress)
    root, names = _find_domain_root(extract, spec.domains)
    out.mkdir(parents=True)
    for d in spec.domains:
        os.rename(root / names[d], out / d)
    for s in spec.sources:
        if s.kind == "remove_list":
            notes["removed_duplicates"] = _apply_remove_list(out, files[s.filename])
    return notes


# ---------------------------------------------------------------------------------------------
# verification


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


def verify_folder(spec: BenchmarkSpec, root: str | os.PathLike, *, check_images: bool = True,
                  progress: bool = True) -> VerifyReport:
    """Check `root` (laid out as `<domain>/<class>/<image>`) against `spec`; never raises DataError."""
    root = Path(root)
    report = VerifyReport(name=spec.name, root=root, expected={k: dict(v) for k, v in spec.counts.items()})
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


# ---------------------------------------------------------------------------------------------
# download + prepare + verify + install


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


def download_benchmark(name: str | BenchmarkSpec, data_dir: str | os.PathLike, *,
                       archive: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                       progress: bool = True, mirror: str | None = None, force: bool = False,
                       counts: dict[str, dict[str, int]] | None = None, allow_count_mismatch: bool = False,
                       keep_downloads: bool = False, check_images: bool = True) -> Path:
    """Fetch, prepare and verify a benchmark; return `DATA/<dirname>`, which exists only if complete.

    `archive`: file(s) fetched by hand, used instead of downloading the matching sources.
    `mirror` (or env `VLDLIB_MIRROR`): fetch `<mirror>/<filename>` instead of the public URLs.
    `counts` replaces the spec's expected counts; a copy whose per-domain counts match no accepted
    version is not installed unless `allow_count_mismatch` (the downloads are kept for a rerun).
    An existing folder that verifies is returned as is; one that does not needs `force=True`.

    >>> download_benchmark("VLCS", "data")                                 # doctest: +SKIP
    PosixPath('data/VLCS')
    """
    spec = _spec(name, counts)
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
    if not spec.sources:
        hint = (f"build it with `python -m vldlib data build {spec.name} --data-dir {data_dir}`"
                if spec.builder else "place it by hand as <domain>/<class>/<image>")
        raise DataError(f"benchmark {spec.name} has no download source; {hint}.")
    _clean_stale_scratch(data_dir, spec)

    given = _match_archives(spec, archive)
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
            raise DownloadError(f"{spec.name}: could not download {s.filename}: {e}.\n"
                                f"{manual_instructions(spec, s, data_dir)}") from None
    files = {**fetched, **given}
    for s in spec.sources:
        if s.kind != "remove_list" and not (s.kind == "terra_annotations" and files[s.filename].suffix == ".json"):
            archive_format(files[s.filename])  # an HTML page saved by hand fails here, before extracting

    scratch = Path(tempfile.mkdtemp(prefix=f".{spec.dirname}.partial-", dir=data_dir))
    try:
        out = scratch / spec.dirname
        try:
            notes = _prepare(spec, files, scratch, out, progress)
        except ArchiveError as e:
            bad = [f for f in fetched.values() if str(f) in str(e)]
            for f in bad:  # so that the next run downloads it again instead of failing the same way
                f.unlink(missing_ok=True)
            raise ArchiveError(f"{spec.name}: {e}" + (" The download was deleted; run the same command "
                                                      "again to fetch it anew." if bad else "")) from None
        shutil.rmtree(scratch / "extract", ignore_errors=True)
        report = verify_folder(spec, out, check_images=check_images, progress=progress)
        if report.errors or report.skipped:
            raise DataError(f"{spec.name}: the prepared copy is not usable, nothing was installed.\n"
                            f"{report.summary()}")
        if report.matched is None and report.expected and not allow_count_mismatch:
            raise DataError(f"{spec.name}: nothing was installed.\n{report.table()}\nThe downloads are "
                            f"kept in {data_dir / DOWNLOADS}; to install this copy anyway rerun with "
                            f"--allow-count-mismatch (allow_count_mismatch=True).")
        write_json_atomic(out / PROVENANCE, {
            "benchmark": spec.name, "prepared": datetime.datetime.now().isoformat(timespec="seconds"),
            "sources": [{"filename": s.filename, "url": s.url,
                         "by_hand": str(given[s.filename]) if s.filename in given else None,
                         "bytes": files[s.filename].stat().st_size} for s in spec.sources],
            "counts": report.found, "matched": report.matched, **notes})
        if final.exists():  # force: move the old copy into the scratch folder, deleted below
            os.rename(final, scratch / "replaced")
        os.rename(out, final)
        _move_image_cache(out, final)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not keep_downloads:
        for f in fetched.values():
            f.unlink(missing_ok=True)
        try:
            (data_dir / DOWNLOADS).rmdir()
        except OSError:
            pass
    if progress:
        print(f"[vldlib] {report.summary()} Installed at {final}.")
    return final
