"""A multi-domain image folder, `ROOT/<domain>/<class>/<image>`, checked before anything trains.

DomainBed builds one `ImageFolder` per domain, so a domain that lacks a class folder silently
shifts every later label by one. Here the class list is checked across domains and against the
benchmark's registered list, and every problem is reported with the path and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from vldlib.data.registry import BenchmarkSpec, get_spec, is_benchmark_path
from vldlib.data.splits import ObjectGroups, object_of
from vldlib.utils import StopRequested, check_stop, write_json_atomic

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Files that archives and operating systems scatter around; never treated as data.
IGNORED_NAMES = {"Thumbs.db", "desktop.ini"}


class DataError(ValueError):
    """A benchmark folder is missing, incomplete or holds bad files. The message says the fix."""


@dataclass
class MultiDomainFolder:
    """Scanned benchmark: per-domain lists of (path, label), with the checks already done."""

    root: Path
    name: str
    domains: list[str]
    classes: list[str]
    samples: list[list[tuple[str, int]]]  # samples[d] = [(path, label), ...], sorted by path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    group_by_stem: bool = False  # split by file stem across domains (same object, other style)
    group_by_object: bool = False  # split by object within each domain (`splits.object_of`)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per domain and class."""
        out: dict[str, dict[str, int]] = {}
        for d, samples in zip(self.domains, self.samples):
            per_class = {c: 0 for c in self.classes}
            for _, y in samples:
                per_class[self.classes[y]] += 1
            out[d] = per_class
        return out

    def groups(self, d: int) -> list[str] | None:
        """Split groups of domain d: file stems shared across domains (emoji demo), objects within
        the domain (`ObjectGroups`, ObjectStyles), or None (DomainBed's item split)."""
        if self.group_by_stem:
            return [f"{self.classes[y]}/{Path(p).stem}" for p, y in self.samples[d]]
        if self.group_by_object:
            return ObjectGroups(f"{self.classes[y]}/{object_of(Path(p).stem)}" for p, y in self.samples[d])
        return None


def _is_hidden(p: Path) -> bool:
    return p.name.startswith(".") or p.name.startswith("__")


def _subdirs(p: Path) -> list[Path]:
    return sorted(c for c in p.iterdir() if c.is_dir() and not _is_hidden(c))


