"""Benchmarks from the Hugging Face Hub, converted to DomainBed's `<domain>/<class>/<image>` layout.

DomainBed's Google-Drive links break often (quotas, moved files). Flower Labs keeps PACS and
OfficeHome on the Hub as parquet shards with one row per image: `image` ({bytes, path}),
`domain` (string) and `label` (a class index whose names the shard's `huggingface` schema
metadata lists, or the class name itself). `fetch_hub_dataset` downloads the shards with
`huggingface_hub.snapshot_download` into `DATA/.downloads/hf/<repo>` (resumable, like every
download here) and `write_hub_layout` writes each image under its domain and class; the caller
verifies the counts as for an archive. `HF_ENDPOINT` (read at each call) points at a mirror, or
at the tests' loopback server.

    >>> download_benchmark("PACS", "data", source="hf")      # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vldlib.data.archives import check_member_name, inside
from vldlib.data.fetch import DownloadError
from vldlib.data.folder import IMAGE_EXTENSIONS, DataError
from vldlib.data.layout import _norm
from vldlib.data.registry import BenchmarkSpec

PARQUET_PATTERNS = ["*.parquet", "**/*.parquet"]


def fetch_hub_dataset(repo_id: str, dest: Path, *, revision: str | None = None, progress: bool = True) -> list[Path]:
    """Download the parquet shards of dataset `repo_id` into `dest`; return their paths, sorted.

    Raises `DownloadError` (naming the repository and the endpoint) when the Hub cannot be
    reached or holds no parquet file.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it at import
    dest.mkdir(parents=True, exist_ok=True)
    if not progress:
        disable_progress_bars()
    try:
        folder = snapshot_download(repo_id=repo_id, repo_type="dataset", revision=revision, local_dir=dest,
                                   cache_dir=dest / ".hf-cache", allow_patterns=PARQUET_PATTERNS,
                                   endpoint=endpoint)
    except Exception as e:  # noqa: BLE001  (huggingface_hub raises many kinds: HTTP, offline, connection)
        raise DownloadError(f"Hugging Face Hub dataset {repo_id} at {endpoint or 'https://huggingface.co'}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    finally:
        if not progress:
            enable_progress_bars()
    shards = sorted(p for p in Path(folder).rglob("*.parquet") if ".cache" not in p.parts
                    and ".hf-cache" not in p.parts)
    if not shards:
        raise DownloadError(f"Hugging Face Hub dataset {repo_id}: no parquet file in the repository")
    return shards


def _label_names(schema) -> list[str] | None:
    """Class names of the `label` column from the `huggingface` schema metadata, if recorded."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        info = json.loads(meta)
        feature = info.get("info", {}).get("features", {}).get("label", {})
        names = feature.get("names")
        return [str(n) for n in names] if names else None
    except (ValueError, AttributeError):
        return None


def _suffix(data: bytes, path: str | None) -> str:
    if path and Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        return Path(path).suffix.lower()
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    return ".img"  # not an image extension: verification reports the file


MAX_ROW_IMAGE_MB = 64  # one image of a DomainBed benchmark is at most a few MB; more is not an image of it


def write_hub_layout(spec: BenchmarkSpec, shards: list[Path], out: Path, *, progress: bool = True) -> dict:
    """Write every row of `shards` as `out/<domain>/<class>/<file>`; return notes for provenance.

    Domain and class names are matched loosely (`Real_World` for `Real World`); a row whose domain
    or class the benchmark does not have, whose label is missing, or whose image is missing or
    larger than MAX_ROW_IMAGE_MB, and a shard that is not parquet, raise `DataError` naming the
    shard, the row and the value.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    rows = 0
    used: set[Path] = set()
    out.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        try:
            pf = pq.ParquetFile(shard)
            _check_columns(pf, shard)
            names = _label_names(pf.schema_arrow)
            bar = tqdm(total=pf.metadata.num_rows, desc=f"writing {shard.name}", unit="img", disable=not progress,
                       mininterval=1.0)
            row = 0
            for batch in pf.iter_batches(batch_size=256, columns=["image", "domain", "label"]):
                for image, domain, label in zip(*(batch.column(c).to_pylist() for c in ("image", "domain", "label"))):
                    where = f"{shard.name}: row {row}"
                    d, c = _domain_and_class(spec, domain, label, names, where)
                    data = _image_bytes(image, where)
                    inside(_target(out, d, c, image, data, rows, shard, used), out).write_bytes(data)
                    rows, row = rows + 1, row + 1
                    bar.update()
            bar.close()
        except pa.ArrowException as e:  # not parquet, truncated, or a column of another type
            raise DataError(f"{shard.name}: not a readable parquet shard ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); the Hub copy is damaged. Delete {shard} "
                            f"and run the same command to fetch it again, or use the primary source or --archive.") from None
    return {"hub_rows": rows}


def _check_columns(pf, shard: Path) -> None:
    missing = {"image", "domain", "label"} - set(pf.schema_arrow.names)
    if missing:
        raise DataError(f"{shard.name}: the Hub copy lacks column(s) {sorted(missing)} (has "
                        f"{pf.schema_arrow.names}); its schema changed. Use the primary source or "
                        f"--archive instead.")


def _class_index(label: object, where: str) -> int:
    """A row's label as a class index; missing (null, NaN) or not a whole number: DataError."""
    if isinstance(label, bool) or not isinstance(label, (int, float)) or label != label or int(label) != label:
        raise DataError(f"{where} has label {label!r}, not a class index or name; the Hub copy is damaged. "
                        f"Use the primary source or --archive instead.")
    return int(label)


def _domain_and_class(spec: BenchmarkSpec, domain: object, label: object, names: list[str] | None,
                      where: str) -> tuple[str, str]:
    """The benchmark's (domain, class) of a row, matched loosely; a value it does not have: DataError."""
    domains = {_norm(d): d for d in spec.domains}
    classes = {_norm(c): c for c in spec.classes or ()}
    if isinstance(label, str):
        cls_name = label
    else:
        k = _class_index(label, where)
        if names is not None and 0 <= k < len(names):
            cls_name = names[k]
        elif spec.classes and 0 <= k < len(spec.classes):
            cls_name = spec.classes[k]  # no names recorded: sorted order, as the cards list them
        else:
            cls_name = str(k)
    d = domains.get(_norm(str(domain))) if domain is not None else None
    c = classes.get(_norm(cls_name)) if classes else cls_name
    if d is None or c is None:
        raise DataError(f"{where} has domain {domain!r} and label {label!r} ({cls_name!r}), not in {spec.name} "
                        f"(domains {list(spec.domains)}); the Hub copy is not this benchmark.")
    return d, c


def _image_bytes(image: object, where: str) -> bytes:
    """A row's image bytes, present and at most MAX_ROW_IMAGE_MB."""
    data = image.get("bytes") if isinstance(image, dict) else image
    if not data or not isinstance(data, (bytes, bytearray)):
        raise DataError(f"{where} holds no image bytes; the Hub copy is damaged.")
    if len(data) > MAX_ROW_IMAGE_MB * 2**20:
        raise DataError(f"{where} holds {len(data) / 2**20:.0f} MB of image bytes, more than {MAX_ROW_IMAGE_MB} MB "
                        f"(MAX_ROW_IMAGE_MB); not an image of this benchmark. Use the primary source or --archive.")
    return bytes(data)


def _target(out: Path, d: str, c: str, image: object, data: bytes, rows: int, shard: Path, used: set[Path]) -> Path:
    """Where a row's image goes: its own file name (or the row number), made unique within its class."""
    path = image.get("path") if isinstance(image, dict) else None
    stem = Path(str(path)).stem if path else f"{rows:06d}"
    check_member_name(stem, shard)
    target = out / d / c / f"{stem}{_suffix(data, path)}"
    if target in used:  # two rows with the same file name in one class
        target = target.with_name(f"{stem}-{rows:06d}{target.suffix}")
    used.add(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target
