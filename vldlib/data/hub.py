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


def write_hub_layout(spec: BenchmarkSpec, shards: list[Path], out: Path, *, progress: bool = True) -> dict:
    """Write every row of `shards` as `out/<domain>/<class>/<file>`; return notes for provenance.

    Domain and class names are matched loosely (`Real_World` for `Real World`); a row whose domain
    or class the benchmark does not have raises `DataError` naming the shard and the value.
    """
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    domains = {_norm(d): d for d in spec.domains}
    classes = {_norm(c): c for c in spec.classes or ()}
    rows = 0
    used: set[Path] = set()
    out.mkdir(parents=True, exist_ok=True)
    for shard in shards:
        pf = pq.ParquetFile(shard)
        missing = {"image", "domain", "label"} - set(pf.schema_arrow.names)
        if missing:
            raise DataError(f"{shard.name}: the Hub copy lacks column(s) {sorted(missing)} (has "
                            f"{pf.schema_arrow.names}); its schema changed. Use the primary source or "
                            f"--archive instead.")
        names = _label_names(pf.schema_arrow)
        bar = tqdm(total=pf.metadata.num_rows, desc=f"writing {shard.name}", unit="img", disable=not progress,
                   mininterval=1.0)
        for batch in pf.iter_batches(batch_size=256, columns=["image", "domain", "label"]):
            for image, domain, label in zip(*(batch.column(c).to_pylist() for c in ("image", "domain", "label"))):
                d = domains.get(_norm(str(domain)))
                if isinstance(label, str):
                    cls_name = label
                elif names is not None and 0 <= int(label) < len(names):
                    cls_name = names[int(label)]
                elif spec.classes and 0 <= int(label) < len(spec.classes):
                    cls_name = spec.classes[int(label)]  # no names recorded: sorted order, as the cards list them
                else:
                    cls_name = str(label)
                c = classes.get(_norm(cls_name)) if classes else cls_name
                if d is None or c is None:
                    raise DataError(f"{shard.name}: a row with domain {domain!r} and label {label!r} "
                                    f"({cls_name!r}) is not in {spec.name} (domains {list(spec.domains)}); "
                                    f"the Hub copy is not this benchmark.")
                data = image.get("bytes") if isinstance(image, dict) else image
                if not data:
                    raise DataError(f"{shard.name}: row {rows} holds no image bytes; the Hub copy is damaged.")
                path = image.get("path") if isinstance(image, dict) else None
                stem = Path(str(path)).stem if path else f"{rows:06d}"
                check_member_name(stem, shard)
                target = out / d / c / f"{stem}{_suffix(data, path)}"
                if target in used:  # two rows with the same file name in one class
                    target = target.with_name(f"{stem}-{rows:06d}{target.suffix}")
                used.add(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                inside(target, out).write_bytes(data)
                rows += 1
                bar.update()
        bar.close()
    return {"hub_rows": rows}
