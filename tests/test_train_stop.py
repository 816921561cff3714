"""A stop asked of `train` (the explorer's stop button) is heard in every phase, not only between
steps, and keeps what the phase finished: checked images, computed frozen-trunk outputs.

Each phase is made slow on purpose (a sleep per image or per batch), so that a stop heard only at
the end of the phase would take many seconds; the bound asserted (5 s) is generous for a loaded
2-core machine, and far below what a deaf phase takes."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import make_fake_benchmark
from vldlib.data import folder
from vldlib.data.cache import cache_root
from vldlib.loop import run_dir_for
from vldlib.loop.train import train
from vldlib.model import FineTuneNet
from vldlib.utils import FileLock

from test_train import tiny_config

TRUNK = "computing the frozen-trunk outputs (cached for later runs)"


class Started:
    """`train` in a thread with a stop event, recording the phases it reports."""

    def __init__(self, cfg):
        self.stop_event, self.phases, self.result, self.error = threading.Event(), [], None, None
        self.thread = threading.Thread(target=self._work, args=(cfg,), daemon=True)
        self.thread.start()

    def _work(self, cfg):
        try:
            self.result = train(cfg, should_stop=self.stop_event.is_set, report_phase=self.phases.append)
        except BaseException as e:  # noqa: BLE001  (reported by the test's thread)
            self.error = e

    def wait_for_phase(self, phase: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while phase not in self.phases:
            assert self.error is None, f"train failed: {self.error!r}"
            assert self.thread.is_alive() and time.time() < deadline, f"never reached {phase!r}: {self.phases}"
            time.sleep(0.02)

    def stop(self, within: float = 5.0) -> float:
        """Press stop; the seconds until train returned (asserted under `within`)."""
        t0 = time.perf_counter()
        self.stop_event.set()
        self.thread.join(within)
        latency = time.perf_counter() - t0
        assert not self.thread.is_alive(), f"still running {within:.0f} s after the stop, in {self.phases[-1:]}"
        assert self.error is None, f"train failed: {self.error!r}"
        return latency


@pytest.fixture
def root(tmp_path):
    make_fake_benchmark(tmp_path / "fake", per_class=6)
    return tmp_path


def _slow_trunk(monkeypatch, seconds: float, calls: list | None = None):
    trunk = FineTuneNet.trunk

    def slow(self, x):
        time.sleep(seconds)
        if calls is not None:
            calls.append(len(x))
        return trunk(self, x)
    monkeypatch.setattr(FineTuneNet, "trunk", slow)


def test_stop_while_computing_the_trunk_outputs_is_heard_and_keeps_the_finished_splits(root, monkeypatch):
    calls: list[int] = []
    _slow_trunk(monkeypatch, 0.3, calls)  # 54 images, 2 a batch: about 8 s for the phase
    cfg = tiny_config(root, train_stages=1, cache_trunk=True, augment=False, eval_batch_size=2)
    before = set((cache_root() / "trunk").glob("*.partial.pt"))  # the cache folder is shared by the tests
    run = Started(cfg)
    run.wait_for_phase(TRUNK)
    deadline = time.time() + 60
    while sum(calls) < 20 and time.time() < deadline:  # past the first split (18 images a domain)
        time.sleep(0.02)
    run.stop()
    run_dir = run_dir_for(cfg)
    assert run.result == run_dir and not (run_dir / "done").exists() and not (run_dir / "records.jsonl").exists()
    partial = sorted(set((cache_root() / "trunk").glob("*.partial.pt")) - before)
    assert len(partial) == 1, "the finished splits were not kept"
    kept = torch.load(partial[0], weights_only=True)["rows"]
    assert 0 < sum(kept.values()) < 54
    calls.clear()
    monkeypatch.undo()
    _slow_trunk(monkeypatch, 0.0, calls)
    train(cfg)  # the next start computes only the splits the stopped one had not finished
    assert (run_dir / "done").exists() and sum(calls) == 54 - sum(kept.values())
    assert not partial[0].exists()  # the whole cache replaces it


def test_stop_while_checking_images_is_heard_and_keeps_the_checked_ones(root, monkeypatch):
    checked: list[str] = []
    check = folder.check_image

    def slow(path):
        time.sleep(0.3)  # 54 images: about 16 s for the phase
        checked.append(str(path))
        return check(path)
    monkeypatch.setattr(folder, "check_image", slow)
    run = Started(tiny_config(root))
    run.wait_for_phase("loading the benchmark")
    time.sleep(1.5)
    run.stop()
    done_before_stop = len(checked)
    assert 0 < done_before_stop < 54
    checked.clear()
    folder.load_benchmark(str(root / "fake"), progress=False)
    assert len(checked) == 54 - done_before_stop  # the images checked before the stop are not checked again


def test_stop_while_waiting_for_another_process_on_the_run_is_heard(root):
    cfg = tiny_config(root)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True)
    holder = FileLock(run_dir / ".lock")  # another open file: flock conflicts as with another process
    assert holder.try_acquire()
    try:
        run = Started(cfg)
        deadline = time.time() + 60
        while not (run_dir / "config.json").exists() and not run.phases and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # waiting on the lock by now (the preparation takes well under a second here)
        assert run.thread.is_alive() and "training" not in run.phases
        run.stop()
    finally:
        holder.close()
    assert not (run_dir / "done").exists()


def test_stop_before_the_first_step_returns_an_unfinished_run_that_a_later_start_finishes(root):
    cfg = tiny_config(root)
    stop = threading.Event()
    stop.set()
    assert train(cfg, should_stop=stop.is_set) == run_dir_for(cfg)
    assert not (run_dir_for(cfg) / "done").exists()
    assert not (run_dir_for(cfg) / "records.jsonl").exists()  # not even the start's evaluation: stopped at once
    train(cfg)
    assert (run_dir_for(cfg) / "done").exists()
