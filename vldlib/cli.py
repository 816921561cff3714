"""`python -m vldlib COMMAND ...`: one front door; each command lives next to the code it runs.

Each module listed in COMMANDS defines `register_cli(subparsers)`, which adds its sub-parser and
sets `func` (called with the parsed args, returning an exit code). Modules import lazily, so
`python -m vldlib --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import typing

from vldlib.cliargs import FALSE_WORDS, TRUE_WORDS, parse_bool

# command -> module providing register_cli(subparsers)
COMMANDS = {
    "data": "vldlib.data.cli",
    "train": "vldlib.loop.cli",
    "report": "vldlib.evaluate.report",
    "quickstart": "vldlib.experiments.quickstart",
    "sweep": "vldlib.tools.sweep.cli",
    "bench": "vldlib.tools.bench.cli",
    "notebooks": "vldlib.tools.notebooks",
    "book": "vldlib.tools.book",
}


class _Parser(argparse.ArgumentParser):
    """argparse with vldlib's one error style: `error: ...` and exit 2 for bad usage (an unknown option,
    a bad value), the same prefix and codes every command's own errors use (`vldlib.config.print_error`).
    Sub-parsers inherit it (argparse makes them with the parent's class)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that command's module is imported (torch loads in seconds,
    and `python -m vldlib data list` should not wait for it)."""
    parser = _Parser(
        prog="python -m vldlib",
        description="Fine-tuning with very large dropout: data, training, reports, batches, benchmarks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # command not built yet
        mod.register_cli(sub)
    return parser


def _boolean_options(parser: argparse.ArgumentParser) -> set[str]:
    """Every `--flag` made by `add_flag` in the parser and its sub-parsers."""
    found = set()
    for action in parser._actions:
        if action.type is parse_bool:
            found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _boolean_options(sub)
    return found


def explicit_booleans(argv: list[str], flags: set[str]) -> list[str]:
    """`--flag` followed by something other than true/false becomes `--flag=true`, so a bare flag
    never swallows the positional after it (`data verify --quiet PACS`, `report --strict runs/`)."""
    out = []
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        is_word = following is not None and following.lower() in (*TRUE_WORDS, *FALSE_WORDS)
        out.append(f"{arg}=true" if arg in flags and following is not None and not is_word
                   and not following.startswith("-") else arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in COMMANDS else None)
    args = parser.parse_args(explicit_booleans(list(argv), _boolean_options(parser)))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; finished work is kept, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
