"""`python -m vldlib book` (issue 25 section 3, readable without running): a tiny fake project (an
executed notebook with text, an image and a widget output, a README and a summary linking to it and
to a PNG) is rendered into one static site; the pages expected (counted here by walking the tree),
the links and images (resolved here with html.parser), nothing fetched from the internet, nothing
written outside the site, and `check_site` catching a broken link are checked. The slow test opens
every page in headless Chromium over a loopback HTTP server: every local link answers 200, every
image decodes (naturalWidth > 0), no request leaves the machine; and a broken link is reported.

The browser test needs Debian's `chromium` and `chromium-driver` and PyPI's `selenium` (.ci/setup
installs them); skipped, saying which is missing, without them."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import os
import re
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest
from PIL import Image

from conftest import headless_chromium

from vldlib.cli import main
from vldlib.tools.book import MARK, build_book, check_site

WIDGET = "application/vnd.jupyter.widget-view+json"


def _png(color=(200, 30, 30), size=(6, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _notebook(png: bytes) -> nbformat.NotebookNode:
    """An executed notebook: a heading, a code cell with a printed line, a figure and a tqdm widget."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# Demo notebook\n\n## A section\n\nIts [summary](summary.md)."),
        nbformat.v4.new_code_cell("print('hello book')\nshow_plot()", execution_count=1, outputs=[
            nbformat.v4.new_output("stream", name="stdout", text="hello book\n"),
            nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(png).decode(),
                                                         "text/plain": "<Figure size 6x4>"}),
            nbformat.v4.new_output("display_data", data={
                WIDGET: {"model_id": "abc", "version_major": 2, "version_minor": 0},
                "text/plain": "runs: 100%|##########| 3/3 [00:00<?, ?run/s]"}),
        ]),
    ]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2,
                                                                             "version_minor": 0}}
    return nb


def make_project(root: Path) -> Path:
    """ROOT/README.md, ROOT/outputs/{README.md, demo/{summary.md, 01_demo.ipynb, plot.png, table.csv}}
    and a checkpoint copy of the notebook in a hidden folder (never a page)."""
    demo = root / "outputs" / "demo"
    demo.mkdir(parents=True)
    png = _png()
    (demo / "plot.png").write_bytes(png)
    (demo / "table.csv").write_text("a,b\n1,2\n")
    nbformat.write(_notebook(png), demo / "01_demo.ipynb")
    (root / "outputs" / ".ipynb_checkpoints").mkdir()
    nbformat.write(_notebook(png), root / "outputs" / ".ipynb_checkpoints" / "01_demo-checkpoint.ipynb")
    (demo / "summary.md").write_text("# Demo summary\n\n| rate | gain |\n|---|---|\n| 0.9 | +1.0 |\n\n"
                                     "![the plot](plot.png)\n\nFrom [the notebook](01_demo.ipynb#A-section).\n")
    (root / "outputs" / "README.md").write_text("# outputs\n\n- [demo](demo/summary.md)\n")
    (root / "README.md").write_text(
        "# Fake project\n\nSee [the demo notebook](outputs/demo/01_demo.ipynb), [its summary](outputs/demo/summary.md),"
        " the [table](outputs/demo/table.csv) and [upstream](https://example.com/x).\n\n"
        "![the plot](outputs/demo/plot.png)\n\n[![badge](https://example.com/badge.svg)](https://example.com/run)\n")
    return root


class _Refs(HTMLParser):
    """(tag, attribute, value) of every href and src of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.refs = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.refs += [(tag, k, v) for k, v in attrs if k in ("href", "src") and v is not None]


def _local(page: Path, url: str) -> Path | None:
    """The file a relative URL of `page` names, or None for a remote, data: or #fragment URL."""
    if re.match(r"^([a-z]+:|//|#)", url):
        return None
    return Path(os.path.normpath(page.parent / urllib.request.url2pathname(url.split("#")[0])))


def _files(folder: Path, skip: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and not p.is_relative_to(skip)}


