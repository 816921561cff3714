"""`vldlib bench` end to end on the CPU with a tiny model, and the training loop's device-side
augmentation path (augment_on="device"): it trains and resumes exactly."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

import vldlib.loop.train as T
from vldlib.tools.bench import cli as B
from vldlib.tools.bench import gpu_check as G
from vldlib.tools.bench import runs as R
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
    assert R.sweep_wall_time(288, 100.0, 1) == 28_800
    assert R.sweep_wall_time(288, 100.0, 5) == 58 * 100
    assert "8 GPUs" in R.sweep_note(60.0, jobs=16)


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
    assert [r["step"] for r in want] == [0, 3, 6]  # step 0: the start, evaluated too

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
    assert G.gpu_check(out=tmp_path) == 2
    assert "CUDA is not available" in capsys.readouterr().out


def test_gpu_check_smoke_runs_every_stage(tmp_path):
    """The GPU report's every stage, with tiny models on the CPU: the one GPU session must not be
    where its bugs are found."""
    lines = []
    assert G.gpu_check(out=tmp_path, plan=G.SMOKE_PLAN, log=lambda *a, **k: lines.append(" ".join(map(str, a)))) == 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| test_resnet 32px |" in table and "Real loop" in table and "Sweep of 288 runs" in table
    assert "| error" not in table and "| skipped" not in table


# ----------------------------------------------------------------------------- a run's own configuration
def _tiny_run(fake_benchmark, **kw) -> T.TrainConfig:
    return T.TrainConfig(**{**dict(benchmark=str(fake_benchmark), test_envs=[0], backbone="test_resnet",
                                   pretrained=False, resolution=32, batch_size=4, train_stages=1, cache_trunk=True,
                                   augment=False, num_threads=1, device="cpu", progress=False), **kw})


@pytest.mark.parametrize("cache_trunk", [True, False])
def test_config_bench_times_the_runs_own_step(fake_benchmark, tmp_path, cache_trunk):
    timing = B.BenchConfig(steps=2, warmup=1, repeats=2, workers=0)
    threads = B.torch.get_num_threads()
    res = R.run_config_bench(_tiny_run(fake_benchmark, cache_trunk=cache_trunk), timing, name="tiny",
                             json_path=tmp_path / "b.json", log=lambda *a, **k: None)
    saved = json.loads((tmp_path / "b.json").read_text())
    assert set(saved["rates_img_per_s"]) == {"compute", "plain", "fast"}
    assert all(v > 0 for v in saved["rates_img_per_s"].values())
    assert saved["images_per_step"] == 2 * 4  # two training domains x batch 4
    assert saved["details"]["fast"]["threads"] == 1 and saved["config"]["cache_trunk"] is cache_trunk
    assert res["ratios"]["fast/compute"] == pytest.approx(saved["ratios"]["fast/compute"])
    assert B.torch.get_num_threads() == threads  # the run's thread count is not left behind


def test_quickstart_config_follows_the_notebook():
    import ast

    import papermill as pm

    from vldlib.experiments.quickstart import notebook_path, quickstart_config

    p = {k: ast.literal_eval(v["default"]) for k, v in pm.inspect_notebook(str(notebook_path())).items()}
    cfg = quickstart_config("cpu")
    assert (cfg.backbone, cfg.resolution, cfg.train_stages, cfg.cache_trunk, cfg.augment, cfg.batch_size,
            cfg.num_threads, cfg.lr, cfg.dropout) == (p["backbone"], p["resolution"], p["train_stages"],
                                                      p["cache_trunk"], p["augment"], p["batch_size"],
                                                      p["num_threads"], p["lr"], max(p["dropout_rates"]))
    cfg.validate()


def test_bench_cli_picks_the_quickstart_on_a_cpu_and_refuses_mixed_options(capsys):
    from vldlib.cli import main

    parse = lambda *a: B.argparse.Namespace(**{"config": None, "bf16": False, "compile": False,  # noqa: E731
                                               **{k: None for k in B.IMAGE_OPTIONS}, **dict(a)})
    assert B._pick_config(parse(), "cpu") == "quickstart"
    assert B._pick_config(parse(("resolution", 64)), "cpu") == "images"
    assert main(["bench", "--config", "quickstart", "--resolution", "64"]) == 2  # bad usage
    assert "--config images" in capsys.readouterr().err
    assert main(["bench", "--steps-scaling", "10"]) == 2
    assert "--steps-scaling expects N,M" in capsys.readouterr().err
    assert main(["bench", "--run-split", "0"]) == 2
    assert "--run-split N: N is a number of runs" in capsys.readouterr().err


def test_steps_scaling_times_real_runs(fake_benchmark, tmp_path):
    res = R.steps_scaling(_tiny_run(fake_benchmark), (2, 4), tmp_path)
    assert [r["steps"] for r in res["runs"]] == [2, 4]
    assert all(r["step_time_s"] > 0 and r["wall_s"] > r["steps"] * r["step_time_s"] for r in res["runs"])
    # the fit passes through both runs (whatever their times): fixed + slope x steps == wall
    for r in res["runs"]:
        assert res["fixed_s"] + res["slope_s_per_step"] * r["steps"] == pytest.approx(r["wall_s"])


def test_linear_fit_on_known_times():
    """wall = 1 s + 2 s/step: runs of 2 and 6 steps take 5 s and 13 s; the loop's own step time is 2 s."""
    a = {"steps": 2, "wall_s": 5.0, "step_time_s": 1.5}
    b = {"steps": 6, "wall_s": 13.0, "step_time_s": 2.0}
    fit = R.linear_fit(a, b)
    assert fit["slope_s_per_step"] == pytest.approx(2.0) and fit["fixed_s"] == pytest.approx(1.0)
    assert fit["slope_over_step_time"] == pytest.approx(1.0) and fit["loop_step_time_s"] == [1.5, 2.0]



