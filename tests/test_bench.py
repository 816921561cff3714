"""`vldlib bench` end to end on the CPU with a tiny model, and the training loop's device-side
augmentation path (augment_on="device"): it trains and resumes exactly."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from vldlib import bench as B
from vldlib import train as T
from vldlib.utils import read_jsonl


def test_bench_writes_three_rates(fake_benchmark, tmp_path):
    cfg = B.BenchConfig(backbone="test_resnet", resolution=32, batch_size=4, domains=2, device="cpu",
                        data=str(fake_benchmark), steps=2, warmup=1, repeats=2, workers=0, train_stages=None)
    res = B.run_bench(cfg, json_path=tmp_path / "bench.json", log=lambda *a, **k: None)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert set(saved["rates_img_per_s"]) == {"compute", "plain", "fast"}
    assert all(v > 0 for v in saved["rates_img_per_s"].values())
    assert set(saved["ratios"]) == {"fast/compute", "fast/plain"}
    assert saved["details"]["fast"]["variant"] in saved["details"]["fast"]["variants"]
    assert res["ratios"]["fast/compute"] == pytest.approx(saved["ratios"]["fast/compute"])


def test_bench_rejects_too_many_domains(fake_benchmark):
    cfg = B.BenchConfig(backbone="test_resnet", resolution=32, domains=5, device="cpu", data=str(fake_benchmark))
    with pytest.raises(ValueError, match="--domains"):
        B.run_bench(cfg, json_path=None, log=lambda *a, **k: None)


def test_write_synthetic_domains(tmp_path):
    root = B.write_synthetic_domains(tmp_path / "syn", domains=2, classes=2, per_class=3, size=24, processes=1)
    files = sorted(root.rglob("*.jpg"))
    assert len(files) == 12
    mtime = files[0].stat().st_mtime_ns
    B.write_synthetic_domains(root, domains=2, classes=2, per_class=3, size=24, processes=1)  # reused
    assert files[0].stat().st_mtime_ns == mtime


def test_sweep_wall_time():
    assert B.sweep_wall_time(288, 100.0, 1) == 28_800
    assert B.sweep_wall_time(288, 100.0, 5) == 58 * 100
    assert "8 GPUs" in B.sweep_note(60.0, jobs=16)


def _cfg(fake_benchmark, tmp_path, **kw) -> T.TrainConfig:
    base = dict(benchmark=str(fake_benchmark), test_envs=[0], backbone="test_resnet", pretrained=False,
                resolution=32, steps=6, eval_every=3, average_from=2, batch_size=4, lr=1e-3, augment_on="device",
                cache_images=True, device="cpu", num_workers=0, out=str(tmp_path / "runs"), progress=False)
    return T.TrainConfig(**{**base, **kw})


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("step_time", "peak_mem_mb")} for r in records]


def test_train_device_augment_resumes_exactly(fake_benchmark, tmp_path, monkeypatch):
    full = T.train(_cfg(fake_benchmark, tmp_path, run_name="full"))
    want = _comparable(read_jsonl(full / "records.jsonl"))
    assert [r["step"] for r in want] == [3, 6]

    # kill the second run while it writes its step-6 record (last.pt still holds step 3)
    real_append = T.append_jsonl

    class Killed(Exception):
        pass

    def dying_append(path, record):
        if record.get("step") == 6:
            raise Killed()
        real_append(path, record)

    cfg = _cfg(fake_benchmark, tmp_path, run_name="killed")
    monkeypatch.setattr(T, "append_jsonl", dying_append)
    with pytest.raises(Killed):
        T.train(cfg)
    monkeypatch.setattr(T, "append_jsonl", real_append)
    resumed = T.train(cfg)
    got = _comparable(read_jsonl(resumed / "records.jsonl"))
    assert got == want


def test_device_and_worker_paths_train_on_the_same_batches(fake_benchmark, tmp_path):
    """Same batch indices and augmentation seeds: first-step labels agree between the two paths."""
    cfg = _cfg(fake_benchmark, tmp_path, steps=2)
    bench = T.load_benchmark(cfg.benchmark, progress=False)
    data = T.make_data(cfg, bench, (0.5,) * 3, (0.5,) * 3)
    dev = next(iter(T.train_batches(data, cfg, 0, T.torch.device("cpu"))))
    wrk = next(iter(T.train_batches(data, replace(cfg, augment_on="workers"), 0, T.torch.device("cpu"))))
    for (xd, yd), (xw, yw) in zip(dev, wrk):
        assert xd.shape == xw.shape and T.torch.equal(yd, yw)
        # same crops, flips and jitter; pixels differ only by torchvision's uint8 rounding
        assert (xd - xw).abs().mean() < 0.05


def test_gpu_check_exits_quickly_without_cuda(tmp_path, capsys):
    if B.torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert B.gpu_check(out=tmp_path) == 2
    assert "CUDA is not available" in capsys.readouterr().out

