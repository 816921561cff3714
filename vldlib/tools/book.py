"""`python -m vldlib book [--out DIR] [--check]`: the results as one static HTML site, to read without running.

The executed notebooks committed under `outputs/` hold every number and figure, but reading them
needs Jupyter or GitHub; the summaries and the README are Markdown. This renders them all into one
folder of plain HTML pages (default `outputs/book/`, open `index.html`) that reads offline: images
are embedded in the notebooks' pages or copied beside the Markdown ones, no page loads a script,
style sheet or image from the internet (nbconvert's `lab` template asks for require.js, MathJax,
mermaid and the widget manager from CDNs: the scripts are dropped, the widgets' text shows instead),
and links between the rendered files point at their pages.

What is rendered is found, never listed: the project's README.md, outputs/README.md, every
`outputs/**/summary.md` and `outputs/**/*.ipynb`, and every Markdown file those link to (the bench
reports). Other files they link to (PNG, CSV) are copied. A page's name is its path under
`outputs/` (`effect_map_6seeds/07_effect_map.html`); files outside `outputs/` go under `project/`.

The site is built in a temporary folder beside DIR and then replaces DIR as a whole, so a reader
never sees half a book and nothing is written elsewhere. `check_site` (and `--check`) verifies a
built site without a browser: every local link and image resolves to a file in it, every page
links back to the index and the index to every page, nothing is fetched from the internet.
"""

from __future__ import annotations

import argparse
import html
import os
import posixpath
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlsplit

import nbformat
from nbconvert import HTMLExporter
from nbconvert.filters.markdown_mistune import markdown2html_mistune
from pygments.formatters import HtmlFormatter
from tqdm.auto import tqdm

from vldlib.cliargs import add_flag, print_error
from vldlib.paths import project_root

MARK = ".vldlib-book"  # in every built site: only such a folder is ever replaced
OUTPUTS = "outputs"
OUTSIDE = "project"  # the site folder of rendered or copied files that are not under outputs/
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# tags whose src/href a browser fetches while showing the page (an <a href> is only followed on a click)
FETCHED = {"img", "script", "link", "iframe", "source", "video", "audio", "embed", "object", "input", "track"}
REMOTE_CSS = re.compile(r"""(?:url\(\s*['"]?|@import\s+['"])\s*(?:https?:)?//""", re.I)

CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; line-height: 1.5;
       color: #1f2328; margin: 0; }
