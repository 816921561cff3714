"""Download -> prepare -> verify -> load, against tiny fake archives in each benchmark's real layout,
served from a loopback HTTP server that supports Range requests and can misbehave on demand."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vldlib.data import get_spec, load_benchmark
from vldlib.data.archives import ArchiveError, safe_extract
from vldlib.data.download import (DownloadError, VerifyReport, build_terra_incognita, download_benchmark,
                                  fetch, source_url, verify_benchmark)
from vldlib.data.folder import DataError
from vldlib.data.registry import BenchmarkSpec, Source

# ---------------------------------------------------------------------------------------------
# a loopback file server


class FileServer:
    """Serves `files[name]` at `/name`; `drop_once` names are cut mid-file on their first request,
    `html` names answer with a web page, `status` names answer with that HTTP error."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.drop_once: set[str] = set()
        self.html: set[str] = set()
        self.status: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []  # (name, Range header)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                if name in server.status:
                    self.send_error(server.status[name])
                    return
                if name in server.html:
                    body = b"<!DOCTYPE html><html><body>Google Drive - Quota exceeded</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in server.drop_once:
                    server.drop_once.discard(name)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
    srv = FileServer()
    monkeypatch.setenv("VLDLIB_MIRROR", srv.url)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # a Hub fallback never leaves the machine
    yield srv
    srv.close()


# ---------------------------------------------------------------------------------------------
# tiny archives in the real layouts


