"""Fetching one file over HTTP: resumed with Range after any interruption, never taken for whole early.

Set `VLDLIB_MIRROR=https://host/path` (or pass `mirror=`) to fetch every file as
`<mirror>/<Source.filename>` instead of its public URL: a lab mirror, or the tests' local server.
When a source cannot be fetched, `manual_instructions` says what to fetch by hand and the
`--archive` command that imports it.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from vldlib.data.folder import DataError
from vldlib.data.registry import BenchmarkSpec, Source

CHUNK = 1 << 20


class DownloadError(DataError):
    """A source could not be fetched; the message says what to fetch by hand and how to import it."""



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
