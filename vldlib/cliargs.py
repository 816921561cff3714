"""One command-line style for every command: boolean flags, usage errors, exit codes, KEY=VALUE.

Booleans are `--flag` / `--no-flag` (and `--flag true|false` still works); errors are printed as
`error: MESSAGE`; the exit code is 2 for bad usage (a bad value or option, an unknown name) and 1
for a failure (a run that failed, a missing or damaged file, a full disk). The lowest layer, so the
data commands use it without importing torch.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Iterable

import yaml

TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class UsageError(ValueError):
    """A bad value or option given by the user (a flag, a config key, a run name): `error: ...`, exit 2."""


def error_exit_code(e: BaseException) -> int:
    """2 for bad usage (UsageError and its kin, a KeyError for an unknown name), 1 for a failure."""
    return 2 if isinstance(e, (UsageError, KeyError)) else 1


def print_error(e: BaseException) -> int:
    """Print `error: MESSAGE` (a KeyError without its repr quotes) on stderr; return the exit code."""
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {message}", file=sys.stderr)
    return error_exit_code(e)


def bool_from_text(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case); anything else is a ValueError."""
    low = str(text).lower()
    if low in TRUE_WORDS:
        return True
    if low in FALSE_WORDS:
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def parse_bool(text: str | bool) -> bool:
    """`bool_from_text` as an argparse type: a bad word is a usage error naming the option."""
    try:
        return text if isinstance(text, bool) else bool_from_text(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_flag(parser: argparse.ArgumentParser | Any, flag: str, *, dest: str | None = None, default: Any = False,
             help: str = "") -> None:
    """A boolean option in vldlib's one style: `--flag` (true), `--no-flag` (false), and `--flag true|false`
    still accepted."""
    dest = dest or flag.lstrip("-").replace("-", "_")
    parser.add_argument(flag, dest=dest, nargs="?", const=True, default=default, type=parse_bool,
                        metavar="true|false", help=help)
    parser.add_argument("--no-" + flag.lstrip("-"), dest=dest, action="store_false", help=argparse.SUPPRESS)


# ----------------------------------------------------------------------------- KEY=VALUE options
def read_yaml_mapping(path: str | Path, what: str = "key: value") -> dict[str, Any]:
    """A `--config` YAML file as a dict, each error naming the file and the fix: an unreadable
    file is a failure (ValueError, exit 1); bad YAML or a non-mapping is bad usage (exit 2).
    An empty file is {}."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ValueError(f"--config {p}: cannot read it ({e.strerror or e}); check the path.") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {p}: not valid YAML ({' '.join(str(e).split())}); fix the file.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {p}: expected a mapping of {what}, got a {type(data).__name__}.")
    return data


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float: YAML 1.1 insists on `1.0e-3` and would hand the
    notebook the *string* '1e-3', a silent bug for every learning-rate grid."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?
               |[0-9][0-9_]*[eE][-+]?[0-9]+|\.(?:inf|Inf|INF)|[-+]\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""",
               re.X),
    list("-+0123456789."))


def parse_value(text: str) -> Any:
    """A command-line value as YAML (`10` -> int, `1e-3` -> float, `[0, 1]` -> list, `x` -> 'x'),
    and `None`, the notebooks' own spelling of "not set", as None (YAML's `null`): a parameter
    documented as `tuned_by = None` must not become the string "None"."""
    if text.strip() == "None":
        return None
    return yaml.load(text, Loader=YamlLoader)


def parse_sets(items: Iterable[str], flag: str = "--set") -> dict[str, Any]:
    """`["steps=10", "lr=[1e-3]"]` -> `{"steps": 10, "lr": [0.001]}`."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} expects key=value, got {item!r}")
        try:
            out[key.strip()] = parse_value(value)
        except yaml.YAMLError as e:
            raise UsageError(f"{flag} {item!r}: the value is not valid YAML ({' '.join(str(e).split())}); "
                             f"quote it, e.g. {flag} '{key.strip()}=\"{value}\"'") from None
    return out
