"""Safe extraction of downloaded archives (zip, tar, tar.gz, tar.bz2, tar.xz).

A dataset archive comes from a third-party host, or by hand from wherever a user found a copy,
so it is treated as untrusted: every member name is checked before anything is written, and
entries that would land outside the destination (`../x`, `/etc/x`, `C:\\x`), links that point
outside it, and device files are refused with the archive and entry named. A truncated or
corrupt archive raises `ArchiveError`; callers extract into a scratch folder that they delete on
failure, so a bad archive never leaves half a benchmark where a complete one is expected.

Links are where archives bite: a tar may hold a link that points inside when it is made and is
re-pointed by a later entry, so that an earlier, already-checked link now resolves to `/`.
Here tar members go through tarfile's `filter="data"` (Python's own guard), a link entry may
never replace an existing path (no re-pointing), and after extraction every link left in the
tree must still resolve inside the destination, or the archive is refused. Every path written
or removed later (`inside`) is resolved with `os.path.realpath` and checked again.

The expanded size is capped (`max_bytes`: zip bombs, a gzip of zeros); a full disk is reported
as such (`NoSpaceError`, not "corrupt"), so callers keep the archive for a retry.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath, PureWindowsPath

from vldlib.data.folder import DataError


class ArchiveError(DataError):
    """An archive is truncated, corrupt, of an unknown format, or holds an unsafe entry."""


class ExpandsTooLarge(ArchiveError):
    """An archive expands past the cap (a zip bomb, or the wrong file): kept, the cap can be raised."""


class NoSpaceError(DataError):
    """The disk filled up while extracting: not the archive's fault, so it is kept."""


MB = 1 << 20


def inside(path: str | os.PathLike, root: str | os.PathLike) -> Path:
    """`path` with every link resolved, checked to lie under `root` (also resolved).

    Raises `ArchiveError` when it does not: a link planted by an archive must never make a
    later write or removal land outside the folder the user named.
    """
    real, top = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, top]) != top:
        raise ArchiveError(f"{path}: resolves to {real}, outside {top} (through a symbolic link); "
                           f"refusing to write or remove it. The archive is not a genuine copy; delete "
                           f"it and fetch it again from the source.")
    return Path(real)


def _mount_point(path: Path) -> str:
    p = os.path.realpath(path)
    while not os.path.ismount(p):
        p = os.path.dirname(p)
    return p


def no_space(archive: Path, dest: Path, needed_bytes: int) -> NoSpaceError:
    """The message for a full disk: where, how much is free, how much the archive needs."""
    probe = dest if dest.exists() else dest.parent
    free = shutil.disk_usage(probe).free
    return NoSpaceError(f"no space left on {_mount_point(probe)}: {free // MB} MB free, about "
                        f"{max(needed_bytes, 1) // MB + 1} MB needed to extract {archive.name} into {dest}. "
                        f"The archive is kept ({archive}); free some space, or use --data-dir on a "
                        f"bigger disk, and run the same command again.")


