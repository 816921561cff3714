"""Safe extraction of downloaded archives (zip, tar, tar.gz, tar.bz2, tar.xz).

A dataset archive comes from a third-party host, or by hand from wherever a user found a copy,
so it is treated as untrusted: every member name is checked before anything is written, and
entries that would land outside the destination (`../x`, `/etc/x`, `C:\\x`), links that point
outside it, and device files are refused with the archive and entry named. A truncated or
corrupt archive raises `ArchiveError`; callers extract into a scratch folder that they delete on
failure, so a bad archive never leaves half a benchmark where a complete one is expected.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from vldlib.data.folder import DataError


class ArchiveError(DataError):
    """An archive is truncated, corrupt, of an unknown format, or holds an unsafe entry."""


def archive_format(path: Path) -> str:
    """'zip' or 'tar' from the file's content, not its name: hand-fetched files get renamed."""
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"{path}: archive not found; check the path passed to --archive.")
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return "tar"  # compressed; tarfile's "r:*" picks the codec
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        raise ArchiveError(f"{path}: this is a web page, not an archive (a download site answered with "
                           f"HTML, e.g. a Google-Drive quota or sign-in page). Delete it and fetch the "
                           f"file again from a browser.")
    raise ArchiveError(f"{path}: not a zip or tar archive (unknown format; {path.stat().st_size} bytes). "
                       f"The file is corrupt or of another kind: fetch it again.")


def check_member_name(name: str, archive: Path) -> None:
    """Refuse names that escape the destination: absolute, drive letters, `..` components."""
    bad = None
    if not name or "\x00" in name:
        bad = "an empty or NUL-containing name"
    elif name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        bad = "an absolute path"
    elif ".." in PurePosixPath(name.replace("\\", "/")).parts:
        bad = "a '..' component"
    if bad:
        raise ArchiveError(f"{archive}: refusing entry {name!r}: {bad} would write outside the destination "
                           f"folder. The archive is not a genuine copy of the benchmark; delete it and "
                           f"fetch it from the source listed by `python -m vldlib data list`.")


def _extract_zip(archive: Path, dest: Path, progress: bool) -> int:
    from tqdm.auto import tqdm

    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"{archive}: unreadable zip ({e}); the file is truncated or corrupt (an "
                           f"interrupted download?). Delete it and fetch it again.") from None
    with zf:
        members = zf.infolist()
        for m in members:  # check every entry before writing any
            check_member_name(m.filename, archive)
            mode = m.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise ArchiveError(f"{archive}: refusing entry {m.filename!r}: a symbolic link; benchmark "
                                   f"archives hold only folders and images. Fetch a genuine copy.")
            kind = stat.S_IFMT(mode)  # 0 when the zip was written without Unix file types
            if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError(f"{archive}: refusing entry {m.filename!r}: a device or special file.")
        try:
            for m in tqdm(members, desc=f"extracting {archive.name}", unit="file", disable=not progress,
                          mininterval=1.0):
                zf.extract(m, dest)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise ArchiveError(f"{archive}: corrupt zip while extracting ({e}); delete it and fetch it "
                               f"again.") from None
    return len(members)


def _extract_tar(archive: Path, dest: Path, progress: bool) -> int:
    from tqdm.auto import tqdm

    n = 0
    dest_real = os.path.realpath(dest)
    try:
        # Random-access mode, read front to back: unlike stream mode ("r|gz"), a gzip stream that
        # ends early raises EOFError here instead of passing for the end of the archive.
        with tarfile.open(archive, "r:*") as tf, tqdm(desc=f"extracting {archive.name}", unit="file",
                                                       disable=not progress, mininterval=1.0) as bar:
            for m in tf:
                check_member_name(m.name, archive)
                if m.isdev() or m.isfifo():
                    raise ArchiveError(f"{archive}: refusing entry {m.name!r}: a device or FIFO file.")
                if m.issym() or m.islnk():
                    target = (m.linkname if m.islnk() else
                              os.path.join(os.path.dirname(m.name), m.linkname))
                    resolved = os.path.realpath(os.path.join(dest_real, target))
                    if os.path.isabs(m.linkname) or os.path.commonpath([dest_real, resolved]) != dest_real:
                        raise ArchiveError(f"{archive}: refusing entry {m.name!r}: a link to "
                                           f"{m.linkname!r}, outside the destination folder. The archive "
                                           f"is not a genuine copy; fetch it again from the source.")
                try:
                    tf.extract(m, dest, filter="data")
                except tarfile.FilterError as e:
                    raise ArchiveError(f"{archive}: refusing entry {m.name!r}: {e}.") from None
                n += 1
                bar.update()
            # An uncompressed tar cut exactly between two members reads like a shorter archive;
            # a complete one ends with two zero blocks after the last member.
            if not _compressed(archive) and archive.stat().st_size < tf.offset + 2 * tarfile.BLOCKSIZE:
                raise tarfile.ReadError("no end-of-archive marker")
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as e:
        raise ArchiveError(f"{archive}: truncated or corrupt tar archive after {n} entries ({e}); an "
                           f"interrupted download? Delete it and fetch it again.") from None
    if n == 0:
        raise ArchiveError(f"{archive}: empty tar archive; fetch it again.")
    return n


def _compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zXZ\x00"


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, *, progress: bool = True) -> int:
    """Extract `archive` into `dest` (created), refusing unsafe entries; return the entry count.

    >>> safe_extract("PACS.zip", "scratch/")     # doctest: +SKIP
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    fmt = archive_format(archive)
    return _extract_zip(archive, dest, progress) if fmt == "zip" else _extract_tar(archive, dest, progress)