def test_steps_per_dropout_rate():
    from vldlib.experiments.grid import steps_for

    assert steps_for(600, 0.9) == 600
    assert steps_for({0.0: 600, 0.9: 1200}, 0.9) == 1200 and steps_for({"0.9": 1200}, 0.9) == 1200
    with pytest.raises(ValueError, match="no value for dropout rate 0.5"):
        steps_for({0.0: 600}, 0.5)


def test_run_split_times_every_part_of_the_loop_and_puts_it_back(fake_benchmark, tmp_path, monkeypatch):
    """`bench --run-split`: each run's parts are measured (none counted twice: together no longer
    than the run), the checkpoint writes are the loop's, and the loop's functions are its own again
    afterwards. The one-off costs run on caches of their own, leaving VLDLIB_CACHE as it was."""
    from vldlib.loop.step import TrainStep
    from vldlib.tools.bench import split as SP

    loss, save = TrainStep.loss, T.save_checkpoint
    lines: list[str] = []
    monkeypatch.setattr(SP.tempfile, "tempdir", str(tmp_path))
    res = SP.run_split(_tiny_run(fake_benchmark, steps=4, eval_every=2, average_from=2), runs=2, one_offs=False,
                       log=lines.append, overrides={"save_weights": False, "keep_last": False})
    assert [r["run"][:10] for r in res["runs"]] == ["fake-te0-p", "fake-te0-p"] and len(lines) == 5
    for r in res["runs"]:
        measured = {k: v for k, v in r["parts"].items() if k != "other"}
        assert all(measured[k] > 0 for k in ("setup", "model build", "steps", "evaluation", "checkpoints"))
        assert sum(measured.values()) <= r["wall_s"]
        assert {k: len(v) for k, v in r["checkpoint_writes"].items()} == {"last.pt": 3}  # steps 0, 2, 4
        assert r["files_mb"] == {}  # records only: nothing left
    assert TrainStep.loss is loss and T.save_checkpoint is save
    monkeypatch.setenv("VLDLIB_CACHE", str(tmp_path / "mine"))
    costs = SP.one_off_costs(_tiny_run(fake_benchmark), tmp_path / "cold")
    assert set(costs) == {"image check, cold", "image check, remembered", "trunk cache build"}
    assert (tmp_path / "cold" / "cold-cache" / "trunk").is_dir() and not (tmp_path / "mine").exists()
    assert SP.os.environ["VLDLIB_CACHE"] == str(tmp_path / "mine")