def test_the_book_has_every_page_its_links_resolve_and_nothing_is_fetched_or_written_elsewhere(tmp_path):
    root = make_project(tmp_path / "proj")
    out = root / "outputs" / "book"
    before = _files(tmp_path, out)
    book = build_book(root, progress=False)
    assert book.out == out and _files(tmp_path, out) == before  # nothing written outside the book
    assert sorted(p.name for p in (root / "outputs").iterdir()) == [".ipynb_checkpoints", "README.md", "book", "demo"]

    # the pages: every README, summary.md and notebook outside hidden folders, found here by walking the tree
    sources = [p for p in root.rglob("*") if (p.suffix == ".ipynb" or p.name in ("README.md", "summary.md"))
               and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    assert len(sources) == 4 and len(book.pages) == 4
    pages = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.html"))
    assert pages == ["README.html", "demo/01_demo.html", "demo/summary.html", "index.html", "project/README.html"]

    png = (root / "outputs" / "demo" / "plot.png").read_bytes()
    text = {p: (out / p).read_text(encoding="utf-8") for p in pages}
    for name, html in text.items():
        page = out / name
        refs = _Refs(html).refs
        for tag, attr, url in refs:
            target = _local(page, url)
            if target is not None:
                assert target.is_relative_to(out) and target.is_file(), f"{name}: <{tag} {attr}={url}> resolves to nothing"
            elif tag != "a":
                assert not re.match(r"^(https?:)?//", url), f"{name}: <{tag} {attr}={url}> needs the internet"
        assert "<script" not in html.lower(), f"{name} has a script"
        links = {_local(page, url) for tag, _, url in refs if tag == "a"}
        if name != "index.html":
            assert out / "index.html" in links, f"{name} does not link back to the index"
        else:
            assert links >= {out / p for p in pages if p != "index.html"}, "the index misses a page"

    readme = text["project/README.html"]
    targets = {_local(out / "project/README.html", url) for _, _, url in _Refs(readme).refs}
    assert {out / "demo/01_demo.html", out / "demo/summary.html", out / "demo/table.csv", out / "demo/plot.png"} <= targets
    assert (out / "demo/plot.png").read_bytes() == png and (out / "demo/table.csv").read_text() == "a,b\n1,2\n"
    assert 'href="https://example.com/x"' in readme  # links out stay links
    assert "badge.svg" not in re.sub(r'title="[^"]*"', "", readme) and ">badge</span>" in readme  # alt text instead

    notebook = text["demo/01_demo.html"]
    assert base64.b64encode(png).decode() in notebook  # the figure embedded, as in the notebook
    assert "hello book" in notebook and "runs: 100%" in notebook  # the widget's saved text shows
    assert 'href="summary.html"' in notebook and "Demo notebook" in notebook
    assert 'href="01_demo.html#A-section"' in text["demo/summary.html"] and 'id="A-section"' in notebook
    assert "<table>" in text["demo/summary.html"]
    assert check_site(out) == [] and book.warnings == []

    # built again: the same bytes, and the old site replaced as a whole
    first = {p: (out / p).read_bytes() for p in pages}
    (out / "stray.txt").write_text("from the last build")
    build_book(root, progress=False)
    assert {p: (out / p).read_bytes() for p in pages} == first
    assert not (out / "stray.txt").exists() and (out / MARK).is_file()
    assert sorted(p.name for p in (root / "outputs").iterdir()) == [".ipynb_checkpoints", "README.md", "book", "demo"]


def test_the_check_reports_broken_links_missing_images_and_internet_resources(tmp_path):
    root = make_project(tmp_path / "proj")
    out = build_book(root, tmp_path / "site", progress=False).out
    summary = out / "demo" / "summary.html"
    summary.write_text(summary.read_text().replace(
        "</main>", '<a href="nowhere.html">gone</a><img src="missing.png"><a href="#no-such-id">x</a>'
        '<script src="https://cdn.example.com/x.js"></script></main>'))
    (out / "README.html").unlink()
    problems = "\n".join(check_site(out))
    for expected in ("demo/summary.html: <a href='nowhere.html'>", "demo/summary.html: <img src='missing.png'>",
                     "no id 'no-such-id'", "<script src='https://cdn.example.com/x.js'> needs the internet",
                     "index.html: <a href='README.html'>: no such file README.html"):
        assert expected in problems, problems
    assert len(check_site(out)) == 5


def test_the_command_builds_checks_and_says_what_is_wrong(tmp_path, capsys):
    root = make_project(tmp_path / "proj")
    assert main(["book", "--root", str(root), "--out", str(tmp_path / "site"), "--check"]) == 0
    said = capsys.readouterr().out
    assert re.search(r"book: 4 pages \(and index.html\), \d+\.\d MB in .*site", said) and "check: every link" in said

    # a README link to a file that is not there: the build warns, the check fails naming it
    readme = root / "README.md"
    readme.write_text(readme.read_text() + "\nSee [the missing report](outputs/demo/missing.md).\n")
    assert main(["book", "--root", str(root), "--out", str(tmp_path / "site"), "--check"]) == 1
    captured = capsys.readouterr()
    assert "warning: README.md: links to outputs/demo/missing.md, which is missing" in captured.err
    assert "broken: project/README.html: <a href='outputs/demo/missing.md'>" in captured.out
    assert "error: 1 broken link(s) or image(s)" in captured.err


def test_a_missing_outputs_folder_or_a_folder_that_is_no_book_is_refused_clearly(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["book", "--root", str(empty)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: no outputs folder at {empty / 'outputs'}") and "--root" in err
    assert list(empty.iterdir()) == []

    root = make_project(tmp_path / "proj")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a book built by"):
        build_book(root, mine, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(tmp_path.iterdir()) == [tmp_path / "empty", mine,
                                                                                           root]
    with pytest.raises(ValueError, match="would replace the project or its outputs"):
        build_book(root, root / "outputs", progress=False)


# ----------------------------------------------------------------------------- in a real browser

@pytest.fixture
def browser():
    driver = headless_chromium("1200,900")
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def serve():
    """serve(folder) -> base URL of a loopback HTTP server of that folder (stopped after the test); nothing
    is cached, so the browser sees the test's changes."""
    servers = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def end_headers(self):
            self.send_header("Cache-Control", "no-store")  # a page changed by the test is fetched again
            super().end_headers()

    def start(folder: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _browser_problems(driver, base: str, site: Path) -> list[str]:
    """Each page opened in the browser: its local links that do not answer 200, its images that did not
    decode, and anything it fetched from elsewhere than the server."""
    problems = []
    for page in sorted(site.rglob("*.html")):
        rel = page.relative_to(site).as_posix()
        driver.get(base + rel)
        links = driver.execute_script("return Array.from(document.querySelectorAll('a[href]'), a => a.href)")
        images = driver.execute_script(
            "return Array.from(document.images, i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        for url in {u.split("#")[0] for u in links if u.startswith(base)}:
            try:
                with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as answer:
                    status = answer.status
            except urllib.error.HTTPError as e:
                status = e.code
            if status != 200:
                problems.append(f"{rel}: link {url} answers {status}")
        problems += [f"{rel}: image {src[:80]} did not load" for src, complete, width in images
                     if not (complete and width > 0)]
        problems += [f"{rel}: fetched {url} from outside" for url in fetched if not url.startswith(base)]
    return problems


@pytest.mark.slow
def test_every_page_in_a_real_browser_has_working_links_and_images_and_a_broken_one_is_caught(tmp_path, browser,
                                                                                               serve):
    root = make_project(tmp_path / "proj")
    site = build_book(root, tmp_path / "site", progress=False).out
    base = serve(site)
    problems = _browser_problems(browser, base, site)
    assert problems == [], "\n".join(problems)
    shown = browser.execute_script("return document.body.innerText")  # the last page opened: the README
    assert "Fake project" in shown and "all pages" in shown

    summary = site / "demo" / "summary.html"
    summary.write_text(summary.read_text().replace(
        "</main>", '<a href="nowhere.html">gone</a><img src="missing.png" alt="gone"></main>'))
    problems = _browser_problems(browser, base, site)
    assert any("demo/summary.html: link " in p and "nowhere.html answers 404" in p for p in problems), problems
    assert "demo/summary.html: image missing.png did not load" in problems, problems
    assert len(problems) == 2, problems


def test_a_heading_id_written_percent_encoded_is_found(tmp_path):
    """nbconvert writes heading ids percent-encoded ("11-%C2%B7-Is-..."); a browser finds
    `#11-%C2%B7-Is-...` by the raw fragment first, so the check must too (and still catch a miss)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "index.html").write_text('<a href="page.html">page</a>')
    (site / "page.html").write_text('<a href="index.html">all</a><h1 id="a-%C2%B7-b">x</h1>'
                                    '<a href="#a-%C2%B7-b">ok</a><a href="#c-%C2%B7-d">missing</a>')
    problems = check_site(site)
    assert len(problems) == 1 and "c-%C2%B7-d" in problems[0], problems
