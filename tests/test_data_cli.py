"""`python -m vldlib data ...`: help, list, download -> verify through the CLI, exit codes, build."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from vldlib.cli import main
from vldlib.data import registry
from vldlib.data.registry import get_spec
from test_download import make_zip, server, tree  # noqa: E402,F401  (tests/ is on sys.path; `server` is a fixture)


@pytest.fixture
def tiny_pacs(monkeypatch):
    """PACS registered with two classes and counts for 2 images per class, for the CLI to find."""
    spec = dataclasses.replace(get_spec("PACS"), classes=("dog", "horse"),
                               counts={"DomainBed": {d: 4 for d in get_spec("PACS").domains}})
    monkeypatch.setitem(registry.BENCHMARKS, "PACS", spec)
    return spec


def test_help_documents_every_subcommand_with_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("list", "download", "verify", "build", "--archive", "examples:",
                 "python -m vldlib data download PACS --data-dir data", "VLDLIB_MIRROR"):
        assert word in out


def test_list_shows_domains_counts_and_sources(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "TerraIncognita  (folder terra_incognita/" in out
    assert "location_100 4879" in out and "total 24330" in out
    assert "Real World 4357" in out
    assert "https://storage.googleapis.com/public-datasets-lila/caltechcameratraps/eccv_18_all_images_sm.tar.gz" in out
    assert "(--source hf, and the fallback): https://huggingface.co/datasets/flwrlabs/pacs" in out


def test_download_then_verify(server, tiny_pacs, tmp_path, capsys):
    server.files["PACS.zip"] = make_zip(tree("kfold/", tiny_pacs.domains, tiny_pacs.classes))
    assert main(["data", "download", "PACS", "--data-dir", str(tmp_path), "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith(str(tmp_path / "PACS"))
    assert main(["data", "verify", "PACS", "--data-dir", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "art_painting" in out and "DomainBed" in out and "OK" in out
    # one image fewer: verify fails with a non-zero exit code and says where
    next((tmp_path / "PACS" / "sketch" / "dog").iterdir()).unlink()
    assert main(["data", "verify", "PACS", "--data-dir", str(tmp_path), "--quiet"]) == 1
    assert "sketch: 3 found, 4 expected" in capsys.readouterr().out


def test_download_failure_prints_the_manual_route(server, tiny_pacs, tmp_path, capsys):
    server.status["PACS.zip"] = 404
    assert main(["data", "download", "PACS", "--data-dir", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "HTTP error 404" in err and "--archive /path/to/PACS.zip" in err


def test_download_with_archive_and_verify_missing_folder(tiny_pacs, tmp_path, capsys):
    archive = tmp_path / "PACS.zip"
    archive.write_bytes(make_zip(tree("kfold/", tiny_pacs.domains, tiny_pacs.classes)))
    assert main(["data", "verify", "PACS", "--data-dir", str(tmp_path / "d"), "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().out
    assert main(["data", "download", "PACS", "--data-dir", str(tmp_path / "d"), "--archive", str(archive),
                 "--quiet"]) == 0


def test_unknown_benchmark(capsys, tmp_path):
    assert main(["data", "verify", "PASC", "--data-dir", str(tmp_path)]) == 2  # a bad name: usage
    assert "Did you mean PACS" in capsys.readouterr().err


def test_build_calls_the_offline_builder(monkeypatch, tmp_path, capsys):
    calls = []

    def fake_build(data_dir, force=False, progress=True):
        calls.append((Path(data_dir), force, progress))
        return Path(data_dir) / "emoji"

    registry.list_benchmarks()  # register the real ones first, so the fake is not overwritten
    spec = registry.BenchmarkSpec(name="emoji", domains=("a", "b"), builder=fake_build)
    monkeypatch.setitem(registry.BENCHMARKS, "emoji", spec)
    assert main(["data", "build", "emoji", "--data-dir", str(tmp_path), "--force", "--quiet"]) == 0
    assert calls == [(tmp_path, True, False)]
    assert main(["data", "build", "PACS", "--data-dir", str(tmp_path)]) == 2
    assert "is downloaded, not built" in capsys.readouterr().err


def test_verify_accepts_any_folder_path(tmp_path, capsys):
    """`data verify PATH`: counts per domain and class, class lists compared, unreadable files."""
    from conftest import make_fake_benchmark

    root = make_fake_benchmark(tmp_path / "mine", per_class=3)
    assert main(["data", "verify", str(root), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "d0" in out and "d2" in out and "27 images" in out  # 3 domains x 3 classes x 3
    assert "no expected counts are recorded" in out
    (root / "d1" / "b" / "b_000.png").write_bytes(b"not a png")
    assert main(["data", "verify", str(root), "--quiet"]) == 1
    assert "1 unreadable file(s), e.g. " + str(root / "d1" / "b" / "b_000.png") in capsys.readouterr().out
    (root / "d1" / "b" / "b_000.png").unlink()
    (root / "d2" / "zz").mkdir()
    (root / "d2" / "zz" / "x.png").write_bytes((root / "d2" / "a" / "a_000.png").read_bytes())
    assert main(["data", "verify", str(root), "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "lacks class folder(s) ['zz']" in out


def test_verify_a_path_named_like_a_benchmark_uses_its_counts(server, tiny_pacs, tmp_path, capsys):
    server.files["PACS.zip"] = make_zip(tree("kfold/", tiny_pacs.domains, tiny_pacs.classes))
    assert main(["data", "download", "PACS", "--data-dir", str(tmp_path / "d"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["data", "verify", str(tmp_path / "d" / "PACS"), "--quiet"]) == 0
    assert "match the 'DomainBed' counts" in capsys.readouterr().out
