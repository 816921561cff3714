"""`python -m vldlib data {list,download,verify,build}`: get a benchmark onto disk and check it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vldlib.cliargs import add_flag, print_error

EPILOG = """\
examples:
  python -m vldlib data list
  python -m vldlib data download PACS --data-dir data
  python -m vldlib data download TerraIncognita --data-dir data       # 6.5 GB of camera-trap images
  python -m vldlib data download OfficeHome --data-dir data --archive ~/Downloads/office_home.zip
  python -m vldlib data verify TerraIncognita --data-dir data         # exit code 1 on any mismatch
  python -m vldlib data verify path/to/my_benchmark                   # any <domain>/<class>/<image> folder
  python -m vldlib data download PACS --data-dir data --source hf     # the Hugging Face Hub copy
  python -m vldlib data build emoji --data-dir data                   # offline benchmark, no download
  python -m vldlib data build ObjectStyles --data-dir data            # offline, from apt/npm packages
  python -m vldlib data build ObjectStyles@256 --data-dir data        # the same, stored at 256 px

Downloads resume after an interruption (run the same command again). When a source fails (Google
Drive quotas, moved links) the error says what to fetch by hand and the --archive command that
imports it; PACS and OfficeHome fall back to their Hugging Face Hub copies (--source hf takes
them directly). VLDLIB_MIRROR=https://host/dir fetches every file as <mirror>/<file name> instead.
The data dir defaults to $VLDLIB_DATA, else ./data.
"""


def _data_dir(args: argparse.Namespace) -> Path:
    import os

    return Path(args.data_dir or os.environ.get("VLDLIB_DATA", "data"))


def _cmd_list(args: argparse.Namespace) -> int:
    from vldlib.data.benchmarks import HUB_DATASETS, TOTAL
    from vldlib.data.registry import get_spec, list_benchmarks

    for name in list_benchmarks():
        spec = get_spec(name)
        ncls = spec.num_classes if spec.classes else "?"
        print(f"{spec.name}  (folder {spec.dirname}/, {len(spec.domains)} domains, {ncls} classes, "
              f"{spec.n_steps} steps)")
        if spec.description:
            print(f"  {spec.description}")
        for label, counts in spec.counts.items():
            per = ", ".join(f"{d} {counts[d]}" for d in spec.domains if d in counts)
            total = counts.get(TOTAL, sum(v for k, v in counts.items() if k != TOTAL))
            print(f"  counts [{label}]: {per + '; ' if per else ''}total {total}")
        if not spec.counts:
            print(f"  domains: {', '.join(spec.domains)}")
        for s in spec.sources:
            print(f"  source: {s.url}  ->  {s.filename}" + (f"  ({s.note})" if s.note else ""))
        if spec.name in HUB_DATASETS:
            print(f"  source (--source hf, and the fallback): https://huggingface.co/datasets/"
                  f"{HUB_DATASETS[spec.name]}")
        if spec.builder is not None:
            print(f"  built offline: python -m vldlib data build {spec.name} --data-dir DIR")
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from vldlib.data.download import download_benchmark
    from vldlib.data.folder import DataError

    try:
        path = download_benchmark(args.name, _data_dir(args), archive=args.archive or None,
                                  progress=not args.quiet, mirror=args.mirror, force=args.force,
                                  allow_count_mismatch=args.allow_count_mismatch,
                                  keep_downloads=args.keep_downloads, source=args.source,
                                  max_extract_bytes=(None if args.max_extract_mb is None
                                                     else int(args.max_extract_mb * (1 << 20))))
    except (DataError, KeyError) as e:
        return print_error(e)  # 2: an unknown name; 1: the download or the archive failed
    print(path)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from vldlib.data.verify import verify_path

    try:
        report = verify_path(args.name, _data_dir(args), check_images=args.image_check,
                             progress=not args.quiet)
    except KeyError as e:
        return print_error(e)
    print(report.table() if report.found else report.summary())
    return 0 if report.ok else 1


def _cmd_build(args: argparse.Namespace) -> int:
    from vldlib.data.registry import get_spec

    try:
        spec = get_spec(args.name)
    except KeyError as e:
        return print_error(e)
    if spec.sources and spec.builder is None:
        print(f"error: {spec.name} is downloaded, not built; get it with "
              f"`python -m vldlib data download {spec.name} --data-dir DIR`.", file=sys.stderr)
        return 2  # a benchmark that is not built: bad usage
    from vldlib.data.emoji import build_emoji  # imported only when asked: it pulls in the renderers

    from vldlib.data.folder import DataError
    from vldlib.data.objectstyles import ObjectStylesError
    from vldlib.data.objectstyles_sources import PackageError

    builder = spec.builder or build_emoji
    try:
        print(builder(_data_dir(args), force=args.force, progress=not args.quiet))
    except (PackageError, ObjectStylesError, DataError, FileExistsError) as e:
        return print_error(e)  # one line naming the file and the fix, no traceback
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "data", help="list, download, verify or build benchmarks",
        description="Benchmarks on disk: list the registered ones, download and verify the real ones, "
                    "build the offline one.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--data-dir", default=None, help="folder holding the benchmarks (default: "
                       "$VLDLIB_DATA or ./data)")
        add_flag(q, "--quiet", help="no progress bars")

    q = sub.add_parser("list", help="registered benchmarks: domains, expected counts, sources",
                       epilog="example: python -m vldlib data list")
    q.set_defaults(func=_cmd_list)

    q = sub.add_parser("download", help="download, check and install a benchmark",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  python -m vldlib data download VLCS --data-dir data\n"
                              "  python -m vldlib data download TerraIncognita --data-dir data "
                              "--archive eccv_18_all_images_sm.tar.gz")
    q.add_argument("name", help="benchmark name (see `data list`)")
    common(q)
    q.add_argument("--archive", action="append", metavar="FILE",
                   help="a source file fetched by hand, used instead of downloading it (repeat for "
                        "several; named as the source, e.g. PACS.zip)")
    q.add_argument("--mirror", default=None, help="fetch <MIRROR>/<file name> instead of the public "
                   "URLs (default: $VLDLIB_MIRROR)")
    add_flag(q, "--force", help="replace an existing folder")
    add_flag(q, "--allow-count-mismatch", help="install even if the image counts match no accepted version")
    add_flag(q, "--keep-downloads", help="keep the archives in DATA/.downloads")
    q.add_argument("--source", choices=("auto", "primary", "hf"), default="auto",
                   help="primary: the registered links; hf: the Hugging Face Hub copy (PACS, OfficeHome; "
                        "$HF_ENDPOINT for a mirror); auto (default): primary, then the Hub copy if a link fails")
    q.add_argument("--max-extract-mb", type=float, default=None, metavar="MB",
                   help="refuse an archive that expands past MB megabytes (default: 2 MB per expected "
                        "image, at least 1 GB: a zip bomb guard)")
    q.set_defaults(func=_cmd_download)

    q = sub.add_parser("verify", help="count images per domain and class against the expected counts",
                       epilog="example: python -m vldlib data verify PACS --data-dir data "
                              "(exit code 1 on any mismatch)")
    q.add_argument("name", help="benchmark name (see `data list`) or a folder path laid out as "
                                "<domain>/<class>/<image>")
    common(q)
    add_flag(q, "--image-check", default=True, help="decode every image (--no-image-check: count files only)")
    q.set_defaults(func=_cmd_verify)

    q = sub.add_parser("build", help="build an offline benchmark (emoji, ObjectStyles, ObjectStyles@256)",
                       epilog="examples:\n  python -m vldlib data build emoji --data-dir data\n"
                              "  python -m vldlib data build ObjectStyles@256 --data-dir data   # stored at 256 px",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("name", help="benchmark name, e.g. emoji, ObjectStyles or ObjectStyles@256 (its stored size)")
    common(q)
    add_flag(q, "--force", help="rebuild even if it exists")
    q.set_defaults(func=_cmd_build)
