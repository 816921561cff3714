"""Registry packages behind the ObjectStyles benchmark: fetched once into a cache, unpacked safely.

Why a cache: the two Debian packages are 290 MB of .deb files; a rebuild (or a second data dir)
must not fetch them again. Each package is pinned to one version, so every build reads the same
files. `.deb` files come from `apt-get download` (no installation, no root needed to read them),
npm tarballs from `npm pack`; both are unpacked with Python's `tarfile` and its "data" filter
(no absolute paths, no links out of the target), `.deb` through `dpkg-deb --fsys-tarfile`.
Only the folders the benchmark reads are unpacked.

Trust: each package is pinned by the sha256 of its file (the registry's: `apt-cache show` lists it
for a .deb; for npm it is the sha256 of the tarball whose sha1 is `npm view PKG dist.shasum`), and a
file whose hash differs is never unpacked, whether a fresh download or a file already in the cache
(a truncated download, a replaced or hand-made file). Unpacked folders are named by that hash, so a
folder unpacked from another file is never taken for this one, and `force` unpacks again from the
verified file. Unpacking stops past `max_unpacked_mb` (a package that expands without bound), and
refuses members that name a path outside the package. Symbolic links are skipped: Debian's
openclipart-png links 1,221 duplicate PNGs to their originals, which are unpacked anyway.
Every failure is a `PackageError` naming the package, the cache file and the fix.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path


class PackageError(RuntimeError):
    """A package could not be fetched or unpacked; the message says what to install or run."""


@dataclass(frozen=True)
class Package:
    """One pinned registry package and the part of it the benchmark reads."""

    key: str  # short name used in the builder and the manifest
    manager: str  # "apt" or "npm"
    name: str
    version: str
    license: str  # checked in the package's copyright / package.json
    keep: tuple[str, ...]  # member path prefixes to unpack (relative, no leading ./)
    sha256: str  # of the package file, as the registry serves it
    max_unpacked_mb: float  # cap on the kept part's size: about 1.5x what the genuine package holds

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}" if self.manager == "apt" else f"{self.name}@{self.version}"


PACKAGES: dict[str, Package] = {p.key: p for p in (
    Package("tuxpaint", "apt", "tuxpaint-stamps-default", "2022.06.04-1", "GPL-2",
            ("usr/share/tuxpaint/stamps/", "usr/share/doc/tuxpaint-stamps-default/copyright"),
            "6db6c1bfc870a47f1499d6203b083522eacb57c5f9c87d468f2e92eb6d9d5f34", 320),  # 207 MB unpacked
    Package("openclipart", "apt", "openclipart-png", "1:0.18+dfsg-19",
            "public domain (Open Clip Art Library; Debian copyright file)",
            ("usr/share/openclipart/png/", "usr/share/doc/openclipart-png/copyright"),
            "f07f1545a2970c2cf3fa339bc2405da1a95cf2b1827bfa05bf73eb1c20291c02", 240),  # 146 MB
    Package("fluent3d", "npm", "@lobehub/fluent-emoji-3d", "1.1.0", "MIT",
            ("package/assets/", "package/package.json"),
            "c1bb7eee7de090205a232518a9ab4adb3df458bfbe8a1f78232991194c8b2e58", 32),  # 17 MB
    Package("fluenthc", "npm", "@iconify-json/fluent-emoji-high-contrast", "1.2.6", "MIT",
            ("package/icons.json", "package/chars.json", "package/info.json", "package/package.json"),
            "0b92d48c90d2200bd499e3cdd09a127ca6a8c8ddefd34c35eb5a1e4994012ae0", 8),  # 2.7 MB
    Package("emojione", "npm", "@iconify-json/emojione-monotone", "1.2.1", "CC-BY-4.0",
            ("package/icons.json", "package/chars.json", "package/info.json", "package/package.json"),
            "40b90004bafb406b59266155ef9b7e1dd67bf2947fc8db8d07388776f4d0d04e", 8),  # 2.7 MB
    Package("notocolor", "npm", "@iconify-json/noto", "1.2.9", "Apache-2.0",
            ("package/icons.json", "package/chars.json", "package/info.json", "package/package.json"),
            "3e918d88fc945c0bb3d468dbace6f88caef67f01c9f0e7bcae0915a042e8f1ad", 40),  # 24 MB
)}


def package_cache() -> Path:
    from vldlib.data.cache import cache_root  # the one cache location ($VLDLIB_CACHE)

    return cache_root() / "packages"


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    if shutil.which(cmd[0]) is None:
        hint = ("install it with `apt-get install -y npm`" if cmd[0] == "npm" else
                "it ships with Debian/Ubuntu (apt); on other systems fetch the .deb by hand into "
                f"{cwd}")
        raise PackageError(f"the ObjectStyles build needs `{cmd[0]}` to fetch {what}, and it is not on "
                           f"PATH; {hint}. Or run `bash .ci/setup`.")
    r = subprocess.run(cmd, check=False, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise PackageError(f"`{' '.join(cmd)}` failed (exit {r.returncode}) in {cwd}: "
                           f"{(r.stderr or r.stdout).strip()[-600:]}\nCheck the package registry is "
                           f"reachable (for apt: run `apt-get update` once), or place the file in "
                           f"{cwd.parent} by hand.")


def _archive_name(p: Package) -> str:
    if p.manager == "apt":
        # apt-get download names files <name>_<version with ':' as %3a>_<arch>.deb
        return f"{p.name}_{p.version.replace(':', '%3a')}_all.deb"
    return f"{p.name.lstrip('@').replace('/', '-')}-{p.version}.tgz"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(p: Package, path: Path) -> Path:
    """`path` if its sha256 is the pinned one, else a PackageError naming the file and the fix."""
    got = sha256_of(path)
    if got != p.sha256:
        raise PackageError(f"{path} is not the pinned {p.spec}: its sha256 is {got}, the registry's is "
                           f"{p.sha256} (a truncated, damaged or replaced file). Delete {path} and run "
                           f"again to fetch it anew.")
    return path


def fetch(p: Package, cache: Path | None = None) -> Path:
    """The verified package file in the cache, downloaded first if missing (apt-get download / npm pack)."""
    cache = cache or package_cache()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / _archive_name(p)
    if path.is_file():
        return verify(p, path)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as tmp:
        if p.manager == "apt":
            _run(["apt-get", "download", p.spec], Path(tmp), f"the Debian package {p.spec}")
        else:
            _run(["npm", "pack", "--silent", p.spec], Path(tmp), f"the npm package {p.spec}")
        got = Path(tmp) / path.name
        if not got.is_file():
            raise PackageError(f"fetching {p.spec} made {sorted(os.listdir(tmp))}, not {path.name}.")
        verify(p, got)  # a bad download is deleted with its temporary folder, never cached
        os.replace(got, path)  # atomic: a killed download leaves no half file under the final name
    return path


def _members(tar: tarfile.TarFile, p: Package, archive: Path):
    """The kept regular files and folders, under the cap; a name leaving the package is an error."""
    cap, total = int(p.max_unpacked_mb * (1 << 20)), 0
    for m in tar:
        name = m.name.removeprefix("./")
        if not name.startswith(p.keep):
            continue
        if name.startswith("/") or ".." in name.split("/"):
            raise PackageError(f"{archive} ({p.spec}) has a member named {m.name!r}, which leaves the "
                               f"package's folder: not a genuine package. Delete {archive} and run again.")
        if not (m.isfile() or m.isdir()):
            continue  # links (Debian's duplicates), devices: skipped
        total += m.size
        if total > cap:
            raise PackageError(f"{archive} ({p.spec}) unpacks to more than its cap of {p.max_unpacked_mb:g} MB "
                               f"(`max_unpacked_mb`, about 1.5x the genuine package): not the genuine "
                               f"package. Delete {archive} and run again.")
        m.name = name
        yield m


def unpacked_dir(p: Package, cache: Path | None = None) -> Path:
    """Where the kept part of `p` is unpacked: named by the package file's pinned sha256."""
    return (cache or package_cache()) / "unpacked" / f"{p.key}-{p.sha256[:16]}"


