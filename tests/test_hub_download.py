"""PACS and OfficeHome from the Hugging Face Hub (issue 16): `--source hf` and the automatic
fallback when the primary link fails, against a loopback server standing in for the Hub.

The server answers the three requests `huggingface_hub.snapshot_download` makes (read from its
source): the revision info `GET /api/datasets/<repo>/revision/<rev>` (the commit sha), the file
listing `GET /api/datasets/<repo>/tree/<sha>?recursive=...`, and each file at
`HEAD|GET /datasets/<repo>/resolve/<sha>/<file>` (with `X-Repo-Commit` and `ETag`). It serves
tiny parquet shards of the published schema: `image` {bytes, path}, `domain` (string),
`label` (class index, names in the `huggingface` schema metadata).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_download import FileServer, _png, small

from vldlib.cli import main as cli_main
from vldlib.data import DataError, get_spec
from vldlib.data.download import download_benchmark, verify_benchmark

SHA = "0123456789abcdef0123456789abcdef01234567"


class HubServer:
    """Serves `files[repo][path] = bytes` the way the Hub API does; records every request."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, bytes]] = {}
        self.requests: list[str] = []
        self.down = False  # answer 503 to everything
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, obj, head=False):
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

            def _handle(self, head: bool):
                path = urllib.parse.urlparse(self.path).path
                hub.requests.append(f"{self.command} {self.path}")
                if hub.down:
                    return self._send(503, b"down", head=head)
                parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
                if parts[:2] == ["api", "datasets"]:
                    repo = "/".join(parts[2:4])
                    if repo not in hub.files:
                        return self._send(404, b'{"error": "Repository not found"}',
                                          {"X-Error-Code": "RepoNotFound"}, head)
                    files = hub.files[repo]
                    if parts[4] == "revision":
                        return self._json({"id": repo, "sha": SHA, "private": False,
                                           "siblings": [{"rfilename": f} for f in files]}, head)
                    if parts[4] == "tree":
                        return self._json([{"type": "file", "path": f, "size": len(b),
                                            "oid": hashlib.sha1(b).hexdigest()} for f, b in files.items()], head)
                if parts[0] == "datasets" and parts[3] == "resolve":
                    repo, name = "/".join(parts[1:3]), "/".join(parts[5:])
                    data = hub.files.get(repo, {}).get(name)
                    if data is None:
                        return self._send(404, b"", {"X-Error-Code": "EntryNotFound"}, head)
                    return self._send(200, data, {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                                                  "Content-Type": "application/octet-stream"}, head)
                return self._send(404, b"", head=head)

            def do_GET(self):
                self._handle(False)

            def do_HEAD(self):
                self._handle(True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    srv = HubServer()
    monkeypatch.setenv("HF_ENDPOINT", srv.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # nothing written to the user's cache
    yield srv
    srv.close()


def hub_parquet(rows: list[tuple[str, int, bytes, str]], names: list[str] | None) -> bytes:
    """A parquet shard of the published schema; rows are (domain, label, image bytes, file name)."""
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({
        "image": pa.array([{"bytes": b, "path": p} for _, _, b, p in rows], type=image_type),
        "domain": pa.array([d for d, _, _, _ in rows], type=pa.string()),
        "label": pa.array([y for _, y, _, _ in rows], type=pa.int64()),
    })
    if names is not None:
        features = {"image": {"_type": "Image"}, "domain": {"dtype": "string", "_type": "Value"},
                    "label": {"names": names, "_type": "ClassLabel"}}
        table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def pacs_rows(classes: list[str], per: dict[str, int]) -> list[tuple[str, int, bytes, str]]:
    """`per[domain]` images spread over `classes`; labels index PACS's full 7-class list."""
    full = list(get_spec("PACS").classes)
    rows, k = [], 0
    for d, n in per.items():
        for i in range(n):
            c = classes[i % len(classes)]
            rows.append((d, full.index(c), _png(k), f"{d}_{c}_{i}.png"))
            k += 1
    return rows


def test_pacs_from_the_hub_in_the_domainbed_layout(hub, tmp_path):
    classes = ["dog", "horse"]
    per = {"art_painting": 4, "cartoon": 2, "photo": 6, "sketch": 2}
    rows = pacs_rows(classes, per)
    full = list(get_spec("PACS").classes)
    hub.files["flwrlabs/pacs"] = {"data/train-00000-of-00002.parquet": hub_parquet(rows[:7], full),
                                  "data/train-00001-of-00002.parquet": hub_parquet(rows[7:], full),
                                  "README.md": b"# card"}
    spec = small("PACS", classes)
    spec = spec.__class__(**{**spec.__dict__, "counts": {"hub": dict(per)}})
    root = download_benchmark(spec, tmp_path / "data", source="hf", progress=False)
    assert root == tmp_path / "data" / "PACS"
    # expected per domain and class, counted from the rows the test made
    want = Counter((d, full[y]) for d, y, _, _ in rows)
    got = Counter((p.parent.parent.name, p.parent.name) for p in root.rglob("*.png"))
    assert got == want
    by_name = {name: data for _, _, data, name in rows}
    assert (root / "photo" / "horse" / "photo_horse_1.png").read_bytes() == by_name["photo_horse_1.png"]
    prov = json.loads((root / ".vldlib-source.json").read_text())
    assert prov["sources"][0]["hub"] == "flwrlabs/pacs" and prov["matched"] == "hub"
    assert verify_benchmark(spec, tmp_path / "data", progress=False).ok
    assert not (tmp_path / "data" / ".downloads").exists()  # shards removed after install
    assert not [p for p in (tmp_path / "hf-home").rglob("*") if p.is_file()]  # nothing in the user's HF cache
    assert any("/api/datasets/flwrlabs/pacs/revision/" in r for r in hub.requests)
    assert not any("README" in r for r in hub.requests if "resolve" in r)  # only the parquet shards


def test_primary_link_fails_then_the_hub_copy_is_used(hub, tmp_path, monkeypatch):
    primary = FileServer()
    monkeypatch.setenv("VLDLIB_MIRROR", primary.url)
    primary.status["office_home.zip"] = 403  # Google Drive quota / moved link
    spec = get_spec("OfficeHome")
    classes = ["Alarm_Clock", "Webcam"]
    names = list(spec.classes)
    rows = [(d, names.index(c), _png(10 * i + j), f"{c}_{j}.jpg") for i, d in
            enumerate(["Art", "Clipart", "Product", "Real_World"]) for j, c in enumerate(classes)]
    hub.files["flwrlabs/office-home"] = {"data/train-00000-of-00001.parquet": hub_parquet(rows, names)}
    small_spec = small("OfficeHome", classes, per_class=1)
    try:
        root = download_benchmark(small_spec, tmp_path / "data", progress=False)
    finally:
        primary.close()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["Art", "Clipart", "Product", "Real World"]
    assert (root / "Real World" / "Webcam" / "Webcam_1.jpg").read_bytes() == rows[-1][2]
    assert json.loads((root / ".vldlib-source.json").read_text())["sources"][0]["hub"] == "flwrlabs/office-home"


def test_counts_that_do_not_match_install_nothing(hub, tmp_path):
    classes = ["dog"]
    rows = pacs_rows(classes, {"art_painting": 2, "cartoon": 2, "photo": 1, "sketch": 2})
    hub.files["flwrlabs/pacs"] = {"data/train-00000-of-00001.parquet": hub_parquet(rows, list(get_spec("PACS").classes))}
    with pytest.raises(DataError, match=r"(?s)nothing was installed.*photo: 1 found, 2 expected"):
        download_benchmark(small("PACS", classes), tmp_path / "data", source="hf", progress=False)
    assert not (tmp_path / "data" / "PACS").exists()


def test_hub_down_too_says_both_and_what_to_do(hub, tmp_path, monkeypatch, capsys):
    primary = FileServer()
    monkeypatch.setenv("VLDLIB_MIRROR", primary.url)
    primary.status["PACS.zip"] = 403
    hub.down = True
    try:
        rc = cli_main(["data", "download", "PACS", "--data-dir", str(tmp_path / "data"), "--quiet"])
    finally:
        primary.close()
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: PACS: could not download PACS.zip: ") and "Traceback" not in err
    assert "HTTP error 403" in err and "Hugging Face Hub copy failed too" in err and "flwrlabs/pacs" in err


def test_source_hf_for_a_benchmark_without_one(tmp_path, capsys):
    rc = cli_main(["data", "download", "VLCS", "--data-dir", str(tmp_path), "--source", "hf", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1 and "VLCS has no Hugging Face Hub source; those with one: OfficeHome, PACS" in err