# What PIL raises for a file that is not a usable image: truncated or corrupt data, and
# DecompressionBombError (a header claiming more pixels than Image.MAX_IMAGE_PIXELS allows,
# which would exhaust memory), which is not an OSError.
IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_rgb(im: Image.Image) -> Image.Image:
    """An RGB copy of `im`, 16-bit grey scaled to 8 bits (PIL's convert clips it at 255).

    PNGs with 16-bit grey open in mode "I;16" (or "I"); `convert("RGB")` maps values above 255
    to white, which turned 99.7% of a real 16-bit image white. Here 0..65535 becomes 0..255.
    """
    if im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
        import numpy as np

        a = np.asarray(im, dtype=np.uint32)
        im = Image.fromarray(((a.clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    return im.convert("RGB")


def check_image(path: Path) -> str | None:
    """Return None if the file decodes as an image, else a short reason."""
    try:
        if os.path.islink(path) and not path.exists():
            return f"dangling symbolic link (to {os.readlink(path)!r})"
        if path.stat().st_size == 0:
            return "zero-byte file"
        with Image.open(path) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, still reads every byte
            im.load()
        return None
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except Image.DecompressionBombError as e:
        return f"decompression bomb ({e})"
    except IMAGE_ERRORS as e:
        return f"corrupt image ({e})"


def _declares_objects(root: Path) -> bool:
    """Whether a folder loaded by path says it must be split by object: its builder's manifest.json
    has `"split_by": "object"` (ObjectStyles), so a path gives the same leak-free split as the name."""
    try:
        return json.loads((root / "manifest.json").read_text()).get("split_by") == "object"
    except (OSError, ValueError, AttributeError):
        return False


def _manifest_path(root: Path) -> Path:
    cache = Path(os.environ.get("VLDLIB_CACHE", Path.home() / ".cache" / "vldlib"))
    key = hashlib.md5(str(root.resolve()).encode()).hexdigest()[:12]
    return cache / "checked" / f"{root.name}-{key}.json"


def _check_images(files: list[Path], root: Path, progress: bool, should_stop: Callable[[], bool] | None = None
                  ) -> dict[str, str]:
    """Decode every image once; remember good files by (size, mtime) so later loads are instant.
    A stop (`should_stop`, asked before each image) keeps the files checked so far, then raises
    `StopRequested`."""
    manifest_file = _manifest_path(root)
    try:
        known = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        known = {}
    bad: dict[str, str] = {}
    good: dict[str, list[int]] = {}
    todo = []
    for f in files:
        try:
            st = f.stat()
        except OSError:  # a dangling link: check_image names it
            todo.append((f, None))
            continue
        sig = [st.st_size, st.st_mtime_ns]
        if known.get(str(f)) == sig:
            good[str(f)] = sig
        else:
            todo.append((f, sig))
    if todo:
        from tqdm.auto import tqdm

        try:
            for f, sig in tqdm(todo, desc=f"checking images of {root.name}", disable=not progress,
                               unit="img", mininterval=1.0):
                check_stop(should_stop)
                reason = check_image(f)
                if reason is None and sig is not None:
                    good[str(f)] = sig
                elif reason is not None:
                    bad[str(f)] = reason
        except StopRequested:
            _remember_good(manifest_file, {**known, **good})  # the images checked before the stop
            raise
        _remember_good(manifest_file, good)
    return bad


def _remember_good(manifest_file: Path, good: dict[str, list[int]]) -> None:
    try:
        write_json_atomic(manifest_file, good)
    except OSError:
        pass  # a read-only cache only costs time next load


def scan_folder(
    root: str | os.PathLike,
    spec: BenchmarkSpec | None = None,
    *,
    skip_bad: bool = False,
    check_images: bool = True,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> MultiDomainFolder:
    """Scan and check `root/<domain>/<class>/<image>`.

    Raises `DataError` naming the domain, class or file, and the fix, for: a missing root or
    domain, domains whose class lists differ, classes that differ from the registered list, empty
    classes or domains, non-image files and undecodable images. With `skip_bad=True`, non-image
    and corrupt files are skipped instead and counted in `.skipped` (and printed), never silently.
    `should_stop` is asked before each image checked (`_check_images`).
    """
    root = Path(root)
    name = spec.name if spec else root.name
    how_to_get = (f"get it with `python -m vldlib data download {spec.name} --data-dir DIR`"
                  if spec and spec.sources else
                  f"build it with `python -m vldlib data build {spec.name} --data-dir DIR`"
                  if spec and spec.builder else
                  "point to a folder laid out as ROOT/<domain>/<class>/<image>")
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataError(f"benchmark folder {root} {what}; {how_to_get}.")

    found = [d.name for d in _subdirs(root)]
    if spec is not None:
        missing = [d for d in spec.domains if d not in found]
        if missing:
            raise DataError(f"{root}: domain folder(s) {', '.join(repr(m) for m in missing)} missing "
                            f"(found {found}); the copy is incomplete: {how_to_get}.")
        domains = list(spec.domains)
    else:
        domains = found
        if len(domains) < 2:
            raise DataError(f"{root}: found {len(domains)} domain folder(s) {domains}; a multi-domain "
                            f"benchmark needs at least 2, laid out as ROOT/<domain>/<class>/<image>.")

    class_sets = {d: [c.name for c in _subdirs(root / d)] for d in domains}
    for d, cls in class_sets.items():
        if not cls:
            raise DataError(f"{root / d}: domain {d!r} has no class folders (empty domain); "
                            f"remove it or {how_to_get}.")
    reference = list(spec.classes) if spec and spec.classes else sorted(set().union(*class_sets.values()))
    for d, cls in class_sets.items():
        missing = [c for c in reference if c not in cls]
        extra = [c for c in cls if c not in reference]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks class folder(s) {missing}")
            if extra:
                parts.append(f"has unexpected class folder(s) {extra}")
            raise DataError(f"{root / d}: domain {d!r} {' and '.join(parts)}. Every domain must hold the "
                            f"same classes, or labels shift between domains; add the missing folders "
                            f"(with images) or remove the extra ones.")
    classes = reference

    skipped: list[tuple[str, str]] = []
    samples: list[list[tuple[str, int]]] = []
    all_files: list[Path] = []
    for d in domains:
        dom: list[tuple[str, int]] = []
        for y, c in enumerate(classes):
            cdir = root / d / c
            files = []
            for f in sorted(cdir.rglob("*")):
                if f.is_dir() or _is_hidden(f) or f.name in IGNORED_NAMES:
                    continue
                if f.is_symlink() and not f.exists():
                    reason = f"dangling symbolic link (to {os.readlink(f)!r})"
                    if skip_bad:
                        skipped.append((str(f), reason))
                        continue
                    raise DataError(f"{f}: {reason} in class folder {d}/{c}; remove it, or load with "
                                    f"skip_bad=True (--skip-bad) to skip such files with a count.")
                if f.suffix.lower() not in IMAGE_EXTENSIONS:
                    if skip_bad:
                        skipped.append((str(f), "not an image file"))
                        continue
                    raise DataError(f"{f}: not an image file (extension {f.suffix!r}) in class folder "
                                    f"{d}/{c}; remove it, or load with skip_bad=True "
                                    f"(--skip-bad) to skip such files with a count.")
                files.append(f)
            all_files.extend(files)
            dom.extend((str(f), y) for f in files)
        samples.append(dom)

    if check_images:
        bad = _check_images(all_files, root, progress, should_stop)
        if bad:
            if not skip_bad:
                first = sorted(bad.items())[:5]
                listing = "; ".join(f"{p}: {r}" for p, r in first)
                raise DataError(f"{root}: {len(bad)} unreadable image(s): {listing}"
                                f"{' ...' if len(bad) > 5 else ''}. Re-download the benchmark, delete "
                                f"these files, or load with skip_bad=True (--skip-bad) to skip them.")
            skipped.extend(sorted(bad.items()))
            samples = [[s for s in dom if s[0] not in bad] for dom in samples]

    for d, dom in zip(domains, samples):
        present = {y for _, y in dom}
        for y, c in enumerate(classes):
            if y not in present:
                raise DataError(f"{root / d / c}: class {c!r} of domain {d!r} has no usable images; add "
                                f"images or remove the class from every domain.")
    if skipped:
        print(f"[vldlib] {name}: skipped {len(skipped)} bad file(s), e.g. {skipped[0][0]} ({skipped[0][1]})")
    return MultiDomainFolder(root=root, name=name, domains=domains, classes=classes, samples=samples,
                             skipped=skipped, group_by_stem=bool(spec and spec.group_by_stem),
                             group_by_object=bool(spec.group_by_object if spec else _declares_objects(root)))


def resolve_benchmark(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None
                      ) -> tuple[Path, BenchmarkSpec | None]:
    """A registered name is looked up under `data_dir`; a path (`is_benchmark_path`) is itself."""
    p = Path(name_or_path)
    if is_benchmark_path(name_or_path):
        return p, None
    spec = get_spec(str(name_or_path))
    if data_dir is None:
        data_dir = os.environ.get("VLDLIB_DATA", "data")
    return Path(data_dir) / spec.dirname, spec


def load_benchmark(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
                   **kwargs) -> MultiDomainFolder:
    """Load a benchmark by registered name (under `data_dir`) or by folder path, with all checks.

    >>> ds = load_benchmark("PACS", data_dir="data")        # doctest: +SKIP
    >>> ds.domains, ds.classes[:2], len(ds.samples[0])      # doctest: +SKIP
    """
    root, spec = resolve_benchmark(name_or_path, data_dir)
    return scan_folder(root, spec, **kwargs)


def prepare_benchmark(name_or_path: str | os.PathLike, data_dir: str | os.PathLike = "data", *,
                      progress: bool = False) -> MultiDomainFolder:
    """What notebooks call: load a benchmark, building it first when it is registered with an
    offline builder (emoji); relative paths are taken from the project root (`vldlib.paths`)."""
    from vldlib.paths import resolve

    spec = None if is_benchmark_path(name_or_path) else get_spec(str(name_or_path))
    if spec is not None and spec.builder is not None:
        spec.builder(resolve(data_dir), progress=progress)
    return load_benchmark(str(name_or_path) if spec else resolve(name_or_path), resolve(data_dir), progress=progress)