main { max-width: 62rem; margin: 0 auto; padding: 1rem 1.5rem 3rem; }
h1, h2, h3 { line-height: 1.25; } h1, h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3em; }
a { color: #0969da; } a.anchor-link { visibility: hidden; margin-left: .3em; text-decoration: none; }
h1:hover a.anchor-link, h2:hover a.anchor-link, h3:hover a.anchor-link { visibility: visible; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 90%; }
code { background: #eff1f3; padding: .15em .3em; border-radius: 4px; }
pre { background: #f6f8fa; padding: .8em 1em; overflow: auto; border-radius: 6px; } pre code { background: none; }
table { border-collapse: collapse; margin: 1em 0; display: block; overflow: auto; }
th, td { border: 1px solid #d0d7de; padding: .3em .7em; } tr:nth-child(2n) { background: #f6f8fa; }
img { max-width: 100%; } .vldlib-book-offline { font-size: 85%; border: 1px solid #d0d7de; padding: 0 .3em; }
"""
NAV_CSS = """
nav.vldlib-book-nav { font: 14px/1.5 -apple-system, "Segoe UI", Roboto, Arial, sans-serif; padding: .5rem 1.5rem;
  background: #f6f8fa; border-bottom: 1px solid #d0d7de; position: sticky; top: 0; z-index: 1000; }
nav.vldlib-book-nav a { color: #0969da; font-weight: 600; } nav.vldlib-book-nav code { color: #57606a; }
"""


@dataclass
class Page:
    source: Path  # absolute
    site: str  # posix path inside the site, e.g. "effect_map/07_effect_map.html"
    kind: str  # "notebook" or "markdown"
    source_rel: str = ""  # posix path in the project, e.g. "outputs/effect_map/07_effect_map.ipynb"
    title: str = ""
    html: str = ""


@dataclass
class Book:
    out: Path
    pages: list[Page]
    size: int  # bytes of every file in the site
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- HTML, tag by tag

class _Tags(HTMLParser):
    """Every start tag with its offsets in the text (to rewrite attributes in place, leaving the rest
    byte for byte), and every id and anchor name (the targets of `#fragment` links)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[int, int, str, list[tuple[str, str | None]], str]] = []
        self.ids: set[str] = set()
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        line, col = self.getpos()
        start = self._line_starts[line - 1] + col
        raw = self.get_starttag_text() or ""
        self.found.append((start, start + len(raw), tag, attrs, raw))
        for key, value in attrs:
            if value and (key == "id" or (key == "name" and tag == "a")):
                self.ids.add(value)


def _start_tag(tag: str, attrs: list[tuple[str, str | None]], raw: str) -> str:
    inner = "".join(f" {k}" if v is None else f' {k}="{html.escape(v, quote=True)}"' for k, v in attrs)
    return f"<{tag}{inner}{' /' if raw.rstrip().endswith('/>') else ''}>"


def _rewrite(text: str, fix) -> str:
    """`fix(tag, attrs, raw)` returns a start tag's replacement, or None to keep it."""
    pieces, last = [], 0
    for start, end, tag, attrs, raw in _Tags(text).found:
        new = fix(tag, attrs, raw)
        if new is None or text[start:end] != raw:
            continue
        pieces += [text[last:start], new]
        last = end
    return "".join(pieces + [text[last:]])


def _is_remote(url: str) -> bool:
    parts = urlsplit(url.strip())
    return parts.scheme in ("http", "https") or (not parts.scheme and bool(parts.netloc))


def _is_local(url: str) -> bool:
    """A path to a file (with or without #fragment): not a scheme (http, data, mailto), not `#x` alone."""
    parts = urlsplit(url.strip())
    return not parts.scheme and not parts.netloc and bool(parts.path)


def _heading(text: str) -> str:
    """The text of the first <h1> (else <h2>, <h3>) of a page, without nbconvert's ¶ anchor."""
    for level in "123":
        m = re.search(rf"<h{level}\b[^>]*>(.*?)</h{level}>", text, re.S | re.I)
        if m:
            title = html.unescape(re.sub(r"<a class=\"anchor-link\".*?</a>|<[^>]+>", "", m.group(1), flags=re.S))
            if title.strip():
                return " ".join(title.split())
    return ""


# ----------------------------------------------------------------------------- rendering

def _render_markdown(path: Path) -> str:
    return markdown2html_mistune(path.read_text(encoding="utf-8"))


def _render_notebook(path: Path, exporter: HTMLExporter) -> str:
    """nbconvert's lab page, less its scripts: the widgets (tqdm bars) show their saved text instead
    of a blank box waiting for a widget manager from unpkg.com, and no CDN is ever asked."""
    nb = nbformat.read(path, as_version=4)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if "outputs" in cell:
            for out in cell.outputs:
                out.get("data", {}).pop(WIDGET_VIEW, None)
            cell.outputs = [o for o in cell.outputs if "data" not in o or o.data]
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": path.stem, "path": str(path.parent)}})
    return re.sub(r"<script\b[^>]*>.*?</script\s*>", "", body, flags=re.S | re.I)


def _markdown_page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}{HtmlFormatter().get_style_defs('.highlight')}"
            f"</style>\n</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n")


def _add_nav(text: str, page: Page, rel_root: str) -> str:
    """The bar back to the index, at the top of every page."""
    nav = (f'<nav class="vldlib-book-nav"><a href="{rel_root}index.html">&larr; all pages</a> &middot; '
           f"<code>{html.escape(page.source_rel)}</code></nav>\n")
    text = re.sub(r"</head>", lambda _: f"<style>{NAV_CSS}</style>\n</head>", text, count=1, flags=re.I)
    text = re.sub(r"<title>.*?</title>", lambda _: f"<title>{html.escape(page.title)}</title>", text,
                  count=1, flags=re.S | re.I)
    return re.sub(r"<body\b[^>]*>", lambda m: m.group(0) + "\n" + nav, text, count=1, flags=re.I)


# ----------------------------------------------------------------------------- what goes in

def _hidden(path: Path, under: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(under).parts)


def find_sources(root: Path, out: Path) -> list[Path]:
    """README.md, outputs/README.md, every outputs/**/summary.md and outputs/**/*.ipynb, in a fixed
    order; never inside `out` or a hidden folder (checkpoints, a book being built)."""
    outputs = root / OUTPUTS
    if not outputs.is_dir():
        raise FileNotFoundError(
            f"no outputs folder at {outputs}: the book renders the executed notebooks and summaries committed "
            f"there. Run `python -m vldlib book` inside a checkout of vldlib, or pass --root PROJECT (the folder "
            f"holding outputs/)")
    found = [p for p in (root / "README.md", outputs / "README.md") if p.is_file()]
    for pattern in ("summary.md", "*.ipynb"):
        found += sorted(p for p in outputs.rglob(pattern) if p.is_file() and not _hidden(p, outputs)
                        and not p.is_relative_to(out))
    if not any(p.suffix == ".ipynb" or p.name == "summary.md" for p in found):
        raise FileNotFoundError(f"no executed notebooks (*.ipynb) or summary.md under {outputs}: nothing to read. "
                                f"Run a notebook first (e.g. `python -m vldlib quickstart`), or pass --root PROJECT")
    return found


class _Site:
    """Where each rendered or copied file goes in the site: its path under outputs/ (or project/),
    a page's suffix .html; the second of two files claiming one name gets name-2.html."""

    def __init__(self, root: Path):
        self.root, self.taken = root, {}

    def name(self, source: Path, page: bool) -> str:
        rel = PurePosixPath(source.relative_to(self.root).as_posix())
        rel = PurePosixPath(*rel.parts[1:]) if rel.parts[0] == OUTPUTS and len(rel.parts) > 1 else OUTSIDE / rel
        if page:
            rel = rel.with_suffix(".html")
        name, n = str(rel), 1
        while self.taken.setdefault(name, source) != source:
            n += 1
            name = str(rel.with_name(f"{rel.stem}-{n}{rel.suffix}"))
        return name


def _target(url: str, source: Path, root: Path) -> Path | None:
    """The file a local link of `source` names (None: outside the project)."""
    path = unquote(urlsplit(url.strip()).path)
    base = root if path.startswith("/") else source.parent
    target = Path(os.path.normpath(base / path.lstrip("/")))
    return target if target.is_relative_to(root) else None


# ----------------------------------------------------------------------------- building

def _check_out(out: Path, root: Path) -> None:
    if out == root or root.is_relative_to(out) or (root / OUTPUTS).is_relative_to(out):
        raise ValueError(f"--out {out} would replace the project or its outputs/; name a folder of its own, "
                         f"e.g. {root / OUTPUTS / 'book'}")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file; name a folder for the book")
    if out.is_dir() and any(out.iterdir()) and not (out / MARK).exists():
        raise FileExistsError(f"--out {out} holds files that are not a book built by `python -m vldlib book` "
                              f"(no {MARK} in it) and would be replaced; name another folder or empty this one")


def build_book(root: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
               progress: bool = True) -> Book:
    """Render the project's README, summaries and executed notebooks into the site `out` (default
    ROOT/outputs/book), replacing it as a whole; returns its pages and size."""
    root = Path(os.path.abspath(root or project_root()))
    out = Path(os.path.abspath(os.path.expanduser(str(out)))) if out else root / OUTPUTS / "book"
    _check_out(out, root)
    sources = find_sources(root, out)
    site, warnings = _Site(root), []
    pages = {p: Page(p, site.name(p, True), "notebook" if p.suffix == ".ipynb" else "markdown") for p in sources}
    exporter = HTMLExporter(template_name="lab", embed_images=True)
    queue = list(sources)
    bar = tqdm(total=len(queue), desc="book", unit="page", disable=not progress)
    while queue:
        page = pages[queue.pop(0)]
        page.source_rel = page.source.relative_to(root).as_posix()
        bar.set_postfix_str(page.source_rel, refresh=False)
        try:
            if page.kind == "notebook":
                page.html = _render_notebook(page.source, exporter)
            else:
                page.html = _render_markdown(page.source)
        except (OSError, ValueError, nbformat.ValidationError) as e:  # a notebook being written, say
            warnings.append(f"{page.source_rel}: not rendered ({type(e).__name__}: {e})")
            del pages[page.source]
            bar.update()
            continue
        page.title = _heading(page.html) or page.source.name
        for _, _, tag, attrs, _ in _Tags(page.html).found:  # a Markdown file a page links to is a page too
            href = dict(attrs).get("href") if tag == "a" else None
            target = _target(href, page.source, root) if href and _is_local(href) else None
            if (target and target.suffix == ".md" and target.is_file() and target not in pages
                    and not _hidden(target, root) and not target.is_relative_to(out)):
                pages[target] = Page(target, site.name(target, True), "markdown")
                queue.append(target)
                bar.total += 1
        bar.update()
    bar.close()
    ordered = sorted(pages.values(), key=_order)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        size = _write(tmp, ordered, pages, site, root, warnings)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Book(out, ordered, size, warnings)


def _order(page: Page) -> tuple:
    """README first, then outputs/README, then folder by folder: summaries before notebooks."""
    rel = page.source_rel
    return rel != "README.md", rel != f"{OUTPUTS}/README.md", posixpath.dirname(rel), page.kind != "markdown", rel


def _write(tmp: Path, ordered: list[Page], pages: dict[Path, Page], site: _Site, root: Path,
           warnings: list[str]) -> int:
    copies: dict[Path, str] = {}
    for page in ordered:
        here = posixpath.dirname(page.site)

        def fix(tag, attrs, raw, page=page, here=here):
            attr = "href" if tag in ("a", "link") else "src"
            url = dict(attrs).get(attr)
            if url is None:
                return None
            if _is_remote(url) and tag in FETCHED:
                if tag == "img":
                    alt = dict(attrs).get("alt") or "image"
                    return (f'<span class="vldlib-book-offline" title="not shown offline: {html.escape(url)}">'
                            f"{html.escape(alt)}</span>")
                return "" if tag == "link" else _start_tag(tag, [(k, v) for k, v in attrs if k != attr], raw)
            if not _is_local(url):
                return None
            target = _target(url, page.source, root)
            if target in pages:
                name = pages[target].site
            elif target is not None and target.is_file():
                name = copies.setdefault(target, site.name(target, False))
            else:
                warnings.append(f"{page.source_rel}: links to {url}, which is "
                                f"{'outside the project' if target is None else 'missing or a folder'}")
                return None
            parts = urlsplit(url.strip())
            new = quote(posixpath.relpath(name, here or ".")) + (f"?{parts.query}" if parts.query else "") + (
                f"#{parts.fragment}" if parts.fragment else "")
            return _start_tag(tag, [(k, new if k == attr else v) for k, v in attrs], raw)

        body = _rewrite(page.html, fix)
        text = body if page.kind == "notebook" else _markdown_page(page.title, body)
        rel_root = "../" * page.site.count("/")
        _put(tmp / page.site, _add_nav(text, page, rel_root))
    for source, name in sorted(copies.items(), key=lambda kv: kv[1]):
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp / name)
    _put(tmp / "index.html", _index(ordered))
    _put(tmp / MARK, "built by `python -m vldlib book`; the whole folder is replaced at the next build\n")
    return sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file())


def _put(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _index(pages: list[Page]) -> str:
    rows = "\n".join(f'<tr><td><a href="{quote(p.site)}">{html.escape(p.title)}</a></td>'
                     f"<td><code>{html.escape(p.source_rel)}</code></td></tr>" for p in pages)
    body = (f"<h1>vldlib: the results, readable without running</h1>\n<p>{len(pages)} pages rendered by "
            "<code>python -m vldlib book</code> from the executed notebooks and summaries under "
            "<code>outputs/</code>; they read offline.</p>\n"
            f"<table>\n<thead><tr><th>page</th><th>rendered from</th></tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>")
    return _markdown_page("vldlib book", body)


def _replace(tmp: Path, out: Path) -> None:
    """tmp becomes out; an old book is moved aside first and deleted after, restored if the swap fails."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------- checking

def _finds(fragment: str, ids: set[str]) -> bool:
    """Whether a `#fragment` reaches an id as a browser resolves it: the fragment as written, or
    percent-decoded (nbconvert writes heading ids percent-encoded, "11-%C2%B7-Is-...")."""
    return fragment in ids or unquote(fragment) in ids


def check_site(site: str | os.PathLike) -> list[str]:
    """Problems of a built site, one line each (none: it reads offline): a local link or image that
    names no file of the site, a `#fragment` no id of its page, anything fetched from the internet,
    a page not linked from index.html or not linking back to it."""
    site = Path(site).resolve()
    pages = sorted(p for p in site.rglob("*.html") if not _hidden(p, site))
    if not (site / "index.html").is_file():
        return [f"{site}: no index.html (build it with `python -m vldlib book --out {site}`)"]
    parsed = {p: _Tags(p.read_text(encoding="utf-8", errors="replace")) for p in pages}
    problems, linked_from_index = [], set()
    for page, tags in parsed.items():
        rel, links_index = page.relative_to(site).as_posix(), False
        if REMOTE_CSS.search(page.read_text(encoding="utf-8", errors="replace")):
            problems.append(f"{rel}: a style loads something from the internet (url(http...) or @import)")
        for _, _, tag, attrs, _ in tags.found:
            for attr, url in attrs:
                if attr not in ("href", "src", "data", "poster") or url is None or (tag == "a" and attr != "href"):
                    continue
                if _is_remote(url):
                    if tag in FETCHED:
                        problems.append(f"{rel}: <{tag} {attr}={url!r}> needs the internet")
                    continue
                parts = urlsplit(url.strip())
                if parts.scheme or parts.netloc:
                    continue  # data:, mailto:
                if not parts.path:
                    if parts.fragment and not _finds(parts.fragment, tags.ids):
                        problems.append(f"{rel}: <{tag} {attr}={url!r}>: no id {parts.fragment!r} in this page")
                    continue
                target = Path(os.path.normpath(page.parent / unquote(parts.path)))
                if not target.is_relative_to(site):
                    problems.append(f"{rel}: <{tag} {attr}={url!r}> points outside the site")
                elif not target.is_file():
                    problems.append(f"{rel}: <{tag} {attr}={url!r}>: no such file {target.relative_to(site)}")
                elif parts.fragment and target in parsed and not _finds(parts.fragment, parsed[target].ids):
                    problems.append(f"{rel}: <{tag} {attr}={url!r}>: no id {parts.fragment!r} in "
                                    f"{target.relative_to(site)}")
                elif tag == "a":
                    links_index |= target == site / "index.html"
                    if page == site / "index.html":
                        linked_from_index.add(target)
        if page != site / "index.html" and not links_index:
            problems.append(f"{rel}: no link back to index.html")
    problems += [f"index.html: no link to {p.relative_to(site).as_posix()}"
                 for p in pages if p != site / "index.html" and p not in linked_from_index]
    return problems


# ----------------------------------------------------------------------------- command line

def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("book", help="render the executed notebooks and summaries into one static HTML site",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="example:\n  python -m vldlib book --check && xdg-open outputs/book/index.html")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="folder of the site, replaced as a whole (default: outputs/book of the project)")
    p.add_argument("--root", metavar="DIR", default=None,
                   help="the project whose README.md and outputs/ are rendered (default: the checkout at or above "
                        "the current folder)")
    add_flag(p, "--check", help="then check every link and image of the site resolves offline; exit 1 listing "
                                "the broken ones")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    try:
        book = build_book(args.root, args.out)
    except (OSError, ValueError) as e:
        return print_error(e)
    for warning in book.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"book: {len(book.pages)} pages (and index.html), {book.size / 1e6:.1f} MB in {book.out}; "
          f"open {book.out / 'index.html'}")
    if not args.check:
        return 0
    problems = check_site(book.out)
    for problem in problems:
        print(f"broken: {problem}")
    if problems:
        return print_error(RuntimeError(f"{len(problems)} broken link(s) or image(s) in {book.out} (listed above)"))
    print("check: every link and image resolves inside the site, nothing is fetched from the internet")
    return 0
