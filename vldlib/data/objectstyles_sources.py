"""Registry packages behind the ObjectStyles benchmark: fetched once into a cache, unpacked safely.

Why a cache: the two Debian packages are 290 MB of .deb files; a rebuild (or a second data dir)
must not fetch them again. Each package is pinned to one version, so every build reads the same
files. `.deb` files come from `apt-get download` (no installation, no root needed to read them),
npm tarballs from `npm pack`; both are unpacked with Python's `tarfile` and its "data" filter
(no absolute paths, no links out of the target), `.deb` through `dpkg-deb --fsys-tarfile`.
Only the folders the benchmark reads are unpacked.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
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

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}" if self.manager == "apt" else f"{self.name}@{self.version}"


PACKAGES: dict[str, Package] = {p.key: p for p in (
    Package("tuxpaint", "apt", "tuxpaint-stamps-default", "2022.06.04-1", "GPL-2",
            ("usr/share/tuxpaint/stamps/", "usr/share/doc/tuxpaint-stamps-default/copyright")),
    Package("openclipart", "apt", "openclipart-png", "1:0.18+dfsg-19",
            "public domain (Open Clip Art Library; Debian copyright file)",
            ("usr/share/openclipart/png/", "usr/share/doc/openclipart-png/copyright")),
    Package("fluent3d", "npm", "@lobehub/fluent-emoji-3d", "1.1.0", "MIT",
            ("package/assets/", "package/package.json")),
    Package("fluenthc", "npm", "@iconify-json/fluent-emoji-high-contrast", "1.2.6", "MIT",
            ("package/icons.json", "package/chars.json", "package/info.json", "package/package.json")),
    Package("emojione", "npm", "@iconify-json/emojione-monotone", "1.2.1", "CC-BY-4.0",
            ("package/icons.json", "package/chars.json", "package/info.json", "package/package.json")),
    Package("notocolor", "npm", "@iconify-json/noto", "1.2.9", "Apache-2.0",
            ("package/icons.json", "package/chars.json", "package/info.json", "package/package.json")),
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


def fetch(p: Package, cache: Path | None = None) -> Path:
    """The package file in the cache, downloaded first if missing (apt-get download / npm pack)."""
    cache = cache or package_cache()
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / _archive_name(p)
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as tmp:
        if p.manager == "apt":
            _run(["apt-get", "download", p.spec], Path(tmp), f"the Debian package {p.spec}")
        else:
            _run(["npm", "pack", "--silent", p.spec], Path(tmp), f"the npm package {p.spec}")
        got = Path(tmp) / path.name
        if not got.is_file():
            raise PackageError(f"fetching {p.spec} made {sorted(os.listdir(tmp))}, not {path.name}.")
        os.replace(got, path)  # atomic: a killed download leaves no half file under the final name
    return path


def _members(tar: tarfile.TarFile, keep: tuple[str, ...]):
    for m in tar:
        name = m.name.removeprefix("./")
        if (m.isfile() or m.isdir()) and name.startswith(keep):
            m.name = name
            yield m


def unpack(p: Package, archive: Path, cache: Path | None = None) -> Path:
    """Unpack the kept part of `archive` once into `cache/unpacked/<archive>/`; return that folder."""
    cache = cache or package_cache()
    dest = cache / "unpacked" / archive.name
    if (dest / ".complete").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}-", dir=dest.parent))
    try:
        if p.manager == "apt":
            if shutil.which("dpkg-deb") is None:
                raise PackageError(f"unpacking {archive} needs `dpkg-deb` (Debian package dpkg).")
            proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(archive)], stdout=subprocess.PIPE)
            with tarfile.open(fileobj=proc.stdout, mode="r|*") as tar:
                for m in _members(tar, p.keep):
                    tar.extract(m, tmp, filter="data")
            if proc.wait() != 0:
                raise PackageError(f"`dpkg-deb --fsys-tarfile {archive}` failed; the file is damaged: "
                                   f"delete it and build again.")
        else:
            with tarfile.open(archive, "r:gz") as tar:
                for m in _members(tar, p.keep):
                    tar.extract(m, tmp, filter="data")
        (tmp / ".complete").write_text(p.spec + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except (tarfile.TarError, OSError) as e:
        raise PackageError(f"could not unpack {archive} ({e}); delete it and build again.") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def package_roots(cache: Path | None = None, progress: bool = True) -> dict[str, Path]:
    """Every package fetched and unpacked: key -> folder holding the package's own layout."""
    roots = {}
    for key, p in PACKAGES.items():
        archive = fetch(p, cache)
        if progress:
            print(f"[vldlib] ObjectStyles: {p.spec} -> {archive.name}", flush=True)
        roots[key] = unpack(p, archive, cache)
    return roots