def _png(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def tree(prefix: str, domains, classes, per_class: int = 2, ext: str = ".png") -> dict[str, bytes]:
    """{'prefix/domain/class/i.png': bytes} for every domain and class."""
    out, k = {}, 0
    for d in domains:
        for c in classes:
            for i in range(per_class):
                out[f"{prefix}{d}/{c}/{c}_{i}{ext}"] = _png(k)
                k += 1
    return out


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def make_tar(entries: dict[str, bytes], mode: str = "w:gz",
             links: dict[str, str | tuple[bytes, str]] | list[tuple[str, str]] | None = None) -> bytes:
    """A tar archive in memory; `links` maps a member to a symlink target, or to (tar type, target)
    for hard links; a list of (member, target) pairs keeps its order and may name a member twice
    (a link re-pointed by a later entry)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, link in (links.items() if isinstance(links, dict) else links or ()):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = link if isinstance(link, tuple) else (tarfile.SYMTYPE, link)
            tf.addfile(info)
    return buf.getvalue()


def small(name: str, classes, per_class: int = 2, **over) -> BenchmarkSpec:
    """The registered spec with fewer classes and counts for `per_class` images per class."""
    spec = get_spec(name)
    counts = {"test": {d: per_class * len(classes) for d in spec.domains}}
    return dataclasses.replace(spec, classes=tuple(classes), counts=counts, **over)


def assert_clean(data_dir: Path, spec: BenchmarkSpec) -> None:
    """No scratch folder or download left behind; nothing written outside data_dir."""
    leftovers = [p.name for p in data_dir.iterdir() if p.name.startswith(f".{spec.dirname}.partial")]
    assert not leftovers, leftovers


# ---------------------------------------------------------------------------------------------
# one test per real layout


def test_pacs_zip_with_kfold_folder(server, tmp_path):
    spec = small("PACS", ["dog", "horse"])
    server.files["PACS.zip"] = make_zip(tree("kfold/", spec.domains, spec.classes))
    root = download_benchmark(spec, tmp_path, progress=False)
    assert root == tmp_path / "PACS"
    ds = load_benchmark(root, progress=False)
    assert ds.domains == ["art_painting", "cartoon", "photo", "sketch"] and ds.classes == ["dog", "horse"]
    report = verify_benchmark(spec, tmp_path, progress=False)
    assert report.ok and report.matched == "test" and report.found["sketch"] == 4
    prov = json.loads((root / ".vldlib-source.json").read_text())
    assert prov["matched"] == "test" and prov["sources"][0]["filename"] == "PACS.zip"
    assert not (tmp_path / ".downloads").exists()  # archives removed after a good install
    assert_clean(tmp_path, spec)
    # a second call finds the verified copy and downloads nothing
    n = len(server.requests)
    assert download_benchmark(spec, tmp_path, progress=False) == root
    assert len(server.requests) == n


def test_vlcs_tar_gz(server, tmp_path):
    spec = small("VLCS", ["bird", "car"])
    server.files["VLCS.tar.gz"] = make_tar(tree("VLCS/", spec.domains, spec.classes))
    root = download_benchmark(spec, tmp_path, progress=False)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == list(spec.domains)
    assert verify_benchmark(spec, tmp_path, progress=False).ok


def test_office_home_real_world_with_space(server, tmp_path):
    spec = small("OfficeHome", ["Alarm_Clock", "TV", "Table"])
    entries = tree("OfficeHomeDataset_10072016/", spec.domains, spec.classes)
    entries["OfficeHomeDataset_10072016/ImageInfo.csv"] = b"not a domain\n"
    server.files["office_home.zip"] = make_zip(entries)
    root = download_benchmark(spec, tmp_path, progress=False)
    assert root.name == "office_home" and (root / "Real World" / "TV").is_dir()
    ds = load_benchmark(root, progress=False)
    assert ds.domains[-1] == "Real World" and ds.classes == ["Alarm_Clock", "TV", "Table"]


def test_office_home_hand_made_copy_with_underscore_is_renamed(tmp_path):
    spec = small("OfficeHome", ["Mug"])
    domains = ["Art", "Clipart", "Product", "Real_World"]
    archive = tmp_path / "office_home.zip"
    archive.write_bytes(make_zip(tree("OfficeHome/", domains, spec.classes)))
    root = download_benchmark(spec, tmp_path / "data", archive=archive, progress=False)
    assert (root / "Real World" / "Mug").is_dir()
    assert archive.exists()  # a hand-fetched file is never deleted


def _terra_archives() -> tuple[bytes, bytes, dict[str, int]]:
    """CCT-20-like images (flat folder) + COCO json, with images DomainBed leaves out."""
    cats = [{"id": 1, "name": "opossum"}, {"id": 11, "name": "bird"}, {"id": 30, "name": "empty"},
            {"id": 34, "name": "deer"}]  # deer: not one of the 10 classes
    images, annotations, files = [], [], {}
    plan = [("38", 1), ("38", 11), ("46", 30), ("100", 1), ("43", 11), ("43", 30), ("38", 1),
            ("999", 1), ("46", 34)]  # location 999 and class deer are dropped
    for i, (loc, cat) in enumerate(plan):
        fname = f"5968c0f9-{i:04d}.jpg"
        images.append({"id": f"img{i}", "file_name": fname, "location": loc})
        annotations.append({"id": f"a{i}", "image_id": f"img{i}", "category_id": cat})
        buf = io.BytesIO()
        Image.fromarray(np.full((8, 8, 3), 40 * i % 255, np.uint8)).save(buf, format="JPEG")
        files[f"eccv_18_all_images_sm/{fname}"] = buf.getvalue()
    # an image labelled twice (opossum and bird) goes to both class folders, as in DomainBed
    annotations.append({"id": "a-extra", "image_id": "img0", "category_id": 11})
    coco = {"images": images, "annotations": annotations, "categories": cats, "info": {}}
    labels = make_zip({"caltech_images_20210113.json": json.dumps(coco).encode()})
    expected = {"location_38": 4, "location_46": 1, "location_100": 1, "location_43": 2}
    return make_tar(files), labels, expected


def test_terra_incognita_from_images_and_coco_json(server, tmp_path):
    imgs, labels, expected = _terra_archives()
    server.files["eccv_18_all_images_sm.tar.gz"] = imgs
    server.files["caltech_camera_traps.json.zip"] = labels
    spec = dataclasses.replace(get_spec("TerraIncognita"), classes=("bird", "empty", "opossum"),
                               counts={"papers": {"location_38": 99}, "tiny": {**expected, "total": 8}})
    # location_100 lacks bird and empty, location_46 lacks opossum: give every domain every class
    with pytest.raises(DataError, match="lacks class folder"):
        download_benchmark(spec, tmp_path, progress=False, keep_downloads=True)
    assert not (tmp_path / "terra_incognita").exists()
    assert_clean(tmp_path, spec)


def test_terra_incognita_sorting_rule(tmp_path):
    imgs, labels, expected = _terra_archives()
    (tmp_path / "i.tar.gz").write_bytes(imgs)
    (tmp_path / "l.zip").write_bytes(labels)
    safe_extract(tmp_path / "i.tar.gz", tmp_path / "images", progress=False)
    safe_extract(tmp_path / "l.zip", tmp_path / "labels", progress=False)
    out = tmp_path / "out"
    stats = build_terra_incognita(tmp_path / "images", [tmp_path / "labels" / "caltech_images_20210113.json"],
                                  out, progress=False)
    assert stats == {"placed": 8, "missing": 0}
    found = {d.name: sum(1 for _ in d.rglob("*.jpg")) for d in out.iterdir()}
    assert found == expected
    assert (out / "location_38" / "opossum" / "5968c0f9-0000.jpg").exists()
    assert (out / "location_38" / "bird" / "5968c0f9-0000.jpg").exists()
    assert not any(p.parent.name == "deer" for p in out.rglob("*.jpg"))


def test_terra_incognita_full_pipeline_and_version_label(server, tmp_path):
    # every location gets every kept class, so the folder passes the class checks
    cats = [{"id": 1, "name": "opossum"}, {"id": 11, "name": "bird"}]
    images, annotations, files = [], [], {}
    for i, (loc, cat) in enumerate((l, c) for l in ("38", "46", "100", "43") for c in (1, 11, 11)):
        fname = f"{i:04d}.jpg"
        images.append({"id": i, "file_name": fname, "location": int(loc)})  # int ids, as in CCT-20 files
        annotations.append({"id": i, "image_id": i, "category_id": cat})
        files[f"eccv_18_all_images_sm/{fname}"] = _png(i)
    server.files["eccv_18_all_images_sm.tar.gz"] = make_tar(files)
    server.files["caltech_camera_traps.json.zip"] = make_zip(
        {"eccv_18_annotation_files/train_annotations.json":
         json.dumps({"images": images, "annotations": annotations, "categories": cats}).encode()})
    spec = dataclasses.replace(get_spec("TerraIncognita"), classes=("bird", "opossum"),
                               counts={"papers": {d: 5 for d in get_spec("TerraIncognita").domains},
                                       "today": {"total": 12}})
    root = download_benchmark(spec, tmp_path, progress=False)
    report = verify_benchmark(spec, tmp_path, progress=False)
    assert report.ok and report.matched == "today"
    assert "location_38: 3 found, 5 expected" in report.mismatches("papers")
    table = report.table()
    assert "papers" in table and "today" in table and "match the 'today' counts" in table
    assert load_benchmark(root, progress=False).num_classes == 2


def test_domain_net_six_zips_and_duplicate_list(server, tmp_path):
    spec = small("DomainNet", ["The_Eiffel_Tower", "zigzag"], per_class=2)
    spec = dataclasses.replace(spec, counts={"test": {**{d: 4 for d in spec.domains}, "real": 3}})
    for d in spec.domains:
        server.files[f"{d}.zip"] = make_zip(tree("", [d], spec.classes))
    server.files["domain_net_duplicates.txt"] = b"real/zigzag/zigzag_0.png\nreal/not/there.png\n"
    root = download_benchmark(spec, tmp_path, progress=False)
    assert root.name == "domain_net" and not (root / "real" / "zigzag" / "zigzag_0.png").exists()
    assert json.loads((root / ".vldlib-source.json").read_text())["removed_duplicates"] == 1
    assert verify_benchmark(spec, tmp_path, progress=False).ok


# ---------------------------------------------------------------------------------------------
# interruptions and failures


def test_interrupted_download_is_resumed_with_range(server, tmp_path):
    spec = small("PACS", ["dog"])
    server.files["PACS.zip"] = make_zip(tree("kfold/", spec.domains, spec.classes))
    server.drop_once.add("PACS.zip")
    download_benchmark(spec, tmp_path, progress=False)
    ranges = [r for n, r in server.requests if n == "PACS.zip"]
    assert ranges[0] is None and ranges[1] is not None and ranges[1].startswith("bytes=")
    assert int(ranges[1].split("=")[1].rstrip("-")) > 0
    assert verify_benchmark(spec, tmp_path, progress=False).ok


def test_part_file_of_a_killed_run_is_continued(server, tmp_path):
    data = bytes(range(256)) * 40
    server.files["blob.bin"] = data
    part = tmp_path / "blob.bin.part"
    part.write_bytes(data[:3000])
    out = fetch(f"{server.url}/blob.bin", tmp_path / "blob.bin", progress=False)
    assert out.read_bytes() == data and not part.exists()
    assert server.requests == [("blob.bin", "bytes=3000-")]
    # a complete .part is recognised from the server's 416 answer
    (tmp_path / "b2.part").write_bytes(data)
    server.files["b2"] = data
    assert fetch(f"{server.url}/b2", tmp_path / "b2", progress=False).read_bytes() == data


def test_md5_mismatch_is_refused(server, tmp_path):
    server.files["x.bin"] = b"abc"
    with pytest.raises(DownloadError, match="md5"):
        fetch(f"{server.url}/x.bin", tmp_path / "x.bin", md5="0" * 32, progress=False)
    assert not (tmp_path / "x.bin").exists()


def test_http_error_says_what_to_fetch_by_hand(server, tmp_path):
    server.status["PACS.zip"] = 403
    with pytest.raises(DownloadError) as e:
        download_benchmark("PACS", tmp_path, progress=False, source="primary")  # no Hub fallback
    msg = str(e.value)
    assert "HTTP error 403" in msg and "Fetch it by hand" in msg
    assert "drive.google.com/file/d/1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd" in msg
    assert f"python -m vldlib data download PACS --data-dir {tmp_path} --archive /path/to/PACS.zip" in msg
    assert not (tmp_path / "PACS").exists()


def test_quota_page_is_not_taken_for_the_archive(server, tmp_path):
    server.html.add("VLCS.tar.gz")
    with pytest.raises(DownloadError, match="web page.*\n.*Fetch it by hand"):
        download_benchmark("VLCS", tmp_path, progress=False)
    assert not (tmp_path / "VLCS").exists()


def test_html_page_saved_by_hand_is_refused(tmp_path):
    page = tmp_path / "PACS.zip"
    page.write_bytes(b"<!DOCTYPE html><html>quota</html>")
    with pytest.raises(ArchiveError, match="web page, not an archive"):
        download_benchmark(small("PACS", ["dog"]), tmp_path / "data", archive=page, progress=False)


def test_corrupt_image_is_reported_and_nothing_installed(server, tmp_path):
    spec = small("PACS", ["dog", "horse"])
    entries = tree("kfold/", spec.domains, spec.classes)
    entries["kfold/photo/dog/dog_1.png"] = entries["kfold/photo/dog/dog_1.png"][:30]  # truncated PNG
    server.files["PACS.zip"] = make_zip(entries)
    with pytest.raises(DataError, match=r"unreadable file.*photo/dog/dog_1\.png"):
        download_benchmark(spec, tmp_path, progress=False)
    assert not (tmp_path / "PACS").exists()
    assert_clean(tmp_path, spec)


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_truncated_archive(server, tmp_path, kind):
    spec = small("VLCS", ["bird"], per_class=3)
    entries = tree("VLCS/", spec.domains, spec.classes)
    blob = make_tar(entries) if kind == "tar.gz" else make_zip(entries)
    server.files["VLCS.tar.gz"] = blob[: len(blob) * 2 // 3]  # the server itself has a cut copy
    with pytest.raises(ArchiveError, match="truncated or corrupt|unreadable zip") as e:
        download_benchmark(spec, tmp_path, progress=False)
    assert "run the same command again" in str(e.value)
    assert not (tmp_path / "VLCS").exists() and not (tmp_path / ".downloads" / "VLCS.tar.gz").exists()
    assert_clean(tmp_path, spec)


def test_plain_tar_cut_between_members_is_detected(tmp_path):
    blob = make_tar({f"VLCS/Caltech101/bird/{i}.png": _png(i) for i in range(4)}, mode="w")
    with tarfile.open(fileobj=io.BytesIO(blob)) as tf:
        cut = tf.getmembers()[2].offset  # the header of the third member
    (tmp_path / "cut.tar").write_bytes(blob[:cut])
    with pytest.raises(ArchiveError, match="truncated or corrupt tar archive after 2 entries"):
        safe_extract(tmp_path / "cut.tar", tmp_path / "out", progress=False)
    (tmp_path / "whole.tar").write_bytes(blob)
    assert safe_extract(tmp_path / "whole.tar", tmp_path / "ok", progress=False) == 4


def test_missing_domain(server, tmp_path):
    spec = small("PACS", ["dog"])
    server.files["PACS.zip"] = make_zip(tree("kfold/", ["art_painting", "cartoon", "photo"], spec.classes))
    with pytest.raises(DataError, match=r"not \['sketch'\]"):
        download_benchmark(spec, tmp_path, progress=False)
    assert not (tmp_path / "PACS").exists()


def test_class_missing_in_one_domain(server, tmp_path):
    spec = small("PACS", ["dog", "horse"])
    entries = {k: v for k, v in tree("kfold/", spec.domains, spec.classes).items()
               if not k.startswith("kfold/cartoon/horse/")}
    server.files["PACS.zip"] = make_zip(entries)
    with pytest.raises(DataError, match=r"domain 'cartoon' lacks class folder\(s\) \['horse'\]"):
        download_benchmark(spec, tmp_path, progress=False)
    assert not (tmp_path / "PACS").exists()


def test_count_mismatch_is_not_installed_unless_allowed(server, tmp_path):
    spec = dataclasses.replace(small("PACS", ["dog"]), counts={"DomainBed": {"art_painting": 3}})
    server.files["PACS.zip"] = make_zip(tree("kfold/", spec.domains, spec.classes))
    with pytest.raises(DataError, match=r"(?s)art_painting: 2 found, 3 expected.*allow-count-mismatch"):
        download_benchmark(spec, tmp_path, progress=False)
    assert not (tmp_path / "PACS").exists() and (tmp_path / ".downloads" / "PACS.zip").exists()
    n = len(server.requests)
    root = download_benchmark(spec, tmp_path, progress=False, allow_count_mismatch=True)
    assert len(server.requests) == n  # the kept download was reused
    report = verify_benchmark(spec, tmp_path, progress=False)
    assert root.exists() and not report.ok and "MISMATCH" in report.summary()
    # an existing folder that does not verify is not silently kept or replaced
    with pytest.raises(DataError, match="--force"):
        download_benchmark(spec, tmp_path, progress=False)


@pytest.mark.parametrize("case", ["dotdot-tar", "absolute-tar", "symlink-out", "dotdot-zip"])
def test_path_traversal_is_refused(server, tmp_path, case):
    spec = small("PACS", ["dog"])
    entries = tree("kfold/", spec.domains, spec.classes)
    data_dir = tmp_path / "data"
    if case == "dotdot-tar":
        blob = make_tar({**entries, "kfold/../../evil.txt": b"x"})
    elif case == "absolute-tar":
        blob = make_tar({**entries, str(tmp_path / "abs_evil.txt"): b"x"})
    elif case == "symlink-out":
        blob = make_tar(entries, links={"kfold/photo/dog/link.png": "../../../../../outside.png"})
    else:
        blob = make_zip({**entries, "../evil.txt": b"x"})
    server.files["PACS.zip"] = blob
    with pytest.raises(ArchiveError, match="refusing entry"):
        download_benchmark(spec, data_dir, progress=False)
    outside = [p for p in tmp_path.rglob("*") if "evil" in p.name or p.name == "outside.png"]
    assert outside == [] and not (data_dir / "PACS").exists()
    assert_clean(data_dir, spec)


def test_archive_given_by_hand_needs_no_network(monkeypatch, tmp_path):
    monkeypatch.setenv("VLDLIB_MIRROR", "http://127.0.0.1:9")  # nothing listens there
    spec = small("VLCS", ["dog"])
    archive = tmp_path / "my-download.tgz"  # any name works for a one-file benchmark
    archive.write_bytes(make_tar(tree("VLCS/", spec.domains, spec.classes)))
    root = download_benchmark(spec, tmp_path / "data", archive=archive, progress=False)
    assert verify_benchmark(spec, tmp_path / "data", progress=False).ok and root.is_dir()


def test_ambiguous_hand_fetched_files_are_refused(tmp_path):
    a, b = tmp_path / "a.zip", tmp_path / "b.zip"
    a.write_bytes(b"x")
    b.write_bytes(b"x")
    with pytest.raises(DataError, match="Rename each hand-fetched file"):
        download_benchmark("DomainNet", tmp_path / "data", archive=[a, b], progress=False)


def test_verify_reports_structure_errors_without_raising(tmp_path, fake_benchmark):
    spec = BenchmarkSpec(name="fake", domains=("d0", "d1", "d2", "d3"), classes=("a", "b", "c"))
    report = verify_benchmark(spec, fake_benchmark.parent, progress=False)
    assert not report.ok and "'d3'" in report.errors[0] and "FAILED" in report.summary()
    spec3 = BenchmarkSpec(name="fake", domains=("d0", "d1", "d2"), counts={"v1": {"d0": 18}, "v2": {"total": 54}})
    report = verify_benchmark(spec3, fake_benchmark.parent, progress=False)
    assert isinstance(report, VerifyReport) and report.ok and report.matched == "v1"
    assert report.per_class["d1"] == {"a": 6, "b": 6, "c": 6}
    report = verify_benchmark(spec3, fake_benchmark.parent, counts={"x": {"d0": 1}}, progress=False)
    assert not report.ok and report.mismatches("x") == ["d0: 18 found, 1 expected"]


def test_source_urls(monkeypatch):
    monkeypatch.delenv("VLDLIB_MIRROR", raising=False)
    pacs = get_spec("PACS").sources[0]
    assert source_url(pacs).startswith("https://drive.usercontent.google.com/download?id=1JFr8f805nMUelQWWmfnJR3y4_SYoN5Pd")
    assert source_url(pacs, "http://m/x/") == "http://m/x/PACS.zip"
    monkeypatch.setenv("VLDLIB_MIRROR", "http://mirror")
    assert source_url(get_spec("OfficeHome").sources[0]) == "http://mirror/office_home.zip"
    terra = get_spec("TerraIncognita")
    assert {s.kind for s in terra.sources} == {"terra_images", "terra_annotations"}
    assert source_url(Source("http://x/y.zip", "y y.zip"), "http://m") == "http://m/y%20y.zip"


def test_registered_benchmarks_match_domainbed():
    expect = {"PACS": ("PACS", 4, 7, 9991), "VLCS": ("VLCS", 4, 5, 10729),
              "OfficeHome": ("office_home", 4, 65, 15588), "DomainNet": ("domain_net", 6, 345, 586575)}
    for name, (folder, nd, nc, total) in expect.items():
        spec = get_spec(name)
        assert (spec.dirname, len(spec.domains), spec.num_classes) == (folder, nd, nc)
        assert sum(next(iter(spec.counts.values())).values()) == total
    terra = get_spec("TerraIncognita")
    assert terra.dirname == "terra_incognita" and terra.num_classes == 10
    assert sorted(c.get("total") for c in terra.counts.values()) == [24330, 24788]
    assert sum(v for k, v in terra.counts["papers (24,788)"].items() if k != "total") == 24788
    assert get_spec("DomainNet").n_steps == 30000
