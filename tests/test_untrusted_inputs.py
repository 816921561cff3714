"""Inputs vldlib reads but did not write this time (issue 27 items 8-11): Hub shards, the run folders
that `report` reads, and a sweep's job.json. Each damaged input is named (file, row or key, value)
and skipped, or refused with --strict; nothing hangs, exhausts memory or prints a traceback."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_download import _png
from test_faults import run_cli
from test_hub_download import hub_parquet
from test_results import accs, make_record, make_run

import vldlib.data.hub as H
from vldlib.data import DataError, get_spec
from vldlib.tools.sweep.jobs import Job, job_to_json
from vldlib.tools.sweep.status import status_text, sweep_status

# ----------------------------------------------------------------------------- 8. the Hub source

PACS = get_spec("PACS")


def _shard(tmp_path: Path, data: bytes, name: str = "train-00000-of-00001.parquet") -> Path:
    path = tmp_path / "shards" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _float_label_shard(labels: list[float | None]) -> bytes:
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array([{"bytes": _png(i), "path": f"{i}.png"} for i in range(len(labels))],
                                        type=image_type),
                      "domain": pa.array(["photo"] * len(labels)), "label": pa.array(labels, type=pa.float64())})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


@pytest.mark.parametrize("labels, shown", [([0, None], "None"), ([0.0, float("nan")], "nan"),
                                           ([0.0, 1.5], "1.5")])
def test_a_missing_or_nan_label_names_the_shard_and_row(tmp_path, labels, shown):
    """Before: a raw TypeError (None) or ValueError (NaN) from int(label)."""
    data = (hub_parquet([("photo", y, _png(i), f"{i}.png") for i, y in enumerate(labels)], list(PACS.classes))
            if labels[1] is None else _float_label_shard(labels))
    shard = _shard(tmp_path, data)
    with pytest.raises(DataError) as e:
        H.write_hub_layout(PACS, [shard], tmp_path / "out", progress=False)
    assert str(e.value) == (f"train-00000-of-00001.parquet: row 1 has label {shown}, not a class index or name; "
                            f"the Hub copy is damaged. Use the primary source or --archive instead.")


def test_a_shard_that_is_not_parquet_is_named(tmp_path):
    """Before: a raw ArrowInvalid traceback."""
    shard = _shard(tmp_path, b"<html>rate limited</html>" * 20)
    with pytest.raises(DataError) as e:
        H.write_hub_layout(PACS, [shard], tmp_path / "out", progress=False)
    assert str(e.value).startswith("train-00000-of-00001.parquet: not a readable parquet shard (ArrowInvalid: ")
    assert str(e.value).endswith(f"the Hub copy is damaged. Delete {shard} and run the same command to fetch it "
                                 f"again, or use the primary source or --archive.")


def test_each_row_image_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(H, "MAX_ROW_IMAGE_MB", 1)
    big = b"\x89PNG\r\n\x1a\n" + b"\0" * (3 * 2**20)
    shard = _shard(tmp_path, hub_parquet([("photo", 0, _png(0), "a.png"), ("photo", 0, big, "b.png")],
                                         list(PACS.classes)))
    with pytest.raises(DataError) as e:
        H.write_hub_layout(PACS, [shard], tmp_path / "out", progress=False)
    assert str(e.value) == ("train-00000-of-00001.parquet: row 1 holds 3 MB of image bytes, more than 1 MB "
                            "(MAX_ROW_IMAGE_MB); not an image of this benchmark. Use the primary source or --archive.")
    assert not (tmp_path / "out" / "photo" / "dog" / "b.png").exists()


def test_a_good_shard_still_converts(tmp_path):
    shard = _shard(tmp_path, hub_parquet([("photo", 0, _png(0), "a.png"), ("sketch", 1, _png(1), "b.png")],
                                         list(PACS.classes)))
    assert H.write_hub_layout(PACS, [shard], tmp_path / "out", progress=False) == {"hub_rows": 2}
    assert (tmp_path / "out" / "photo" / "dog" / "a.png").read_bytes() == _png(0)


# ----------------------------------------------------------------------------- 9-11. report

def _records(run: Path, value) -> None:
    rec = make_record(300, accs(.8, .6))
    rec["acc"]["model"]["env3_in"] = value
    (run / "records.jsonl").write_text(json.dumps(rec) + "\n")


def _json(run: Path, name: str, **change) -> None:
    data = json.loads((run / name).read_text())
    data.update(change)
    (run / name).write_text(json.dumps(data))


def _records_is(run: Path, what: str) -> None:
    (run / "records.jsonl").unlink()
    if what == "fifo":
        os.mkfifo(run / "records.jsonl")
    elif what == "dev/zero":
        (run / "records.jsonl").symlink_to("/dev/zero")
    else:
        (run / "records.jsonl").mkdir()


DAMAGE = {  # how -> (damage, the message that names it)
    "accuracy inf": (lambda r: _records(r, float("inf")),
                     "records.jsonl: record 1 has accuracy env3_in: inf, not a number in [0, 1]"),
    "accuracy 1e300": (lambda r: _records(r, 1e300),
                       "records.jsonl: record 1 has accuracy env3_in: 1e+300, not a number in [0, 1]"),
    "accuracy true": (lambda r: _records(r, True),
                      "records.jsonl: record 1 has accuracy env3_in: True, not a number in [0, 1]"),
    "test_envs [-1]": (lambda r: _json(r, "meta.json", test_envs=[-1]),
                       "meta.json: test_envs is [-1], not domain indices in 0..3 (4 domains)"),
    "huge test_envs": (lambda r: (r / "meta.json").write_text((r / "meta.json").read_text().replace(
                           '"test_envs": [3]', '"test_envs": [1e400]')),
                       "meta.json: test_envs is [inf], not domain indices in 0..3 (4 domains)"),
    "ood_split 12": (lambda r: _json(r, "meta.json", ood_split=12), "meta.json: ood_split is 12, not 'in' or 'out'"),
    "dropout 'NaN'": (lambda r: _json(r, "config.json", dropout="NaN"),
                      "config.json: dropout is 'NaN', not a rate in [0, 1)"),
    "steps 1e12": (lambda r: _json(r, "config.json", steps=1e12),
                   "config.json: steps is 1000000000000.0, not an integer in 1..10000000"),
    "eval_every 1": (lambda r: _json(r, "config.json", steps=10**7, eval_every=1),
                     "config.json: steps 10000000 evaluated every 1 steps is more than 1000000 evaluations, not a run's"),
    "deeply nested meta.json": (lambda r: (r / "meta.json").write_text("[" * 100_000 + "]" * 100_000),
                                "meta.json: JSON nested too deeply to be a run's file; delete or repair it"),
    "records.jsonl a FIFO": (lambda r: _records_is(r, "fifo"),
                             "records.jsonl: not a regular file (a FIFO); replace it with the file vldlib wrote, "
                             "or delete it"),
    "records.jsonl /dev/zero": (lambda r: _records_is(r, "dev/zero"),
                                "records.jsonl: not a regular file (a character device); replace it with the file "
                                "vldlib wrote, or delete it"),
    "records.jsonl a directory": (lambda r: _records_is(r, "dir"),
                                  "records.jsonl: not a regular file (a directory); replace it with the file vldlib "
                                  "wrote, or delete it"),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", list(DAMAGE))
def test_report_skips_a_run_with_a_value_it_cannot_trust(tmp_path, capsys, how):
    """Before: wrong numbers printed with exit 0 (inf, 5e+301, 100 for true; [-1] reported against the
    last domain), a hang (FIFO), memory exhausted (/dev/zero, steps 1e12) or a crash of the whole
    report (RecursionError, OverflowError, ArrowTypeError, IsADirectoryError, dropout "NaN")."""
    damage, message = DAMAGE[how]
    root = tmp_path / "runs"
    recs = [make_record(s, accs(.8, .6)) for s in (300, 600)]
    make_run(root, "good", recs)
    bad = make_run(root, "bad", recs, seed=1)
    damage(bad)
    with pytest.warns(UserWarning) as seen:
        rc, out, err = run_cli(capsys, "report", str(root), "--out", str(tmp_path / "rep"))
    assert rc == 0 and "Traceback" not in err, err
    warned = [str(w.message) for w in seen]
    assert f"{bad}: damaged run folder, skipped: {bad}/{message} (--strict fails instead)" in warned, warned
    assert "1 damaged run folder(s) were skipped" in out
    import pandas as pd

    assert set(pd.read_csv(tmp_path / "rep" / "selected.csv").run.map(lambda r: Path(r).name)) == {"good"}
    rc, out, err = run_cli(capsys, "report", str(root), "--out", str(tmp_path / "rep2"), "--strict")
    assert rc == 1 and err.startswith(f"error: {bad}: damaged run folder: {bad}/{message}"), err


def test_accuracies_of_empty_splits_and_good_values_still_load(tmp_path):
    from vldlib.evaluate.scores import load_runs

    run = make_run(tmp_path / "runs", "ok", [make_record(300, accs(.8, .6)), make_record(600, accs(1.0, 0.0))])
    _records(run, float("nan"))  # an empty split's accuracy is NaN: allowed
    df = load_runs([run])
    assert len(df) and df.acc.isna().sum() == 1


# ----------------------------------------------------------------------------- 11. sweep --status

def test_a_damaged_job_json_shows_as_damaged(tmp_path):
    """Before: a garbage job.json made its job vanish from --status, and `[1,2]` crashed it (TypeError)."""
    out = tmp_path / "sweep"
    for name in ("a", "b", "c"):
        (out / name).mkdir(parents=True)
    job = Job({"x": 1}, out / "a", "a", tmp_path / "nb.ipynb", out / "a" / "nb.ipynb", out / "a" / "log.txt")
    (out / "a" / "job.json").write_text(json.dumps(job_to_json(job, "python3")))
    (out / "b" / "job.json").write_text("{garbage")
    (out / "c" / "job.json").write_text("[1, 2]")
    df = sweep_status(out)
    assert list(df.name) == ["a", "b", "c"] and list(df.status) == ["not run", "damaged", "damaged"]
    assert df.error[2] == (f"{out / 'c' / 'job.json'}: damaged job.json (TypeError: list indices must be integers "
                           f"or slices, not str); run the sweep again to rewrite it, or delete {out / 'c'}")
    assert df.error[1].startswith(f"{out / 'b' / 'job.json'}: damaged job.json (JSONDecodeError: ")
    assert status_text(df).startswith("3 jobs: 2 damaged, 1 not run")
