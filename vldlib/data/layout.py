"""Laying extracted archives out as `<domain>/<class>/<image>`, as DomainBed does.

Archives nest their domain folders differently (PACS under `kfold/`, OfficeHome under
`OfficeHomeDataset_10072016/`), TerraIncognita is sorted from camera-trap images and COCO
labels, and DomainNet loses DomainBed's list of duplicates. Every path removed is resolved and
checked to lie inside the folder being prepared, and only regular files are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from vldlib.data.archives import ArchiveError, check_member_name, inside, safe_extract
from vldlib.data.benchmarks import TERRA_CLASSES, TERRA_LOCATIONS
from vldlib.data.folder import IMAGE_EXTENSIONS, DataError
from vldlib.data.registry import BenchmarkSpec


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
    """Delete the files a list names (DomainBed's DomainNet duplicates), paths relative to `out`.

    Each path is resolved (`inside`): a link planted by an archive must not turn a line of the
    list into the removal of a file elsewhere. Only regular files are removed, never a link.
    """
    n = 0
    for line in listing.read_text().splitlines():
        rel = line.strip()
        if not rel or rel.startswith("#"):
            continue
        check_member_name(rel, listing)
        target = out / rel
        if not os.path.lexists(target):
            continue
        real = inside(target, out)
        st = os.lstat(target)
        if not stat.S_ISREG(st.st_mode) or real != Path(os.path.realpath(out)) / rel:
            raise ArchiveError(f"{target}: listed in {listing.name} for removal but it is not a plain file "
                               f"(a link or a folder, or reached through one); refusing to remove it. The "
                               f"archive holding it is not a genuine copy; fetch it again.")
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
            inside(dst, out)
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
            placed += 1
    if missing:
        print(f"[vldlib] TerraIncognita: {missing} labelled image(s) are not in the image archive, "
              f"e.g. {examples}; they are left out (the count check below says which version this is).")
    return {"placed": placed, "missing": missing}


def prepare_layout(spec: BenchmarkSpec, files: dict[str, Path], scratch: Path, out: Path, progress: bool,
                   max_bytes: int | None = None) -> dict:
    """Turn the fetched files into `out/<domain>/<class>/<image>`; return notes for provenance."""
    notes: dict = {}
    extract = scratch / "extract"
    kinds = {s.kind for s in spec.sources}
    if "terra_images" in kinds:
        img_dir, label_files = extract / "images", []
        for s in spec.sources:
            f = files[s.filename]
            if s.kind == "terra_images":
                safe_extract(f, img_dir, progress=progress, max_bytes=max_bytes, links=False)
            elif s.kind == "terra_annotations":
                if f.suffix.lower() == ".json":
                    label_files.append(f)
                else:
                    safe_extract(f, extract / "labels", progress=progress, max_bytes=max_bytes, links=False)
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
            safe_extract(files[s.filename], extract, progress=progress, max_bytes=max_bytes, links=False)
    root, names = _find_domain_root(extract, spec.domains)
    out.mkdir(parents=True)
    for d in spec.domains:
        os.rename(inside(root / names[d], extract), out / d)
    for s in spec.sources:
        if s.kind == "remove_list":
            notes["removed_duplicates"] = _apply_remove_list(out, files[s.filename])
    return notes