def _extract(p: Package, archive: Path, tmp: Path) -> None:
    if p.manager == "apt":
        if shutil.which("dpkg-deb") is None:
            raise PackageError(f"unpacking {archive} needs `dpkg-deb` (Debian package dpkg).")
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        try:
            with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
                for m in _members(tar, p, archive):
                    tar.extract(m, tmp, filter="data")
        finally:
            proc.stdout.close()
            err = proc.stderr.read().decode(errors="replace").strip()
            code = proc.wait()
        if code != 0:
            raise PackageError(f"`dpkg-deb --fsys-tarfile {archive}` failed ({err[-200:] or f'exit {code}'}): "
                               f"the file is damaged. Delete {archive} and run again.")
    else:
        with tarfile.open(archive, "r:gz") as tar:
            for m in _members(tar, p, archive):
                tar.extract(m, tmp, filter="data")


def unpack(p: Package, archive: Path, cache: Path | None = None, force: bool = False) -> Path:
    """Unpack the kept part of the verified `archive` into `unpacked_dir` once (again if `force`)."""
    dest = unpacked_dir(p, cache)
    done = dest / ".complete"
    if not force and done.is_file() and done.read_text().split() == [p.sha256]:
        return dest
    verify(p, archive)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        _extract(p, archive, tmp)
        (tmp / ".complete").write_text(p.sha256 + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except PackageError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise PackageError(f"could not unpack {archive} ({p.spec}): {type(e).__name__}: {e}. Delete "
                           f"{archive} and run again.") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def package_roots(cache: Path | None = None, progress: bool = True, force: bool = False) -> dict[str, Path]:
    """Every package fetched, verified and unpacked: key -> folder holding the package's own layout.
    `force` unpacks every package again from its verified file."""
    roots = {}
    for key, p in PACKAGES.items():
        archive = fetch(p, cache)
        if progress:
            print(f"[vldlib] ObjectStyles: {p.spec} -> {archive.name} (sha256 verified)", flush=True)
        roots[key] = unpack(p, archive, cache, force=force)
    return roots