def _is_enospc(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _too_big(archive: Path, total: int, max_bytes: int) -> ExpandsTooLarge:
    return ExpandsTooLarge(f"{archive}: expands to more than {max_bytes // MB} MB ({total // MB} MB so far), "
                        f"far more than this benchmark needs: a zip bomb or the wrong file. Nothing "
                        f"was kept. If the archive is genuine, raise the cap with --max-extract-mb "
                        f"(max_extract_bytes=).")


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


def _extract_zip(archive: Path, dest: Path, progress: bool, max_bytes: int | None, links: bool) -> int:
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
        # zipfile never inflates a member past its declared size, so the sum is a true bound.
        total = sum(m.file_size for m in members)
        if max_bytes is not None and total > max_bytes:
            raise _too_big(archive, total, max_bytes)
        if shutil.disk_usage(dest).free < total:
            raise no_space(archive, dest, total)
        try:
            for m in tqdm(members, desc=f"extracting {archive.name}", unit="file", disable=not progress,
                          mininterval=1.0):
                inside(dest / m.filename.replace("\\", "/"), dest)
                zf.extract(m, dest)
        except OSError as e:
            if _is_enospc(e):
                raise no_space(archive, dest, total) from None
            raise ArchiveError(f"{archive}: corrupt zip while extracting ({e}); delete it and fetch it "
                               f"again.") from None
        except (zipfile.BadZipFile, EOFError, ValueError) as e:
            raise ArchiveError(f"{archive}: corrupt zip while extracting ({e}); delete it and fetch it "
                               f"again.") from None
    return len(members)


def _extract_tar(archive: Path, dest: Path, progress: bool, max_bytes: int | None, links: bool) -> int:
    from tqdm.auto import tqdm

    n = total = 0
    dest_real = os.path.realpath(dest)
    # Compressed tars of images barely shrink; the archive's size is the estimate of the need.
    needed = archive.stat().st_size
    if shutil.disk_usage(dest).free < needed:
        raise no_space(archive, dest, needed)
    try:
        # Random-access mode, read front to back: unlike stream mode ("r|gz"), a gzip stream that
        # ends early raises EOFError here instead of passing for the end of the archive.
        with tarfile.open(archive, "r:*") as tf, tqdm(desc=f"extracting {archive.name}", unit="file",
                                                       disable=not progress, mininterval=1.0) as bar:
            for m in tf:
                check_member_name(m.name, archive)
                if m.isdev() or m.isfifo():
                    raise ArchiveError(f"{archive}: refusing entry {m.name!r}: a device or FIFO file.")
                total += m.size
                if max_bytes is not None and total > max_bytes:
                    raise _too_big(archive, total, max_bytes)
                target = os.path.join(dest_real, m.name)
                inside(os.path.dirname(target), dest_real)  # never write through an outside link
                if (m.issym() or m.islnk()) and not links:
                    raise ArchiveError(f"{archive}: refusing entry {m.name!r}: a link to {m.linkname!r}; "
                                       f"benchmark archives hold only folders and images. Fetch a "
                                       f"genuine copy.")
                if m.issym() or m.islnk():
                    if os.path.lexists(target):
                        raise ArchiveError(f"{archive}: refusing entry {m.name!r}: a link replacing an "
                                           f"earlier entry of the same name (re-pointing a link is how "
                                           f"archives escape their folder). Fetch a genuine copy.")
                    link_to = (m.linkname if m.islnk() else
                               os.path.join(os.path.dirname(m.name), m.linkname))
                    resolved = os.path.realpath(os.path.join(dest_real, link_to))
                    if os.path.isabs(m.linkname) or os.path.commonpath([dest_real, resolved]) != dest_real:
                        raise ArchiveError(f"{archive}: refusing entry {m.name!r}: a link to "
                                           f"{m.linkname!r}, outside the destination folder. The archive "
                                           f"is not a genuine copy; fetch it again from the source.")
                elif os.path.islink(target):
                    raise ArchiveError(f"{archive}: refusing entry {m.name!r}: it would replace a link "
                                       f"made by an earlier entry. Fetch a genuine copy.")
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
    except (ArchiveError, NoSpaceError):
        raise
    except OSError as e:
        if _is_enospc(e):
            raise no_space(archive, dest, max(needed, total)) from None
        raise ArchiveError(f"{archive}: truncated or corrupt tar archive after {n} entries ({e}); an "
                           f"interrupted download? Delete it and fetch it again.") from None
    except (tarfile.TarError, EOFError, zlib_error()) as e:
        raise ArchiveError(f"{archive}: truncated or corrupt tar archive after {n} entries ({e}); an "
                           f"interrupted download? Delete it and fetch it again.") from None
    if n == 0:
        raise ArchiveError(f"{archive}: empty tar archive; fetch it again.")
    _check_links_stay_inside(archive, dest)
    return n


def _check_links_stay_inside(archive: Path, dest: Path) -> None:
    """After extraction, every link in the tree must still resolve inside `dest`."""
    top = os.path.realpath(dest)
    for folder, dirs, files in os.walk(dest):  # os.walk does not descend into linked folders
        for name in dirs + files:
            p = os.path.join(folder, name)
            if os.path.islink(p):
                real = os.path.realpath(p)
                if os.path.commonpath([real, top]) != top:
                    raise ArchiveError(f"{archive}: refusing entry {os.path.relpath(p, dest)!r}: a link "
                                       f"that, after later entries re-pointed the links it goes "
                                       f"through, resolves to {real}, outside the destination. The "
                                       f"archive is not a genuine copy; fetch it again from the source.")


def _compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(6)
    return head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head == b"\xfd7zXZ\x00"


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike, *, progress: bool = True,
                 max_bytes: int | None = None, links: bool = True) -> int:
    """Extract `archive` into `dest` (created), refusing unsafe entries; return the entry count.

    `max_bytes` caps the expanded size (`ExpandsTooLarge` past it). `links=False` refuses every
    link (zips never get any): benchmark archives hold only folders and images, whatever their
    file name says (a tar named `.zip` gets the same rule). A full disk raises
    `NoSpaceError`, which names the device, the free and the needed space.

    >>> safe_extract("PACS.zip", "scratch/")     # doctest: +SKIP
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    fmt = archive_format(archive)
    extract = _extract_zip if fmt == "zip" else _extract_tar
    return extract(archive, dest, progress, max_bytes, links)
