"""Shared fixtures: tiny fake multi-domain benchmarks written into tmp_path (never real data)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("VLDLIB_CACHE", str(Path(os.environ.get("TMPDIR", "/tmp")) / "vldlib-test-cache"))
os.environ.setdefault("MPLBACKEND", "Agg")


def make_fake_benchmark(root: Path, domains=("d0", "d1", "d2"), classes=("a", "b", "c"),
                        per_class: int = 6, size: int = 32, seed: int = 0, ext: str = ".png") -> Path:
    """Write ROOT/<domain>/<class>/<i>.png with a class-dependent colour, so a model can learn it.

    Each domain shifts the brightness, a crude style change.
    """
    rng = np.random.default_rng(seed)
    for di, d in enumerate(domains):
        for ci, c in enumerate(classes):
            folder = root / d / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size, 3), dtype=np.float32)
                base[..., ci % 3] = 200
                base += 30 * di + rng.normal(0, 25, size=base.shape)
                img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
                img.save(folder / f"{c}_{i:03d}{ext}")
    return root


@pytest.fixture
def fake_benchmark(tmp_path: Path) -> Path:
    """3 domains x 3 classes x 6 images of 32 px."""
    return make_fake_benchmark(tmp_path / "fake")


def stop_after_steps(n_steps: int) -> dict:
    """`train(cfg, **stop_after_steps(n))`: lets n training steps run, then stops the run resumable
    (last.pt at the last evaluation). `train` also asks `should_stop` while it prepares (images,
    trunk outputs, the lock), so only the asks after `report_phase("training")`, one a step, count."""
    state = {"training": False, "asked": 0}

    def report_phase(phase: str) -> None:
        state["training"] = phase == "training"

    def should_stop() -> bool:
        if not state["training"]:
            return False
        state["asked"] += 1
        return state["asked"] > n_steps

    return {"should_stop": should_stop, "report_phase": report_phase}


def headless_chromium(window: str = "1200,900"):
    """A headless Chromium driven by Selenium (Debian's chromium and chromedriver), for the tests that
    look at pages in a real browser; the caller quits it. Skips the test, saying what is missing."""
    import shutil

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver, "
                    "or bash .ci/setup)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install selenium)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={window}", "--disable-gpu"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))

